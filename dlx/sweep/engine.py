"""Running the rows of a sweep: many rows per pipeline call, each sample with its own plan.

Rows that share the call's step count and guidance scale go into one pipeline call. Each sample
gets the noise of its own seed (one CPU ``torch.Generator`` per sample, as a standalone run with
``generator=torch.Generator().manual_seed(seed)`` draws it) and follows its own config's
controls: ``RowPlans`` asks each row's fresh control instances for that sample's guidance at every
step, and the tap computes only the rows the plans need. Rows of the same prompt and seed go
into the same call (their reference row, full guidance, first), so the tap can evaluate the
guided prefix they share once (``dlx.Share``, where available).

A CUDA out-of-memory error halves the batch and retries (the events table records it); a row
that still fails, or decodes to NaN, is stored as failed with its error and the sweep goes on.
Under ``torch.compile`` with CUDA graphs every new batch shape is a new graph: ``pad_shapes``
pads the denoiser's batch up to a few sizes (``BUCKETS``) and counts the shapes compiled.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import dataclass, field

import torch

from ..errors import DlxError
from ..session import Part, Run

__all__ = ["RowPlans", "plan_batches", "run_batch", "pad_shapes", "default_max_batch", "png_bytes"]


class RowPlans(Part):
    """Per-sample guidance for a batch of sweep rows: sample j follows ``controls[j]``.

    Each row's controls are fresh instances, asked with a batch of one at every step; a sample
    is guided where all its controls guide it, at the scale its (at most one) scale-setting
    control gives, else the call's. Parts that read denoiser calls (``AdaptiveCutoff``) see
    their sample's rows of each denoiser call. After the run ``nfe`` holds each sample's denoiser evaluations,
    ``guided`` each sample's guided steps and ``step_ms`` the per-step times.
    """

    def __init__(self, controls: list[list[Part]]):
        self.rows = controls
        self.wants_calls = any(p.wants_calls for ps in controls for p in ps)
        self._sets_scale = any(getattr(p, "sets_scale", False) or type(p).__name__ == "GuidanceSchedule"
                               for ps in controls for p in ps)
        self.sets_scale = self._sets_scale  # the run allows one scale-setting part per block
        self.nfe: list[float] | None = None
        self.guided: list[int] = [0] * len(controls)
        self.step_ms: list[float] = []
        self.num_steps: int | None = None

    def _all(self):
        return [p for ps in self.rows for p in ps]

    def on_run_start(self, run: Run):
        for p in self._all():
            p.on_run_start(run)

    def on_loop_start(self, run: Run):
        if run.batch is not None and run.batch != len(self.rows):
            raise DlxError(f"RowPlans holds {len(self.rows)} rows but the call has batch {run.batch}")
        self.num_steps = run.num_steps
        for p in self._all():
            p.on_loop_start(run)

    def guidance(self, run: Run, step: int):
        from ..session import Guide

        batch = run.batch
        if batch != len(self.rows):
            raise DlxError(f"RowPlans holds {len(self.rows)} rows but the call has batch {batch}")
        default = float(run.pipe.guidance_scale)
        mask, scale = [], []
        for ps in self.rows:
            m_j, s_j = True, default
            for p in ps:
                g = p.guidance(run, step)  # a row's own controls: one value for the whole batch
                if g is None:
                    continue
                m, s = g
                if m is not None:
                    m_j = m_j and bool(m if isinstance(m, bool) else m[0])
                if s is not None:
                    s_j = float(s if not isinstance(s, (list, tuple, torch.Tensor)) else s[0])
            mask.append(m_j)
            scale.append(s_j)
        for j, m in enumerate(mask):
            if m:
                self.guided[j] += 1
        return Guide(mask, scale if self._sets_scale else None)

    def unguided_after(self, run: Run, step: int) -> bool:
        """No row guides after ``step`` (each has a control that knows it): the run may take the
        pipeline out of CFG for the tail, as it does for a standalone cutoff."""
        return all(any(p.unguided_after(run, step) for p in ps) for ps in self.rows)

    def on_denoiser(self, run: Run, call):
        from .._tap import DenoiserCall

        for j, ps in enumerate(self.rows):
            obs = [p for p in ps if p.wants_calls]
            if not obs:
                continue
            u = call.uncond[j:j + 1] if call.uncond is not None else None
            sub = DenoiserCall(call.step, call.timestep, call.x_in[j:j + 1], call.cond[j:j + 1], u,
                               call.cond[j:j + 1] if u is None else None, call.mask[j:j + 1],
                               call.scale if not isinstance(call.scale, torch.Tensor) else call.scale[j:j + 1])
            for p in obs:
                p.on_denoiser(run, sub)

    def on_run_end(self, run: Run, error):
        self.nfe = list(run.nfe) if run.nfe is not None else None
        self.step_ms = run.step_ms()
        for p in self._all():
            p.on_run_end(run, error)


# -- batch planning ---------------------------------------------------------------------------------
def default_max_batch(device: torch.device) -> int:
    """Rows per pipeline call: all of a cutoff study on a GPU, fewer on a CPU (memory and cache)."""
    return 256 if device.type == "cuda" else 96


def plan_batches(units: list[list[dict]], max_batch: int) -> list[list[dict]]:
    """Pack units (the rows of one prompt and seed) into batches of at most ``max_batch`` rows,
    keeping a unit in one batch when it fits (so its rows can share their guided prefix)."""
    batches, cur = [], []
    for unit in units:
        for i in range(0, len(unit), max_batch):
            piece = unit[i:i + max_batch]
            if cur and len(cur) + len(piece) > max_batch:
                batches.append(cur)
                cur = []
            cur = cur + piece
    if cur:
        batches.append(cur)
    return batches


# -- padding the denoiser batch to few shapes (CUDA graphs) ---------------------------------------
def buckets(n: int) -> int:
    """The padded size of a denoiser batch of n: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ..."""
    b = 1
    while True:
        for c in (b, b + b // 2) if b >= 2 else (b,):
            if c >= n:
                return c
        b *= 2


@dataclass
class ShapeLog:
    sizes: set = field(default_factory=set)


@contextlib.contextmanager
def pad_shapes(pipe, log: ShapeLog | None = None, enabled: bool = True):
    """Pad every denoiser call's batch up to ``buckets(n)`` (repeating its last row), so a
    compiled denoiser with CUDA graphs sees few shapes; the extra outputs are dropped. ``log``
    collects the padded sizes seen (one CUDA graph each). Restores the denoiser on exit."""
    from ..families import family_of

    if not enabled:
        yield log
        return
    fam = family_of(pipe)
    den = getattr(pipe, fam.denoiser)
    missing = object()
    prev = den.__dict__.get("forward", missing)
    inner = den.forward
    log = log if log is not None else ShapeLog()

    def pad(obj, n, m):
        if isinstance(obj, torch.Tensor):
            if obj.ndim > 0 and obj.shape[0] == n:
                return torch.cat([obj, obj[-1:].expand(m - n, *obj.shape[1:])])
            return obj
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(pad(o, n, m) for o in obj)
        if isinstance(obj, dict):
            return {k: pad(v, n, m) for k, v in obj.items()}
        return obj

    def forward(*args, **kwargs):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("sample", kwargs.get("hidden_states"))
        n = x.shape[0]
        m = buckets(n)
        log.sizes.add(m)
        if m == n:
            return inner(*args, **kwargs)
        out = inner(*pad(list(args), n, m), **pad(kwargs, n, m))
        if isinstance(out, tuple):
            return (out[0][:n].clone(), *out[1:])
        if isinstance(out, torch.Tensor):
            return out[:n].clone()
        out.sample = out.sample[:n].clone()
        return out

    object.__setattr__(den, "forward", forward)
    try:
        yield log
    finally:
        if prev is missing:
            den.__dict__.pop("forward", None)
        else:
            object.__setattr__(den, "forward", prev)


# -- one call ------------------------------------------------------------------------------------
def _share_part(keys):
    """Core's prefix-sharing part when this dlx has it (None otherwise)."""
    import dlx

    if "Share" not in getattr(dlx, "_LAZY", {}):
        return None
    return dlx.Share(keys)


