"""Recorder: the part that fills a Trace with every step of a run. It never changes the run.

``Ledger`` is the recorder that keeps only the run's one record (no tensors): sweep rows and the
cost model are built from it. (Over 400 lines: one idea, recording; most of it is the deferred
x0 and the one copy of every kept tensor to the host at the end, which must stay together.)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import platform
import time

import torch

from . import _args
from . import _diffusers as D
from .errors import DlxError
from .families import BATCHED_X0, check_tensor_inputs, denoised_as, denoised_steps, family_of, prediction_type, sigma_at
from .protocol import DenoiserCall, Part
from .run import Run
from .session import attach
from .trace import Step, Trace

__all__ = ["Ledger", "Recorder", "record"]

_KEEP = ("latents", "x0", "cond", "uncond", "embeds")
_STORAGE = ("cpu", "device")
_NOTHING: dict = {}


def _keep_arg(keep) -> tuple[str, ...]:
    """``keep`` as a tuple of names: one name or an iterable of them, each known, none twice."""
    if isinstance(keep, str):
        keep = (keep,)
    elif keep is None or not isinstance(keep, (list, tuple, set, frozenset)):
        raise DlxError(f"argument `keep` must be a name or a list of names from {list(_KEEP)}; got {keep!r}")
    keep = tuple(keep)
    bad = [k for k in keep if not isinstance(k, str) or k not in _KEEP]
    if bad:
        raise DlxError(f"argument `keep` has unknown entries {bad}; choose from {list(_KEEP)}")
    if len(set(keep)) != len(keep):
        raise DlxError(f"argument `keep` names an entry twice: {list(keep)}")
    return keep


def _check_downsample(downsample: int | None, shape, what: str) -> None:
    """A DlxError when average pooling by ``downsample`` cannot fit a 4-D tensor of ``shape``."""
    if downsample and downsample > 1 and len(shape) == 4 and min(shape[-2:]) < downsample:
        raise DlxError(
            f"argument `downsample`={downsample} is larger than the {what} "
            f"({shape[-2]}x{shape[-1]}); use at most {min(shape[-2:])} (or None)")


def _latent_hw(pipe, call_kwargs: dict) -> tuple[int, int] | None:
    """The latent height and width a call will have, from its arguments, where they say so."""
    vsf = getattr(pipe, "vae_scale_factor", None)
    if not isinstance(vsf, int) or vsf < 1:
        return None
    h, w = call_kwargs.get("height"), call_kwargs.get("width")
    if isinstance(h, int) and isinstance(w, int):
        return h // vsf, w // vsf
    image = call_kwargs.get("image")
    size = getattr(image, "size", None)  # a PIL image: (width, height)
    if h is None and w is None and isinstance(size, tuple) and len(size) == 2:
        return size[1] // vsf, size[0] // vsf
    return None


class Recorder(Part):
    """Records latents, conditioning, guidance state, predictions, x0 and timing of every step.

    Args:
        pipe: the pipeline to record (its family decides which conditioning tensors to keep).
        keep: what to keep among ``"latents", "x0", "cond", "uncond", "embeds"`` (one name or
            several). Predictions and x0 need the denoiser tap: use ``dlx.record(pipe)`` or
            ``dlx.attach(pipe, rec)``.
        dtype: store tensors in this floating dtype, given as a ``torch.dtype`` or its name
            (default: as the run produced them).
        downsample: average-pool spatial dims of 4-D tensors by this factor (saves memory on big
            runs); at most the latent's height and width, checked before the run where the call
            gives its size, else at the first step.
        storage: ``"cpu"`` (tensors stay on the device during the run, so no per-step host sync,
            and move to the CPU once the run ends: on CUDA one copy per dtype into page-locked
            memory, queued behind the run; pageable above ``dlx.recorder.PIN_LIMIT`` bytes) or
            ``"device"`` (stay where they are).

    As a plain ``callback_on_step_end`` (with ``callback_on_step_end_tensor_inputs=rec.tensor_inputs``)
    it records what callbacks can see: latents, conditioning, the guidance state read at each step's
    end, and per-step time between callbacks (step 0 has none); it composes with
    ``MultiPipelineCallbacks`` and diffusers' official callbacks (put it last, so it sees final
    latents). Attached, it also gets the predictions, x0, and each sample's exact guidance and NFE per step.

    Per step it only copies what it keeps (one kernel per tensor, no host sync); x0 of steps
    guided by the pipeline's own CFG or not at all is computed for all of them at once when the
    run ends (bitwise what the per-step computation gives), so ``Step.x0`` is None until then.
    """

    runs_last = True  # after controls and the caller's callback: it records each step's final latents
    wants_calls = True

    def __init__(self, pipe, *, keep=_KEEP, dtype: torch.dtype | None = None,
                 downsample: int | None = None, storage: str = "cpu"):
        try:
            self.family = family_of(pipe)
        except DlxError as e:
            raise DlxError(f"argument `pipe` ({type(pipe).__name__}): {e}") from None
        keep = _keep_arg(keep)
        dtype = _args.float_dtype("dtype", dtype, allow_none=True)
        if downsample is not None and (isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1):
            raise DlxError(f"argument `downsample` must be a positive int or None; got {downsample!r}")
        if not isinstance(storage, str) or storage not in _STORAGE:
            raise DlxError(f"argument `storage` must be one of {list(_STORAGE)}; got {storage!r}")
        self.keep = keep
        self.dtype = dtype
        self.downsample = downsample
        self.storage = storage
        self.wants_calls = any(k in keep for k in ("x0", "cond", "uncond"))
        names = ["latents"] + (list(self.family.conditioning) if "embeds" in keep else [])
        self.tensor_inputs = check_tensor_inputs(pipe, names)
        self.trace = Trace()
        self._reset()

    def _reset(self):
        self._calls: dict[int, dict] = {}  # step -> the tensors kept from its denoiser call
        self._ip_scale: dict[int, float] = {}
        self._cond_ids: tuple = ()
        self._last_mark = None
        self._bare_steps = False
        self._prediction: str | None = None  # the scheduler's prediction type, looked up once per run
        self._defer_x0 = False
        # what to keep, decided once per run instead of on every step
        keep = self.keep
        self._keep_latents = "latents" in keep
        self._keep_cond = "cond" in keep
        self._keep_uncond = "uncond" in keep
        self._keep_x0 = "x0" in keep
        self._keep_embeds = "embeds" in keep
        self._plain = self.dtype is None and not (self.downsample and self.downsample > 1)

    # -- storage --------------------------------------------------------------------------------
    def _store(self, t: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """A copy of ``t`` to keep (``fresh``: ``t`` is ours already, copy only to convert)."""
        if t.requires_grad:
            t = t.detach()
        if self._plain:  # no conversion: a copy (CUDA-graph outputs are overwritten by the next replay)
            return t if fresh else t.clone()
        if self.downsample and self.downsample > 1 and t.ndim == 4:
            _check_downsample(self.downsample, t.shape, "recorded tensor")
            t = torch.nn.functional.avg_pool2d(t.float(), self.downsample).to(t.dtype)
            fresh = True
        # otherwise copy: CUDA-graph outputs are overwritten by the next replay
        return t.to(dtype=self.dtype or t.dtype, copy=not fresh)

    # -- attached --------------------------------------------------------------------------------
    def on_run_start(self, run: Run):
        if self.trace.steps:
            raise DlxError("this Recorder already holds a run; create a new Recorder (or dlx.record block) per run")
        self._reset()
        self._ip_procs = run.ip_processors
        if self.downsample and not self.family.packed:  # before any model work, where the call says the size
            hw = _latent_hw(run.pipe, run.call)
            if hw is not None:
                _check_downsample(self.downsample, (0, 0, *hw), "latent")

    def on_loop_start(self, run: Run):
        if self._keep_x0:
            self._prediction = prediction_type(self.family, run.pipe.scheduler)
            # x0 of steps the pipeline guides itself is computed after the run, all at once
            self._defer_x0 = self._plain and self._prediction in BATCHED_X0

    def on_denoiser(self, run: Run, call: DenoiserCall):
        step = call.step
        calls = self._calls
        if step in calls:
            if call.revises and self._keep_x0:  # SD3 skip-layer guidance changed what the scheduler steps with
                kept = calls[step]
                kept.pop("_x0_in", None)
                kept["x0"] = self._store(denoised_as(self._prediction, call.x_in, call.guided, run.sigma(step)),
                                         fresh=True)
            return
        if self._ip_procs:
            self._ip_scale[step] = float(self._ip_procs[0].scale[0])
        # Keep what we need now: the next CUDA-graph replay may overwrite these buffers.
        keep = {}
        if self._keep_cond and self._keep_uncond and call.pair is not None:
            # one copy of the whole output [uncond; cond] instead of one per half
            keep["uncond"], keep["cond"] = self._store(call.pair).chunk(2)
        else:
            if self._keep_cond:
                keep["cond"] = self._store(call.cond)
            if self._keep_uncond:
                if call.uncond is not None:
                    keep["uncond"] = self._store(call.uncond)
                else:  # no sample guided: NaN rows, as for each unguided sample of a guided step
                    keep["uncond"] = self._store(torch.full_like(call.cond, float("nan")), fresh=True)
        if self._keep_x0:
            lerp = call.lerp_guided
            if self._defer_x0 and (lerp or call.guided is call.cond):
                # One copy of the input now instead of two or three kernels (guided, x0) per step;
                # x0 follows after the run (_deferred_x0), bitwise the same. Steps guided by the
                # pipeline's own CFG (lerp) or not at all (guided is cond: no CFG, cut off).
                x, c = call.x_in, call.cond
                if x.ndim == c.ndim and x.shape[1] != c.shape[1]:
                    x = x[:, : c.shape[1]]  # inpaint UNets also take mask and masked-image channels
                u = (keep["uncond"] if self._keep_uncond else call.uncond.clone()) if lerp else None
                keep["_x0_in"] = (x.clone(), u, keep["cond"] if self._keep_cond else c.clone(),
                                  call.scale if lerp else None)
            else:
                keep["x0"] = self._store(denoised_as(self._prediction, call.x_in, call.guided, run.sigma(step)),
                                         fresh=True)
        calls[step] = keep

    def on_step_end(self, run: Run, step, timestep, callback_kwargs):
        lat = callback_kwargs.get("latents")
        kept = self._calls.get(step, _NOTHING)
        r = run.step_record(step)  # the run's own record of this step: the one truth of its counts
        if r.guided:
            mask, scale, nfe = list(r.guided), list(r.scale), list(r.nfe)
        else:  # no denoiser call in this step (cannot happen in diffusers' loops)
            n = lat.shape[0] if lat is not None else (run.batch or 1)
            mask, scale, nfe = [False] * n, [math.nan] * n, [math.nan] * n
        s = Step(
            index=int(step), timestep=run.t_of(step), sigma=run.sigma(step),
            guidance_scale=scale, cfg_active=mask, nfe=nfe,
            evaluations=int(r.evaluations),
            ip_adapter_scale=self._ip_scale.get(step),
            conditioning=self._conditioning(callback_kwargs),
            latents=self._store(lat) if (self._keep_latents and lat is not None) else None,
            x0=kept.get("x0"), cond=kept.get("cond"), uncond=kept.get("uncond"),
        )
        self.trace.steps.append(s)
        return callback_kwargs

    def on_run_end(self, run: Run, error):
        # On a GPU the host is usually far ahead of the device when the loop ends (~70 ms on a
        # compiled SD1.5 run): queue every kernel and copy first, wait once, then read the clocks.
        self._deferred_x0(run)
        self._calls = {}
        self._finish(run.pipe, run.call, run, error)
        for s, v in zip(self.trace.steps, run.record.step_ms):
            s.step_ms = float(v)
        self.trace.meta["call_timing"] = run.call_timing()  # after the one wait: no extra sync

    def _deferred_x0(self, run: Run):
        """x0 of the steps whose inputs ``on_denoiser`` kept: one batched computation per group of
        steps with the same guidance scale (None: unguided, x0 from cond) and shapes: one or two
        groups, unless a callback changed the scale mid-run."""
        groups: dict[tuple, list] = {}
        for s in self.trace.steps:
            args = self._calls.get(s.index, _NOTHING).get("_x0_in")
            if args is not None:
                x, u, c, w = args
                key = (w, x.shape, x.dtype, x.device, c.shape, c.dtype)
                groups.setdefault(key, []).append((s, args))
        for (w, *_), members in groups.items():
            g = torch.stack([a[2] for _, a in members])
            if w is not None:  # the pipeline's CFG: lerp(uncond, cond, scale), as in DenoiserCall.guided
                g = torch.lerp(torch.stack([a[1] for _, a in members]), g, w)
            x0 = denoised_steps(self._prediction, torch.stack([a[0] for _, a in members]), g,
                                [run.sigma(s.index) for s, _ in members])
            for (s, _), v in zip(members, x0.unbind(0)):
                s.x0 = v

    # -- bare callback ---------------------------------------------------------------------------
    def on_plain_step_end(self, pipe, step, timestep, callback_kwargs):
        """Not attached: record what a callback can see."""
        now = time.perf_counter()
        if step == 0 or not self._bare_steps:
            if self.trace.steps:
                raise DlxError("this Recorder already holds a run; create a new Recorder per run")
            self._reset()
            self._bare_steps = True
        fam = self.family
        lat = callback_kwargs.get("latents")
        if fam.cfg == "batch":
            cfg_active = D.cfg_on(pipe)
            gscale = float(pipe.guidance_scale)
        else:
            cfg_active, gscale = False, math.nan
        b = lat.shape[0] if lat is not None else 1
        s = Step(
            index=int(step), timestep=float(timestep),
            sigma=sigma_at(fam, pipe.scheduler, timestep),
            # a plain callback sees the pipeline's batch-wide state; it counts no evaluations
            guidance_scale=[gscale] * b, cfg_active=[cfg_active] * b, nfe=[math.nan] * b,
            step_ms=(now - self._last_mark) * 1e3 if self._last_mark is not None else math.nan,
            conditioning=self._conditioning(callback_kwargs),
            latents=self._store(lat) if ("latents" in self.keep and lat is not None) else None,
        )
        self.trace.steps.append(s)
        self._last_mark = now
        n = int(getattr(pipe, "num_timesteps", -1))
        from .interrupt import bare_stop_reason

        reason = bare_stop_reason(pipe) if getattr(pipe, "interrupt", False) else None
        if step == n - 1 or reason is not None:
            self._finish(pipe, {}, None, None)
            self.trace.meta["stop_reason"] = reason or "completed"
        elif step == 0 or "stop_reason" not in self.trace.meta:
            self._describe_run(pipe, {}, None, None)  # the metadata is there whatever comes next
            self.trace.meta["stop_reason"] = (
                "incomplete: the recorder saw no last step (interrupted by a callback that ran after it, "
                "or the call raised); put the recorder last")
        return callback_kwargs

    # -- helpers ---------------------------------------------------------------------------------
    def _conditioning(self, callback_kwargs) -> int:
        """Index of the conditioning in force; store it again only if a tensor changed."""
        if not self._keep_embeds:
            return 0
        ids = []  # identity and version of each tensor: no device work
        for k in self.family.conditioning:
            if k in callback_kwargs:
                v = callback_kwargs[k]
                ids.append((k, id(v), v.data_ptr(), v.shape, v._version))
        ids = tuple(ids)
        conds = self.trace.conditioning
        if not conds or ids != self._cond_ids:
            conds.append({k: self._store(callback_kwargs[k]) for k, *_ in ids})
            self._cond_ids = ids
        return len(conds) - 1

    def _finish(self, pipe, call_kwargs, run, error):
        t = self.trace
        done = _to_host(t.steps, t.conditioning) if self.storage == "cpu" else None  # queued, not waited for
        try:
            self._describe_run(pipe, call_kwargs, run, error)
        finally:
            if done is not None:
                done()

    def _describe_run(self, pipe, call, run, error):
        t = self.trace
        t.meta.update(_meta(pipe, self.family, call))
        if run is not None:
            t.meta["batch"] = run.batch
            t.meta["num_steps"] = run.num_steps
            rec = run.record
            t.meta["nfe"] = list(rec.nfe) if rec.plans else None
            t.meta["evaluations"] = int(rec.evaluations)
            t.meta["stop_reason"] = run.stop_reason or (
                f"error: {type(error).__name__}: {error}" if error is not None else "completed"
            )
            t.meta["parts"] = [_describe(p) for p in run.parts if p is not self]
            if run.per_sample is not None:  # each sample's own controls (attach(per_sample=))
                t.meta["per_sample_parts"] = [[_describe(p) for p in ps] for ps in run.per_sample]
            if run.sample_scales is not None:  # each sample's own scale (attach(scales=))
                t.meta["sample_scales"] = list(run.sample_scales)
            t.meta["timing"] = "cuda-events" if run.cuda else "perf_counter"
            if run.switched_at is not None:
                t.meta["cfg_left_after_step"] = run.switched_at
        else:
            t.meta.setdefault("stop_reason", "completed")
            t.meta["timing"] = "perf_counter (between callbacks; step 0 not timed)"
        t.meta["last_guided_step"] = t.last_guided_step
        t.meta["recorded"] = list(self.keep)


_FIELDS = ("latents", "x0", "cond", "uncond")
#: the most bytes of one dtype moved through page-locked memory at the end of a run; larger
#: traces are copied through pageable memory (no pinned memory held by big traces)
PIN_LIMIT = 256 * 2**20


def _to_host(steps, conditioning: list[dict]):
    """Queue the copy of every device tensor of the run to the CPU; return the function that waits
    for it and puts the CPU tensors in place.

    One flat buffer per device and dtype: a ``cat`` on the device, one copy into page-locked
    memory queued behind the run (non-blocking, so the host does the rest of its end-of-run
    work while the device finishes), one wait. Every tensor becomes a view of its buffer.
    """
    slots: dict[tuple, list] = {}  # (device, dtype) -> [(owner, key, tensor)]
    for s in steps:
        for name in _FIELDS:
            v = getattr(s, name)
            if v is not None and not v.is_cpu:
                slots.setdefault((v.device, v.dtype), []).append((s, name, v))
    for c in conditioning:
        for k, v in c.items():
            if not v.is_cpu:
                slots.setdefault((v.device, v.dtype), []).append((c, k, v))
    moved, waits = [], []
    for (dev, dtype), members in slots.items():
        vals = [v for *_, v in members]
        flat = torch.cat([v.reshape(-1) for v in vals]) if len(vals) > 1 else vals[0].reshape(-1)
        pin = dev.type == "cuda" and flat.numel() * flat.element_size() <= PIN_LIMIT
        try:
            host = torch.empty(flat.shape, dtype=dtype, pin_memory=pin)
        except RuntimeError:  # page-locked memory refused (limits of a container): never lose the trace
            pin = False
            host = torch.empty(flat.shape, dtype=dtype)
        host.copy_(flat, non_blocking=pin)
        if pin:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
            waits.append(ev)
        moved.append((members, host))

    def done():
        for ev in waits:
            ev.synchronize()
        for members, host in moved:
            parts = host.split([v.numel() for *_, v in members])
            for (owner, key, v), part in zip(members, parts):
                part = part.view(v.shape)
                if isinstance(owner, dict):
                    owner[key] = part
                else:
                    setattr(owner, key, part)
    return done


def _describe(part) -> dict:
    """A part's configuration (``part.config()``) and, under ``"report"``, what it did."""
    d = part.config()
    report = getattr(part, "report", None)
    if isinstance(report, dict):
        d["report"] = dict(report)
    return d


