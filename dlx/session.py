"""Attaching dlx parts (recorders, guidance controls, interrupts, previews) to a pipeline.

``with dlx.attach(pipe, *parts):`` makes every call of ``pipe`` inside the block run with the
parts: their step-end callbacks are chained in front of the caller's own
``callback_on_step_end`` (recorders go last, so they see the final state of each step), the
denoiser tap is installed for the duration of the call, and in ``finally`` the tap is removed
and the pipeline's guidance scale, interrupt flag and IP-Adapter scales are put back as they
were. The pipeline is left exactly as it was found, also when the call raises.

The block works by giving the pipeline instance a subclass whose ``__call__`` wraps the
original; the class is restored on exit. Nothing else about the pipeline changes.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch

from ._tap import DenoiserCall, Tap
from .errors import DlxError
from .families import Family, check_tensor_inputs, family_of, sigmas_at

__all__ = ["attach", "Part", "Run"]


class Part:
    """Base of everything that can be attached: a callback with hooks around the run.

    Subclasses override what they need. ``__call__`` has diffusers' ``callback_on_step_end``
    signature, so parts that need no denoiser access also work as plain callbacks.
    """

    tensor_inputs: list[str] = []
    #: recorders and other observers run after controls and the caller's callback
    observer: bool = False
    #: the part wants ``DenoiserCall`` events (predictions) through ``on_denoiser``
    wants_calls: bool = False

    def on_run_start(self, run: "Run") -> None:  # before the pipeline call
        pass

    def on_loop_start(self, run: "Run") -> None:  # at the first denoiser call; num_steps known
        pass

    def guidance(self, run: "Run", step: int, batch: int):  # -> (mask | None, scale | None)
        return None, None

    def on_denoiser(self, run: "Run", call: DenoiserCall) -> None:
        pass

    def on_step_end(self, run: "Run", step: int, timestep, callback_kwargs: dict) -> dict:
        return callback_kwargs

    def on_run_end(self, run: "Run", error: BaseException | None) -> None:  # in finally
        pass

    def __call__(self, pipe, step, timestep, callback_kwargs):
        run = Run.current(pipe)
        if run is None:
            raise DlxError(
                f"{type(self).__name__} acts inside the denoiser and must be attached: "
                f"`with dlx.attach(pipe, {type(self).__name__}(...)): pipe(...)`"
            )
        return self.on_step_end(run, step, timestep, callback_kwargs)


@dataclass
class Plan:
    """Guidance for one step: per-sample mask and scale. Treat as immutable: a run reuses one
    plan for every step its guidance does not change, and the derived values are cached."""

    mask: tuple[bool, ...]
    scale: tuple[float, ...]
    default: float  # the pipeline's own scale

    @functools.cached_property
    def passthrough(self) -> bool:
        return all(self.mask) and all(s == self.default for s in self.scale)

    @functools.cached_property
    def any_guided(self) -> bool:
        return any(self.mask)

    @functools.cached_property
    def mean_scale(self) -> float:
        """The scale averaged over the samples (a trace step's ``guidance_scale``)."""
        return sum(self.scale) / len(self.scale)

    def scale_rows(self, rows, like: torch.Tensor):
        vals = [self.scale[i] for i in rows]
        if all(v == vals[0] for v in vals):
            return vals[0]
        return torch.tensor(vals, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))

    def scale_value(self):
        """The scale as a float when uniform, else a per-sample CPU tensor (for observers)."""
        if all(s == self.scale[0] for s in self.scale):
            return self.scale[0]
        return torch.tensor(self.scale, dtype=torch.float32)