def _sync(device):
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def run_batch(pipe, spec, rows: list[dict], *, share: bool = True, extra_parts=()) -> dict:
    """One pipeline call for ``rows`` (same steps and scale): images (B, 3, H, W) float in [0, 1]
    on the pipeline's device (metrics run there; only uint8 pixels travel to the host), per-sample
    NFE and guided steps, evaluations actually computed, wall time."""
    import dlx

    cfgs = {c.name: c for c in spec.configs}
    cfg0 = cfgs[rows[0]["config"]]
    steps, scale = spec.steps_of(cfg0), spec.scale_of(cfg0)
    plans = RowPlans([cfgs[r["config"]].parts() for r in rows])
    parts = [plans]
    shared = None
    if share and len(rows) > 1:
        shared = _share_part([(r["prompt"], r["seed"]) for r in rows])
        if shared is not None:
            parts.append(shared)
    parts += list(extra_parts)
    kwargs = dict(spec.call)
    kwargs.update(num_inference_steps=steps, guidance_scale=scale)
    dev = _device_of(pipe)
    _sync(dev)
    t0 = time.perf_counter()
    with dlx.attach(pipe, *parts):
        out = pipe(prompt=[r["prompt"] for r in rows],
                   generator=[torch.Generator().manual_seed(int(r["seed"])) for r in rows],
                   output_type="pt", **kwargs)
    images = out.images if not isinstance(out, tuple) else out[0]
    images = images.detach().float()
    _sync(dev)
    call_ms = (time.perf_counter() - t0) * 1e3
    nfe = plans.nfe or [math.nan] * len(rows)
    evaluations = getattr(shared, "evaluations", None)
    if evaluations is None:
        evaluations = getattr(shared, "report", {}).get("evaluations") if shared is not None else None
    if evaluations is None:
        evaluations = float(sum(nfe))
    return {"images": images, "nfe": nfe, "guided": list(plans.guided), "evaluations": float(evaluations),
            "call_ms": call_ms, "steps": steps, "scale": scale, "step_ms": plans.step_ms}


def _device_of(pipe) -> torch.device:
    from ..families import family_of

    den = getattr(pipe, family_of(pipe).denoiser)
    try:
        return next(den.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def png_bytes(img: torch.Tensor) -> bytes:
    """(3, H, W) uint8, or float in [0, 1] rounded as diffusers makes its PIL images -> PNG bytes.
    Lossless at zlib level 1: five times faster to write than Pillow's default 6, files ~20% larger
    (a sweep writes one PNG per row on its critical path; Pillow releases the GIL while it
    compresses, so rows are encoded on threads)."""
    from PIL import Image

    if img.dtype != torch.uint8:
        img = to_uint8(img)
    arr = img.cpu().permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    return (img * 255).round().clamp(0, 255).to(torch.uint8)