def _seed_of(gen):
    if isinstance(gen, torch.Generator):
        return int(gen.initial_seed())
    if isinstance(gen, (list, tuple)) and gen and all(isinstance(g, torch.Generator) for g in gen):
        return [int(g.initial_seed()) for g in gen]
    return None


#: call arguments that do not change the result
_NOT_RESULT = {"callback_on_step_end", "callback_on_step_end_tensor_inputs", "callback", "callback_steps",
               "return_dict"}


def _describe_value(v, depth: int = 0):
    """A call argument as JSON: plain values as they are, tensors and images by shape."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v
    if isinstance(v, torch.Generator):
        return {"generator_seed": int(v.initial_seed())}
    if isinstance(v, torch.Tensor):
        return {"tensor": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
    if isinstance(v, (list, tuple)) and depth < 3:
        if v and all(isinstance(g, torch.Generator) for g in v):
            return {"generator_seeds": [int(g.initial_seed()) for g in v]}
        return [_describe_value(x, depth + 1) for x in v]
    if isinstance(v, dict) and depth < 3:
        return {str(k): _describe_value(x, depth + 1) for k, x in v.items()}
    size = getattr(v, "size", None)
    if hasattr(v, "mode") and isinstance(size, tuple):  # a PIL image
        return {"image": list(size), "mode": v.mode}
    shape = getattr(v, "shape", None)
    if isinstance(shape, tuple):  # a numpy array
        return {"array": list(shape), "dtype": str(getattr(v, "dtype", "?"))}
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (TypeError, ValueError):
            pass
    return {"repr": repr(v)[:200]}


def _meta(pipe, family, call) -> dict:
    import diffusers

    from . import __version__

    den = getattr(pipe, family.denoiser)
    try:
        dev = next(den.parameters()).device
        dtype = str(next(den.parameters()).dtype)
    except StopIteration:  # pragma: no cover
        dev, dtype = torch.device("cpu"), "?"
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    sched = pipe.scheduler
    sched_config = {k: v for k, v in dict(sched.config).items() if not k.startswith("_")}
    described = {k: _describe_value(v) for k, v in call.items() if k not in _NOT_RESULT}
    if call:
        described["scheduler"] = {"class": type(sched).__name__, "config": sched_config}
    return {
        "pipeline": type(pipe).__name__,
        "model": getattr(pipe, "name_or_path", None),  # which weights: previews pick a decoder by it
        "family": family.name,
        "scheduler": type(sched).__name__,
        "scheduler_config": sched_config,
        "call": described,
        "seed": _seed_of(call.get("generator")),
        "dtype": dtype,
        "device": str(dev),
        "device_name": device_name,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "dlx": __version__},
        "recorded_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


@contextlib.contextmanager
def record(pipe, *parts: Part, per_sample=None, scales=None, **recorder_kwargs):
    """``with dlx.record(pipe, *controls) as trace: pipe(...)`` records one call into ``trace``.

    Extra parts (cutoffs, interrupts, previews) are attached too; ``per_sample`` and ``scales``
    go to ``attach`` (each sample its own controls); other keyword arguments go to ``Recorder``.
    The trace is complete when the call returns (or raises: then ``trace.stop_reason`` names the
    error).
    """
    rec = Recorder(pipe, **recorder_kwargs)
    with attach(pipe, *parts, rec, per_sample=per_sample, scales=scales):
        yield rec.trace


class Ledger(Part):
    """A recorder that keeps only the run's one record (``run.record``: per step and sample, who
    was guided, at which scale, denoiser evaluations, step times): what a sweep's rows and the
    cost model are built from. No tensors, no host work per step."""

    runs_last = True

    def __init__(self):
        self.record = None

    def on_run_end(self, run, error):
        self.record = run.record