class Run:
    """One pipeline call made inside an ``attach`` block: its parts, step counter and NFE."""

    _active: dict[int, "Run"] = {}

    def __init__(self, session: "_Session", pipe, call_kwargs: dict):
        self.session = session
        self.pipe = pipe
        self.family: Family = session.family
        self.parts = session.parts
        self.call_kwargs = call_kwargs
        self.step = 0
        self.num_steps: int | None = None
        self.batch: int | None = None
        self.loop_started = False
        self.stop_reason: str | None = None
        self.error: BaseException | None = None
        self.flux_true_cfg = False
        self.flux_scale = float(call_kwargs.get("true_cfg_scale", 1.0))
        self.pending_cond = None
        self.nfe: list[float] | None = None  # per sample, summed over the run
        self.step_nfe: list[float] = []  # mean per-sample evaluations, per step
        self.step_plans: list[Plan | None] = []
        # Per-step dispatch lists, fixed for the run: who gets denoiser calls, who acts at step end
        # (parts in order, then the caller's callback, then observers) and who sets guidance.
        self.call_observers = [p for p in self.parts if p.wants_calls]
        self.wants_calls = bool(self.call_observers)
        self.step_parts = [p for p in self.parts if not p.observer and _overrides(p, "on_step_end")]
        self.step_observers = [p for p in self.parts if p.observer and _overrides(p, "on_step_end")]
        self.controls = [p for p in self.parts if type(p).guidance is not Part.guidance]
        self._plan_cache: tuple[int, Plan] | None = None
        self._uniform_plan: Plan | None = None  # the plan of every step when no part controls guidance
        self._nfe_per: dict = {}  # (batch, cond, uncond) -> (per-sample evaluations, their mean)
        # The device is read off the denoiser's input at the first call (``before_denoiser``):
        # ``pipe._execution_device`` walks every module for offload hooks, milliseconds per call.
        self.device: torch.device | None = None
        self._cuda: bool | None = None
        self.ip_processors: list = []  # IP-Adapter attention processors, found once per run
        self.timesteps: list[float] | None = None
        self.sigmas: list[float] | None = None
        self.marks: list = []  # step-boundary timing marks: CUDA events or perf_counter values

    @classmethod
    def current(cls, pipe) -> "Run | None":
        return cls._active.get(id(pipe))

    @property
    def cuda(self) -> bool:
        """Whether the denoiser runs on a CUDA device (then steps are timed with CUDA events)."""
        if self._cuda is None:  # asked before the loop started (a call that failed early)
            dev = getattr(self.pipe, "_execution_device", None)
            if dev is None:
                dev = getattr(self.pipe, "device", torch.device("cpu"))
            return torch.device(dev).type == "cuda"
        return self._cuda

    # -- called by the tap ----------------------------------------------------------------------
    def before_denoiser(self, x: torch.Tensor):
        if not self.loop_started:
            self.loop_started = True
            self.device = x.device
            self._cuda = x.device.type == "cuda"
            self._mark = self._cuda_mark if self._cuda else time.perf_counter
            self.num_steps = int(getattr(self.pipe, "num_timesteps", 0) or 0) or None
            if self.num_steps is None:
                raise DlxError(f"{type(self.pipe).__name__} did not set num_timesteps before its loop")
            # The loop runs over a suffix of scheduler.timesteps (all of them, or the tail for
            # img2img); a CPU copy taken once lets every later lookup avoid a device sync.
            ts = self.pipe.scheduler.timesteps
            self.timesteps = ts[len(ts) - self.num_steps:].detach().float().cpu().tolist()
            self.sigmas = sigmas_at(self.family, self.pipe.scheduler, self.timesteps)
            for p in self.parts:
                p.on_loop_start(self)
            self.marks.append(self._mark())

    def batch_hint(self, b: int) -> int:
        if self.batch is None:
            self.batch = b
        return self.batch

    def _mark(self):
        if self.cuda:
            return self._cuda_mark()
        return time.perf_counter()

    @staticmethod
    def _cuda_mark():
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def plan(self, b: int) -> Plan:
        if self.batch is None:
            self.batch = b
        cached = self._plan_cache
        if cached is not None and cached[0] == self.step:
            return cached[1]
        # read every step: a callback may change the pipeline's scale mid-run
        default = float(self.flux_scale if self.family.cfg == "calls" else self.pipe.guidance_scale)
        if not self.controls:
            plan = self._uniform_plan
            if plan is None or plan.default != default or len(plan.mask) != b:
                plan = self._uniform_plan = Plan((True,) * b, (default,) * b, default)
            self._plan_cache = (self.step, plan)
            return plan
        mask = [True] * b
        scale = [default] * b
        setter = None
        for p in self.controls:
            m, s = p.guidance(self, self.step, b)
            if m is not None:
                m = [bool(m)] * b if isinstance(m, bool) else [bool(v) for v in m]
                mask = [a and c for a, c in zip(mask, m)]
            if s is not None:
                if setter is not None:
                    raise DlxError(
                        f"two attached parts set the guidance scale ({type(setter).__name__} and "
                        f"{type(p).__name__}); attach at most one schedule"
                    )
                setter = p
                scale = [float(s)] * b if not isinstance(s, (list, tuple, torch.Tensor)) else [float(v) for v in s]
        if self.family.cfg == "calls" and any(sc != default for sc, m in zip(scale, mask) if m):
            raise DlxError(
                "guidance scale schedules are not supported on Flux true CFG: the pipeline applies "
                f"true_cfg_scale={default} itself; use masks (cutoffs, intervals) only"
            )
        plan = Plan(tuple(mask), tuple(scale), default)
        self._plan_cache = (self.step, plan)
        return plan

    def count_nfe(self, batch: int, cond: bool, uncond=None):
        """Add one call's denoiser evaluations, per sample: the conditional row of every sample
        (if ``cond``) and the unconditional rows where ``uncond`` (per-sample bools) is True.
        Plain Python on the per-step hot path: no tensor ops, no device work."""
        key = (batch, cond, uncond if uncond is None or isinstance(uncond, tuple) else tuple(uncond))
        hit = self._nfe_per.get(key)
        if hit is None:
            per = [(1.0 if cond else 0.0) + (1.0 if uncond is not None and uncond[j] else 0.0) for j in range(batch)]
            hit = self._nfe_per[key] = (per, sum(per) / batch)
        per, mean = hit
        nfe = self.nfe
        if nfe is None or len(nfe) != batch:
            self.nfe = list(per)
        else:
            self.nfe = [a + b for a, b in zip(nfe, per)]
        step_nfe = self.step_nfe
        while len(step_nfe) <= self.step:
            step_nfe.append(0.0)
        step_nfe[self.step] += mean

    def observe(self, call: DenoiserCall):
        for p in self.call_observers:
            p.on_denoiser(self, call)

    def stop(self, reason: str):
        """Ask the pipeline to stop after this step (``pipe._interrupt``); the trace says why."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.pipe._interrupt = True

    # -- step end, called through the chained callback ------------------------------------------
    def step_end(self, step, timestep, callback_kwargs, user_cb):
        if self.pending_cond is not None:  # Flux without true CFG: the cond call was all there was
            x, pred, t = self.pending_cond
            self.pending_cond = None
            self.observe(DenoiserCall(step, t, x, pred, None, pred, (False,) * pred.shape[0], 1.0))
        self.marks.append(self._mark())
        plans = self.step_plans
        while len(plans) <= step:
            plans.append(None)
        cached = self._plan_cache
        if cached is not None and cached[0] == step:
            plans[step] = cached[1]
        for p in self.step_parts:
            callback_kwargs = p.on_step_end(self, step, timestep, callback_kwargs)
        if user_cb is not None:
            callback_kwargs = user_cb(self.pipe, step, timestep, callback_kwargs)
        for p in self.step_observers:
            callback_kwargs = p.on_step_end(self, step, timestep, callback_kwargs)
        self.step = step + 1
        return callback_kwargs

    def step_ms(self) -> list[float]:
        """Wall time of each step in ms: CUDA events (one sync, at the end) or perf_counter."""
        m = self.marks
        if len(m) < 2:
            return []
        if self.cuda:
            m[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(m[:-1], m[1:])]
        return [(b - a) * 1e3 for a, b in zip(m[:-1], m[1:])]

    def t_of(self, step: int) -> float:
        """Scheduler timestep of loop step ``step`` (host copy: no device sync)."""
        ts = self.timesteps
        return float(ts[step]) if ts is not None and step < len(ts) else float("nan")

    def sigma(self, step: int) -> float:
        sig = self.sigmas
        return sig[step] if sig is not None and step < len(sig) else float("nan")


def _overrides(part: Part, name: str) -> bool:
    """Whether ``part`` has its own ``name`` hook (the base class's hooks do nothing)."""
    return name in vars(part) or getattr(type(part), name) is not getattr(Part, name)


class _Chain:
    """The callback the pipeline sees: parts, then the caller's callback, then observers."""

    def __init__(self, run: Run, user_cb, tensor_inputs: list[str]):
        self.run = run
        self.user_cb = user_cb
        self.tensor_inputs = tensor_inputs

    def __call__(self, pipe, step, timestep, callback_kwargs):
        return self.run.step_end(step, timestep, callback_kwargs, self.user_cb)


def ip_adapter_processors(pipe, family: Family) -> list:
    """Attention processors carrying an IP-Adapter ``scale`` list (empty without an adapter).

    Walking ``attn_processors`` visits every module (milliseconds on an SD1.5 UNet), so it is
    skipped when the denoiser has no image projection, i.e. no IP-Adapter is loaded.
    """
    den = getattr(pipe, family.denoiser, None)
    if den is None or getattr(den, "encoder_hid_proj", True) is None or not hasattr(den, "attn_processors"):
        return []
    return [p for p in den.attn_processors.values() if isinstance(getattr(p, "scale", None), list)]


class _Session:
    def __init__(self, pipe, parts):
        self.pipe = pipe
        self.family = family_of(pipe)
        self.parts = list(parts)

    def call(self, orig_call, pipe, args, kwargs):
        user_cb = kwargs.pop("callback_on_step_end", None)
        user_inputs = kwargs.pop("callback_on_step_end_tensor_inputs", None)
        if user_cb is not None and hasattr(user_cb, "tensor_inputs") and user_inputs is None:
            user_inputs = list(user_cb.tensor_inputs)
        elif user_cb is not None and user_inputs is None:
            user_inputs = ["latents"]  # diffusers' default for callback_on_step_end
        inputs: list[str] = []
        for name in [*(user_inputs or []), *(n for p in self.parts for n in p.tensor_inputs)]:
            if name not in inputs:
                inputs.append(name)
        check_tensor_inputs(pipe, inputs)

        run = Run(self, pipe, kwargs)
        saved = {k: pipe.__dict__[k] for k in ("_guidance_scale", "_interrupt") if k in pipe.__dict__}
        run.ip_processors = ip_adapter_processors(pipe, self.family)
        ip_scales = [(p, list(p.scale)) for p in run.ip_processors]
        tap = Tap(run)
        Run._active[id(pipe)] = run
        try:
            for p in self.parts:
                p.on_run_start(run)
            tap.install()
            kwargs["callback_on_step_end"] = _Chain(run, user_cb, inputs)
            kwargs["callback_on_step_end_tensor_inputs"] = inputs
            return orig_call(pipe, *args, **kwargs)
        except BaseException as e:
            run.error = e
            raise
        finally:
            tap.remove()
            Run._active.pop(id(pipe), None)
            try:
                for p in self.parts:
                    p.on_run_end(run, run.error)
            finally:
                for proc, scale in ip_scales:
                    proc.scale = scale
                for k in ("_guidance_scale", "_interrupt"):
                    if k in saved:
                        pipe.__dict__[k] = saved[k]
                    else:
                        pipe.__dict__.pop(k, None)


@contextlib.contextmanager
def attach(pipe, *parts: Part):
    """Run every call of ``pipe`` inside the block with ``parts`` attached.

    Order at each step end: controls and other parts in the order given, then the caller's own
    ``callback_on_step_end``, then observers (recorders, previews). The pipeline is restored on
    exit, also when a call raises.
    """
    for p in parts:
        if not isinstance(p, Part):
            raise DlxError(f"attach() takes dlx parts (Recorder, CFGCutoff, ...); got {p!r}")
    cls = type(pipe)
    if getattr(cls, "_dlx_session", None) is not None:
        raise DlxError(f"this {cls.__name__} is already attached to a dlx block; attach all parts at once")
    session = _Session(pipe, parts)
    orig_call = cls.__call__

    def __call__(self, *args, **kwargs):
        return session.call(orig_call, self, args, kwargs)

    swapped = type(cls.__name__, (cls,), {
        "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "_dlx_session": session,
    })
    object.__setattr__(pipe, "__class__", swapped)
    try:
        yield session
    finally:
        object.__setattr__(pipe, "__class__", cls)
