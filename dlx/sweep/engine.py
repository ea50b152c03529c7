"""Running the rows of a sweep: many rows per pipeline call, each sample with its own plan.

Rows that share the call's step count go into one pipeline call, whatever their guidance
scales, where the pipeline allows it (below). Each sample gets the noise of its own seed (one
CPU ``torch.Generator`` per sample, as a standalone run with
``generator=torch.Generator().manual_seed(seed)`` draws it) and follows its own config's
controls: ``RowPlans`` asks each row's fresh control instances for that sample's guidance at every
step, and the tap computes only the rows the plans need. Rows of the same prompt, seed and scale
go into the same call (their reference row, full guidance at that scale, first), so the tap can
evaluate the guided prefix they share once (``dlx.Share``, where available); rows of different
scales are never shared (their keys hold the scale).

Scales in one call: the call runs at the largest of its rows' scales (so CFG is on when any row
is guided) and ``RowPlans`` gives every sample its own row's scale; a row at a scale <= 1 is
unguided at every step, as a standalone call at that scale runs without CFG (NFE = steps), and a
scale-setting control (``GuidanceSchedule``) reads its own row's scale as the call's (``_RowRun``).
That equals one call per scale only where the call's ``guidance_scale`` acts in the CFG
combination alone (``Family.scale_only_combines``: SD 1.5/2, SDXL, SD3, their img2img, inpaint
and ControlNet pipelines, the embedded model; ``guidance_rescale`` included, the tap rescales
each sample). Where it also changes the denoiser's inputs (Flux's distilled guidance
embedding, LCM's ``w`` embedding, SD3 skip-layer guidance: ``families.scale_changes_inputs``)
the sweep keeps one call per scale. (A config that sets scales at a scale <= 1, which a
standalone run refuses, is refused when the grid is built.)

A CUDA out-of-memory error halves the batch and retries (the events table records it); a row
that still fails, or decodes to NaN, is stored as failed with its error and the sweep goes on.
Under ``torch.compile`` with CUDA graphs every new batch shape is a new graph: ``pad_shapes``
pads the denoiser's batch up to a few sizes (``BUCKETS``) and counts the shapes compiled.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from ..errors import DlxError
from ..session import Part, Run

__all__ = ["RowPlans", "plan_batches", "run_batch", "mixes_scales", "pad_shapes", "default_max_batch"]


class _RowRun:
    """The run as one row's controls see it: the call's run, except that the call's guidance
    scale (``default_scale()``) is the row's own (a mixed-scale call runs at its largest)."""

    def __init__(self, run: Run, scale: float):
        self._run = run
        self._scale = scale

    def __getattr__(self, name):
        return getattr(self._run, name)

    def default_scale(self) -> float:
        return self._scale


class RowPlans(Part):
    """Per-sample guidance for a batch of sweep rows: sample j follows ``controls[j]``.

    Each row's controls are fresh instances, asked at every step (one value for the whole
    batch, of which the row takes its own); a sample is guided where all its controls guide it,
    at the scale its (at most one) scale-setting control gives, else its row's scale. ``scales``
    (one per row; None: every row at the call's scale) lets rows of several scales share a call:
    a row at scale <= 1 is then unguided at every step (a standalone call at that scale has no
    CFG), and its controls see the row's scale as the call's. Parts that read denoiser calls
    (``AdaptiveCutoff``) see their sample's rows of each denoiser call. After the run ``nfe``
    holds each sample's denoiser evaluations, ``guided`` each sample's guided steps and
    ``step_ms`` the per-step times.
    """

    def __init__(self, controls: list[list[Part]], scales: list[float] | None = None):
        if scales is not None and len(scales) != len(controls):
            raise DlxError(f"RowPlans got {len(scales)} scales for {len(controls)} rows")
        self.rows = controls
        self.scales = None if scales is None else [float(s) for s in scales]
        self.wants_calls = any(p.wants_calls for ps in controls for p in ps)
        self._sets_scale = any(p.sets_scale for ps in controls for p in ps)
        # per-sample scales go to the tap when a row sets them or rows differ in scale
        self.sets_scale = self._sets_scale or self.scales is not None
        self._off = [s <= 1.0 for s in self.scales] if self.scales is not None else [False] * len(controls)
        self._views: list = [None] * len(controls)
        self.nfe: list[float] | None = None
        self.guided: list[int] = [0] * len(controls)
        self.step_ms: list[float] = []
        self.num_steps: int | None = None

    def _each(self):
        """(row's view of the run, part) for every part of every row."""
        for view, ps in zip(self._views, self.rows):
            for p in ps:
                yield view, p

    def on_run_start(self, run: Run):
        if self.scales is None:
            self._views = [run] * len(self.rows)
        else:
            self._views = [_RowRun(run, s) for s in self.scales]
        for view, p in self._each():
            p.on_run_start(view)

    def on_loop_start(self, run: Run):
        if run.batch is not None and run.batch != len(self.rows):
            raise DlxError(f"RowPlans holds {len(self.rows)} rows but the call has batch {run.batch}")
        self.num_steps = run.num_steps
        for view, p in self._each():
            p.on_loop_start(view)

    def guidance(self, run: Run, step: int):
        from ..session import Guide

        batch = run.batch
        if batch != len(self.rows):
            raise DlxError(f"RowPlans holds {len(self.rows)} rows but the call has batch {batch}")
        call_scale = float(run.pipe.guidance_scale)
        mask, scale = [], []
        for j, ps in enumerate(self.rows):
            s_j = call_scale if self.scales is None else self.scales[j]
            if self._off[j]:  # no CFG at this scale: its controls are never asked, as standalone
                mask.append(False)
                scale.append(s_j)
                continue
            m_j = True
            for p in ps:
                g = p.guidance(self._views[j], step)  # a row's own controls: one value for the whole batch
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
        return Guide(mask, scale if self.sets_scale else None)

    def unguided_after(self, run: Run, step: int) -> bool:
        """No row guides after ``step`` (each has a control that knows it, or a scale <= 1): the
        run may take the pipeline out of CFG for the tail, as it does for a standalone cutoff."""
        return all(off or any(p.unguided_after(view, step) for p in ps)
                   for off, view, ps in zip(self._off, self._views, self.rows))

    def on_denoiser(self, run: Run, call):
        from .._tap import DenoiserCall

        for j, ps in enumerate(self.rows):
            obs = [p for p in ps if p.wants_calls]
            if not obs:
                continue
            # an unguided sample has no unconditional prediction (standalone: none was computed)
            u = call.uncond[j:j + 1] if call.uncond is not None and call.mask[j] else None
            sub = DenoiserCall(call.step, call.timestep, call.x_in[j:j + 1], call.cond[j:j + 1], u,
                               call.cond[j:j + 1] if u is None else None, call.mask[j:j + 1],
                               call.scale if not isinstance(call.scale, torch.Tensor) else call.scale[j:j + 1])
            for p in obs:
                p.on_denoiser(self._views[j], sub)

    def on_run_end(self, run: Run, error):
        self.nfe = list(run.nfe) if run.nfe is not None else None
        self.step_ms = run.step_ms()
        for view, p in self._each():
            p.on_run_end(view, error)


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


def mixes_scales(pipe, call: dict) -> bool:
    """Whether rows of different guidance scales may share a call of ``pipe`` with ``call``'s
    arguments (see the module docstring)."""
    from ..families import scale_changes_inputs

    return scale_changes_inputs(pipe, call) is None


def run_batch(pipe, spec, rows: list[dict], *, share: bool = True, extra_parts=()) -> dict:
    """One pipeline call for ``rows`` (same steps; scales may differ where ``mixes_scales``):
    images (B, 3, H, W) float in [0, 1] on the pipeline's device (metrics run there; only uint8
    pixels travel to the host), per-sample NFE and guided steps, evaluations actually computed,
    wall time, and the scale (one float, or the sorted distinct scales of a mixed call) and the
    ``call_scale`` the pipeline was called with."""
    import dlx

    cfgs = {c.name: c for c in spec.configs}
    row_cfgs = [cfgs[r["config"]] for r in rows]
    steps_all = {spec.steps_of(c) for c in row_cfgs}
    if len(steps_all) != 1:
        raise DlxError(f"one pipeline call runs one step count; these rows have {sorted(steps_all)}")
    steps = steps_all.pop()
    scales = [spec.scale_of(c) for c in row_cfgs]
    mixed = len(set(scales)) > 1
    if mixed and not mixes_scales(pipe, spec.call):
        from ..families import scale_changes_inputs

        raise DlxError(f"rows of scales {sorted(set(scales))} cannot share one call of {type(pipe).__name__}: "
                       f"{scale_changes_inputs(pipe, spec.call)}")
    # the call's scale turns CFG on when any row is guided; every sample gets its own row's scale
    call_scale = max(scales)
    plans = RowPlans([c.parts() for c in row_cfgs], scales if mixed else None)
    parts = [plans]
    shared = None
    if share and len(rows) > 1:
        # the scale is part of the key: rows of different scales differ from the first step
        shared = _share_part([(r["prompt"], r["seed"], s) for r, s in zip(rows, scales)])
        if shared is not None:
            parts.append(shared)
    parts += list(extra_parts)
    kwargs = dict(spec.call)
    kwargs.update(num_inference_steps=steps, guidance_scale=call_scale)
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
            "call_ms": call_ms, "steps": steps, "scale": sorted(set(scales)) if mixed else call_scale,
            "call_scale": call_scale, "step_ms": plans.step_ms}


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


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    return (img * 255).round().clamp(0, 255).to(torch.uint8)
