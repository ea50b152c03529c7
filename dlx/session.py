"""Attaching parts (recorders, guidance controls, interrupts, previews) to a pipeline: the run protocol.

``with dlx.attach(pipe, *parts): pipe(...)`` runs every call of ``pipe`` inside the block with
the parts. A *part* is anything attached: an instance of a ``Part`` subclass. *Controls* are the
parts that decide guidance (they implement ``guidance``); other parts record (``Recorder``),
show (``Preview``) or stop the run (``Interrupt``). Parts that must see each step's final
latents set ``runs_last``: recorders, previews and ``Interrupt``. The protocol between a
pipeline call, the denoiser tap (``dlx._tap``) and the parts is this:

Events, in order, each a method of ``Part`` (override what you need):

====================  ==========================================================================
``on_run_start(run)``  before the pipeline call. ``run.pipe``, ``run.family``, ``run.call`` (the
                       call's arguments, defaults filled in) are known; nothing else.
``on_loop_start(run)`` at the first denoiser call, before it is evaluated. Now also
                       ``run.num_steps``, ``run.batch`` (samples, not CFG rows),
                       ``run.timesteps`` and ``run.sigmas`` (of the steps that run). Check
                       per-sample arguments here: no denoiser evaluation has happened yet.
``guidance(run, step)`` (controls) once per step, before the denoiser: return a ``Guide``, the
                       per-sample plan (``mask``: which samples are guided; ``scale``: at which
                       scale; None leaves either as it is). Masks of all parts combine by AND; at
                       most one part sets scales (``sets_scale = True``; checked at attach).
``on_denoiser(run, call)`` (parts with ``wants_calls``) after each denoiser evaluation, with a
                       ``DenoiserCall`` (cond, uncond, guided prediction, mask, scale).
``on_step_end(run, step, timestep, callback_kwargs)`` after the scheduler step, as diffusers'
                       ``callback_on_step_end``: return the (possibly changed) dict. Parts in
                       the order given, then the caller's own callback, then the parts with
                       ``runs_last`` (in the order given).
``on_run_end(run, error)`` in ``finally``: the other parts first, those with ``runs_last`` after;
                       every part's end runs even when another's raises.
====================  ==========================================================================

What a part may read from ``run`` at any event: the attributes above, ``run.step`` (the step in
progress), ``run.sigma(i)`` / ``run.t_of(i)``, ``run.plans`` (the plan of every finished step),
``run.nfe`` (per-sample nominal denoiser evaluations so far), ``run.evaluations`` (sample-rows the
denoiser really evaluated), ``run.cfg_seen`` (the pipeline ran CFG on some step),
``run.stop_reason``. A part changes the run only through its return
values, ``run.stop(reason)`` and (controls) the pipeline's documented callback tensors.

A part instance belongs to one run at a time: using it in two calls at once is refused.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from . import _diffusers as D
from ._tap import DenoiserCall, Tap
from .errors import DlxError
from .families import Family, check_tensor_inputs, family_of, sigmas_at

__all__ = ["attach", "Part", "Run", "Guide", "Plan"]


class Guide(NamedTuple):
    """A control's plan for one step: ``mask`` (per-sample bools: guided or not) and ``scale``
    (per-sample guidance scales); None leaves the other parts' or the pipeline's value."""

    mask: Sequence[bool] | None = None
    scale: Sequence[float] | None = None


class Part:
    """Base of everything that can be attached (see the module docstring for the protocol).

    ``__call__`` has diffusers' ``callback_on_step_end`` signature: inside an attached call it is
    the part's ``on_step_end``; as a plain callback it is ``on_plain_step_end``, which parts that
    can work without the denoiser tap (recorder, interrupt, latent previews) implement.
    """

    #: callback tensors the part reads at step end (checked against the pipeline before the call)
    tensor_inputs: list[str] = []
    #: the part's step end runs after the other parts' and the caller's callback (it sees each
    #: step's final latents: recorders, previews, Interrupt), and its run end after theirs
    runs_last: bool = False
    #: the part wants ``DenoiserCall`` events through ``on_denoiser``
    wants_calls: bool = False
    #: the part sets guidance scales (at most one such part per block)
    sets_scale: bool = False

    def on_run_start(self, run: "Run") -> None:
        """Before the pipeline call."""

    def on_loop_start(self, run: "Run") -> None:
        """At the first denoiser call, before it runs: steps, batch and schedule are known."""

    def guidance(self, run: "Run", step: int) -> Guide | None:
        """The per-sample plan of ``step`` (controls); None: no opinion."""
        return None

    def unguided_after(self, run: "Run", step: int) -> bool:
        """True when this part guides no sample at any step after ``step`` (lets the run take the
        pipeline out of CFG for the tail). Only controls that know it say True."""
        return False

    def on_denoiser(self, run: "Run", call: DenoiserCall) -> None:
        """After each denoiser evaluation (parts with ``wants_calls``)."""

    def on_step_end(self, run: "Run", step: int, timestep, callback_kwargs: dict) -> dict:
        """After the scheduler step; return ``callback_kwargs`` (changed or not)."""
        return callback_kwargs

    def on_run_end(self, run: "Run", error: BaseException | None) -> None:
        """In ``finally``; ``error`` is what the call raised (None: it returned)."""

    def on_plain_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """Used as a plain ``callback_on_step_end`` (not attached)."""
        raise DlxError(
            f"{type(self).__name__} acts inside the denoiser and must be attached: "
            f"`with dlx.attach(pipe, {type(self).__name__}(...)): pipe(...)`"
        )

    def config(self) -> dict:
        """``{"type": ..., "args": {...}}``: the part's constructor arguments as JSON (see
        ``dlx.part_from_config``); ``"rebuildable": False`` when one cannot be rebuilt."""
        from .parts import default_config

        return default_config(self)

    def __call__(self, pipe, step, timestep, callback_kwargs):
        run = Run.current(pipe)
        if run is not None and self in run.parts:
            return self.on_step_end(run, step, timestep, callback_kwargs)
        return self.on_plain_step_end(pipe, step, timestep, callback_kwargs)


@dataclass(eq=False)
class Plan:
    """Guidance for one step: per-sample mask and scale, and the pipeline's own scale. Treat as
    immutable: a run reuses one plan for every step whose guidance does not change."""

    mask: tuple[bool, ...]
    scale: tuple[float, ...]
    default: float  # the pipeline's own scale

    @functools.cached_property
    def passthrough(self) -> bool:
        """Every sample guided at the pipeline's scale: the pipeline's own CFG does the step."""
        return all(self.mask) and all(s == self.default for s in self.scale)

    @functools.cached_property
    def any_guided(self) -> bool:
        return any(self.mask)

    def scale_rows(self, rows, like: torch.Tensor):
        vals = [self.scale[i] for i in rows]
        if all(v == vals[0] for v in vals):
            return vals[0]
        return torch.tensor(vals, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))

    def scale_value(self):
        """The scale as a float when uniform, else a per-sample CPU tensor (for parts reading calls)."""
        if all(s == self.scale[0] for s in self.scale):
            return self.scale[0]
        return torch.tensor(self.scale, dtype=torch.float32)

    def same(self, mask, scale, default) -> bool:
        return self.mask == mask and self.scale == scale and self.default == default


class Layout(NamedTuple):
    """Which samples a step evaluates when ``dlx.Share`` groups equal ones: ``reps`` (one sample
    per group, ascending) and ``expand`` (for each sample, the position of its group in ``reps``)."""

    reps: tuple[int, ...]
    expand: tuple[int, ...]


# Part instances in a running call, and denoisers tapped by an attach block: two threads must not
# share either (a part's per-run state, a denoiser's forward).
_LOCK = threading.Lock()
_PARTS_IN_USE: dict[int, "Run"] = {}
_TAPPED: dict[int, str] = {}


class Run:
    """One pipeline call made inside an ``attach`` block (read-only for parts; see the module
    docstring for what is known at each event)."""

    def __init__(self, session: "_Session", pipe, call: dict):
        self.session = session
        self.pipe = pipe
        self.family: Family = session.family
        self.parts: list[Part] = session.parts
        self.call = call
        self.thread = threading.get_ident()
        self.step = 0
        self.num_steps: int | None = None
        self.batch: int | None = None
        self.timesteps: list[float] | None = None
        self.sigmas: list[float] | None = None
        self.loop_started = False
        self.stop_reason: str | None = None
        self.error: BaseException | None = None
        self.nfe: list[float] | None = None  # per sample, nominal, summed over the run
        self.step_nfe: list[list[float]] = []  # per step, per sample
        self.evaluations = 0  # sample-rows the denoiser evaluated (Share: fewer than nominal)
        self.step_evaluations: list[int] = []
        self.plans: list[Plan | None] = []  # the plan of every finished step
        self.device: torch.device | None = None
        self.cuda = False
        self.ip_processors: list = []
        self.marks: list = []  # step-boundary marks: CUDA events or perf_counter values
        self.call_marks: dict = {}  # "start" / "return": (perf_counter, CUDA event or None)
        self.switched_at: int | None = None  # the step after which the pipeline left CFG
        self.cfg_seen = False  # the pipeline ran CFG (a doubled batch, Flux's second call) on some step
        self.in_callback = False
        self.loop_flags: dict | None = None  # _guidance_scale / _interrupt as the call set them
        # dispatch lists, fixed for the run
        self.call_parts = [p for p in self.parts if p.wants_calls]
        self.wants_calls = bool(self.call_parts)
        self.step_parts = [p for p in self.parts if not p.runs_last and _overrides(p, "on_step_end")]
        self.last_parts = [p for p in self.parts if p.runs_last and _overrides(p, "on_step_end")]
        self.controls = [p for p in self.parts if _overrides(p, "guidance")]
        self.share = session.share
        self._tail_parts = [p for p in self.parts if _overrides(p, "unguided_after")]
        self._plan_cache: tuple[int, Plan] | None = None
        self._last_plan: Plan | None = None
        self._nfe_per: dict = {}
        self._groups: list | None = None  # Share: each sample's history id
        self._layout_cache: tuple[int, Layout | None] | None = None
        self._switch_names: tuple[str, ...] = ()
        self._switch_default: float | None = None
        self._flush = None  # the tap's end-of-step work (Flux's pending cond call)
        self._untap = None  # removes the tap (set by it): the unguided tail may run without it
        self.untapped_at: int | None = None  # the step after which the tap was removed

    # -- reading -----------------------------------------------------------------------------
    @classmethod
    def current(cls, pipe) -> "Run | None":
        """The run of ``pipe``'s call in progress inside an attach block (None outside one)."""
        session = type(pipe).__dict__.get("_dlx_session")
        return session.run if session is not None else None

    @property
    def call_kwargs(self) -> dict:  # older name of ``call``
        return self.call

    def t_of(self, step: int) -> float:
        """Scheduler timestep of loop step ``step`` (host copy: no device sync)."""
        ts = self.timesteps
        return float(ts[step]) if ts is not None and step < len(ts) else float("nan")

    def sigma(self, step: int) -> float:
        sig = self.sigmas
        return sig[step] if sig is not None and step < len(sig) else float("nan")

    def stop(self, reason: str):
        """Ask the pipeline to stop after this step (its interrupt flag); the trace says why."""
        if self.stop_reason is None:
            self.stop_reason = reason
        D.set_interrupt(self.pipe, True)

    # -- events from the tap -----------------------------------------------------------------
    def loop_start(self, x: torch.Tensor, batch: int, t_arg) -> None:
        """The first denoiser call: learn steps, batch, device and the schedule that runs."""
        self.loop_started = True
        self.device = x.device
        self.cuda = x.device.type == "cuda"
        self.batch = batch
        pipe = self.pipe
        self.loop_flags = {k: pipe.__dict__.get(k, D.MISSING) for k in (D.GUIDANCE_SCALE, D.INTERRUPT)}
        n = int(getattr(pipe, "num_timesteps", 0) or 0)
        if not n:
            raise DlxError(f"{type(pipe).__name__} did not set num_timesteps before its loop")
        self.num_steps = n
        # One CPU copy of the schedule (one device sync, here at the start), then no more.
        ts = pipe.scheduler.timesteps.detach().float().cpu().tolist()
        self.timesteps = ts[self._offset(ts, n, t_arg):][:n]
        self.sigmas = sigmas_at(self.family, pipe.scheduler, self.timesteps)
        self._groups = self.share.initial_groups(self) if self.share is not None else None
        for p in self.parts:
            p.on_loop_start(self)
        self.marks.append(self._mark())

    def _offset(self, ts: list[float], n: int, t_arg) -> int:
        """Where in ``scheduler.timesteps`` the loop's ``n`` steps start: the tail for img2img
        (``strength``, ``denoising_start``), the head for ``denoising_end``: found from the first
        denoiser call's timestep."""
        last = len(ts) - n
        if last <= 0:
            return 0
        t0 = None
        if isinstance(t_arg, torch.Tensor) and t_arg.numel():
            t0 = float(t_arg.reshape(-1)[0]) * self.family.timestep_scale
        elif isinstance(t_arg, (int, float)):
            t0 = float(t_arg) * self.family.timestep_scale
        if t0 is None:
            return last
        return min(range(last + 1), key=lambda o: (abs(ts[o] - t0), -o))

    def plan(self) -> Plan:
        """The plan of the step in progress (computed once per step)."""
        cached = self._plan_cache
        step = self.step
        if cached is not None and cached[0] == step:
            return cached[1]
        b = self.batch
        default = self.default_scale()
        self.cfg_seen = True
        if self.switched_at is not None:
            mask, scale, default = (False,) * b, (self._switch_default,) * b, self._switch_default
        elif not self.controls:
            mask, scale = (True,) * b, (default,) * b
        else:
            m = [True] * b
            scale = None
            for p in self.controls:
                g = p.guidance(self, step)
                if g is None:
                    continue
                if g.mask is not None:
                    m = [a and bool(c) for a, c in zip(m, g.mask)]
                if g.scale is not None:
                    scale = tuple(float(v) for v in g.scale)
            mask = tuple(m)
            scale = scale if scale is not None else (default,) * b
        return self._set_plan(mask, scale, default)

    def unguided_plan(self) -> Plan:
        """The plan of a step the pipeline runs without its CFG batch."""
        cached = self._plan_cache
        if cached is not None and cached[0] == self.step:
            return cached[1]
        b = self.batch
        d = self._switch_default if self.switched_at is not None else self.default_scale()
        return self._set_plan((False,) * b, (d,) * b, d)

    def _set_plan(self, mask, scale, default) -> Plan:
        last = self._last_plan
        plan = last if last is not None and last.same(mask, scale, default) else Plan(mask, scale, default)
        self._last_plan = plan
        self._plan_cache = (self.step, plan)
        return plan

    def default_scale(self) -> float:
        """The pipeline's own scale, read each step (a callback may change it mid-run)."""
        if self.family.cfg == "calls":
            return float(self.call.get("true_cfg_scale", 1.0) or 1.0)
        return float(self.pipe.guidance_scale)

    def layout(self, plan: Plan) -> Layout | None:
        """``dlx.Share``: the samples to evaluate this step, or None when every sample is its own."""
        if self._groups is None:
            return None
        cached = self._layout_cache
        if cached is not None and cached[0] == self.step:
            return cached[1]
        ids: dict = {}
        groups = []
        for j, h in enumerate(self._groups):
            groups.append(ids.setdefault((h, plan.mask[j], plan.scale[j]), len(ids)))
        self._groups = groups
        lay = None
        if len(ids) < len(groups):
            first: dict[int, int] = {}
            for j, g in enumerate(groups):
                first.setdefault(g, j)
            reps = tuple(sorted(first.values()))
            pos = {r: i for i, r in enumerate(reps)}
            lay = Layout(reps, tuple(pos[first[g]] for g in groups))
        self._layout_cache = (self.step, lay)
        return lay

    def count(self, rows: int, cond: bool, uncond=None) -> None:
        """One denoiser call: ``rows`` sample-rows evaluated; nominally each sample's conditional
        row (``cond``) and its unconditional row where ``uncond`` (per-sample bools) is True.
        Plain Python on the per-step hot path: no tensor ops, no device work."""
        b = self.batch
        key = (cond, uncond)
        per = self._nfe_per.get(key)
        if per is None:
            per = self._nfe_per[key] = tuple(
                (1.0 if cond else 0.0) + (1.0 if uncond is not None and uncond[j] else 0.0) for j in range(b))
        self.nfe = list(per) if self.nfe is None else [a + c for a, c in zip(self.nfe, per)]
        self.evaluations += rows
        step, sn, se = self.step, self.step_nfe, self.step_evaluations
        while len(sn) <= step:
            sn.append([0.0] * b)
            se.append(0)
        sn[step] = [a + c for a, c in zip(sn[step], per)]
        se[step] += rows

    def observe(self, call: DenoiserCall) -> None:
        for p in self.call_parts:
            p.on_denoiser(self, call)

    # -- step end (the callback the pipeline sees) ---------------------------------------------
    def step_end(self, step, timestep, callback_kwargs, user_cb):
        self.in_callback = True  # a denoiser call from here (another pipeline sharing it) is not ours
        try:
            return self._step_end(step, timestep, callback_kwargs, user_cb)
        finally:
            self.in_callback = False

    def _step_end(self, step, timestep, callback_kwargs, user_cb):
        if self._flush is not None:
            self._flush()
        if self.untapped_at is not None:  # the tail without the tap: the step's one plain call
            self.unguided_plan()
            self.count(self.batch, cond=True)
        self.marks.append(self._mark())
        plans = self.plans
        while len(plans) <= step:
            plans.append(None)
        cached = self._plan_cache
        if cached is not None and cached[0] == step:
            plans[step] = cached[1]
        for p in self.step_parts:
            callback_kwargs = p.on_step_end(self, step, timestep, callback_kwargs)
        if user_cb is not None:
            out = user_cb(self.pipe, step, timestep, dict(callback_kwargs))
            if not isinstance(out, dict):
                raise DlxError(
                    f"callback_on_step_end must return a dict (diffusers pops the changed tensors from it); "
                    f"{user_cb!r} returned {type(out).__name__} at step {step}")
            # diffusers keeps what a callback leaves out (``pop(name, current)``): so do the last parts
            callback_kwargs = {**callback_kwargs, **out}
        for p in self.last_parts:
            callback_kwargs = p.on_step_end(self, step, timestep, callback_kwargs)
        if self._switch_names and self.switched_at is None and step + 1 < self.num_steps:
            self._maybe_leave_cfg(step, callback_kwargs)
        self.step = step + 1
        return callback_kwargs

    def _maybe_leave_cfg(self, step: int, kw: dict) -> None:
        """When no sample is guided after ``step``, take the pipeline out of CFG as diffusers'
        cutoff callbacks do (guidance scale 0, the doubled callback tensors halved with
        ``chunk(2)[1]``): the tail then costs the pipeline's own unguided loop, no tap work."""
        pipe = self.pipe
        if getattr(pipe, "interrupt", False) or not getattr(pipe, "do_classifier_free_guidance", False):
            return
        if not any(p.unguided_after(self, step) for p in self._tail_parts):
            return
        b2 = 2 * self.batch
        doubled = lambda v: isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == b2  # noqa: E731
        required = self.family.cfg_switch
        if not all(doubled(kw.get(n)) for n in required):
            return  # e.g. a list of ControlNet images, or tensors a callback changed: keep the tap
        for name in self._switch_names:
            v = kw.get(name)
            if name in required or doubled(v):
                kw[name] = v.chunk(2)[1]
        self._switch_default = self.default_scale()
        D.set_guidance_scale(pipe, 0.0)
        self.switched_at = step
        if not self.wants_calls and self.share is None and self._untap is not None:
            # Nothing reads the tail's denoiser calls: they run as the pipeline's own, without
            # the tap's host work (one plain call per step, counted at step end), so an unguided
            # call costs the host what diffusers' own cutoff callback leaves it.
            self._untap()
            self.untapped_at = step

    # -- clocks --------------------------------------------------------------------------------
    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def mark_call(self, name: str) -> None:
        ev = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
        self.call_marks[name] = (time.perf_counter(), ev)

    def step_ms(self) -> list[float]:
        """Wall time of each step in ms: CUDA events (one wait, at the end) or perf_counter."""
        m = self.marks
        if len(m) < 2:
            return []
        if self.cuda:
            m[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(m[:-1], m[1:])]
        return [(b - a) * 1e3 for a, b in zip(m[:-1], m[1:])]

    def call_timing(self) -> dict:
        """``encode_ms`` (call start to the first denoiser call), ``loop_ms`` (to the last step's
        end), ``decode_ms`` (to the return) and ``call_ms``: CUDA events on a GPU, read after the
        end of the run (no extra wait), else perf_counter. NaN where a boundary was not reached."""
        nan = float("nan")
        out = {"encode_ms": nan, "loop_ms": nan, "decode_ms": nan, "call_ms": nan}
        start, ret = self.call_marks.get("start"), self.call_marks.get("return")
        if start is None or ret is None:
            return out
        if self.cuda:
            s, r = start[1], ret[1]
            if s is None or r is None:
                return out
            r.synchronize()
            el = lambda a, b: a.elapsed_time(b)  # noqa: E731
        else:
            s, r = start[0], ret[0]
            el = lambda a, b: (b - a) * 1e3  # noqa: E731
        out["call_ms"] = el(s, r)
        if self.marks:
            first, last = self.marks[0], self.marks[-1]
            out["encode_ms"] = el(s, first)
            out["loop_ms"] = el(first, last)
            out["decode_ms"] = el(last, r)
        return out


def _overrides(part: Part, name: str) -> bool:
    """Whether ``part`` has its own ``name`` hook (the base class's hooks do nothing)."""
    return name in vars(part) or getattr(type(part), name) is not getattr(Part, name)


class _Chain:
    """The callback the pipeline sees: parts, then the caller's callback, then ``runs_last`` parts."""

    def __init__(self, run: Run, user_cb, tensor_inputs: list[str]):
        self.run = run
        self.user_cb = user_cb
        self.tensor_inputs = tensor_inputs

    def __call__(self, pipe, step, timestep, callback_kwargs):
        return self.run.step_end(step, timestep, callback_kwargs, self.user_cb)


@functools.lru_cache(maxsize=64)
def _signature(fn):
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def bind_call(orig_call, pipe, args, kwargs) -> dict:
    """The call's arguments by name, the pipeline's defaults filled in."""
    sig = _signature(orig_call)
    if sig is None:
        return dict(kwargs)
    try:
        bound = sig.bind(pipe, *args, **kwargs)
    except TypeError:
        return dict(kwargs)  # the pipeline will say what is wrong
    bound.apply_defaults()
    out = {}
    for name, value in list(bound.arguments.items())[1:]:
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif sig.parameters[name].kind is not inspect.Parameter.VAR_POSITIONAL:
            out[name] = value
    return out


class _Session:
    def __init__(self, pipe, parts):
        self.pipe = pipe
        self.family = family_of(pipe)
        self.parts = list(parts)
        self.run: Run | None = None
        shares = [p for p in self.parts if getattr(p, "is_share", False)]
        if len(shares) > 1:
            raise DlxError(f"attach at most one dlx.Share; got {len(shares)}")
        self.share = shares[0] if shares else None
        setters = [p for p in self.parts if p.sets_scale]
        if len(setters) > 1:
            raise DlxError(
                f"two attached parts set the guidance scale ({type(setters[0]).__name__} and "
                f"{type(setters[1]).__name__}); attach at most one schedule"
            )
        if setters and not self.family.scale_schedules:
            raise DlxError(
                f"guidance scale schedules are not supported on {self.family.name} "
                f"({type(setters[0]).__name__}): the pipeline applies its scale itself; use masks "
                f"(cutoffs, intervals) only"
            )
        if self.share is not None and not self.family.share:
            raise DlxError(f"dlx.Share is not supported on {self.family.name} pipelines (two denoiser calls per step)")

    def modules(self) -> list:
        mods = [getattr(self.pipe, self.family.denoiser, None)]
        mods += [getattr(self.pipe, n, None) for n in self.family.extra_doubled_modules]
        return [m for m in mods if m is not None]

    def call(self, orig_call, pipe, args, kwargs):
        if self.run is not None:
            raise DlxError(
                f"{type(pipe).__name__} is already running a call inside this dlx block (a call from "
                f"a callback or another thread); one call at a time"
            )
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
        order = D.scheduler_order(pipe.scheduler)
        if order > 1:
            raise DlxError(
                f"{type(pipe.scheduler).__name__} is a second-order scheduler ({order} denoiser evaluations "
                f"per step, and a loop of 2N − 1 iterations): dlx cannot count or cut whole steps of it; "
                f"use a first-order scheduler (Euler, DDIM, DPM-Solver++)"
            )
        call = bind_call(orig_call, pipe, args, kwargs)
        run = Run(self, pipe, call)
        with _LOCK:
            busy = [p for p in self.parts if id(p) in _PARTS_IN_USE]
            if busy:
                raise DlxError(
                    f"{busy[0]!r} is in use by another running pipeline call; a part holds one run's state: "
                    f"create one instance per concurrent run"
                )
            for p in self.parts:
                _PARTS_IN_USE[id(p)] = run
        try:
            self._prepare_switch(run, call, inputs)
            saved = D.saved_flags(pipe)
            run.ip_processors = D.ip_adapter_processors(getattr(pipe, self.family.denoiser, None))
            ip_scales = [(p, list(p.scale)) for p in run.ip_processors]
            tap = Tap(run)
            started: list[Part] = []
            self.run = run
            run.mark_call("start")
            try:
                for p in self.parts:
                    p.on_run_start(run)
                    started.append(p)
                tap.install()
                kwargs["callback_on_step_end"] = _Chain(run, user_cb, inputs)
                kwargs["callback_on_step_end_tensor_inputs"] = inputs
                return orig_call(pipe, *args, **kwargs)
            except BaseException as e:
                run.error = e
                raise
            finally:
                run.mark_call("return")
                tap.remove()
                self.run = None
                try:
                    _end_parts(run, started)
                finally:
                    for proc, scale in ip_scales:
                        proc.scale = scale
                    if run.loop_flags is not None:  # as the call set them: a plain call leaves them so
                        D.restore_flags(pipe, run.loop_flags)
                    else:
                        D.restore_flags(pipe, saved)
        finally:
            with _LOCK:
                for p in self.parts:
                    if _PARTS_IN_USE.get(id(p)) is run:
                        del _PARTS_IN_USE[id(p)]

    def _prepare_switch(self, run: Run, call: dict, inputs: list[str]) -> None:
        """Decide before the call whether an unguided tail may take the pipeline out of CFG, and
        ask for the doubled callback tensors that switch needs."""
        fam = self.family
        if not fam.cfg_switch or not run._tail_parts:
            return
        exposed = D.callback_tensor_inputs(self.pipe)
        if not all(n in exposed for n in fam.cfg_switch):
            return  # e.g. SD3 img2img exposes no pooled embeddings: the tap keeps every step
        if call.get("ip_adapter_image") is not None or call.get("ip_adapter_image_embeds") is not None:
            return  # the IP-Adapter image embeddings are doubled in locals no callback can reach
        if call.get("skip_guidance_layers") is not None:
            return  # SD3 skip-layer guidance runs only inside the pipeline's CFG branch
        names = list(fam.cfg_switch) + [n for n in fam.cfg_switch_also if n in exposed]
        run._switch_names = tuple(names)
        for n in names:
            if n not in inputs:
                inputs.append(n)


def _end_parts(run: Run, parts: list[Part]) -> None:
    """``on_run_end`` of every part, those with ``runs_last`` after the others; each runs even when
    another raises. The first such error is raised after all ran, unless the call itself raised
    (its error wins; the others are attached to it as notes)."""
    errors = []
    for p in [p for p in parts if not p.runs_last] + [p for p in parts if p.runs_last]:
        try:
            p.on_run_end(run, run.error)
        except BaseException as e:  # noqa: BLE001 - every part's end must run
            errors.append((p, e))
    if not errors:
        return
    if run.error is not None:
        for p, e in errors:
            if hasattr(run.error, "add_note"):
                run.error.add_note(f"dlx: {type(p).__name__}.on_run_end also raised {type(e).__name__}: {e}")
        return
    raise errors[0][1]


@contextlib.contextmanager
def attach(pipe, *parts: Part):
    """Run every call of ``pipe`` inside the block with ``parts`` attached.

    At each step end: the parts in the order given, then the caller's own
    ``callback_on_step_end``, then the parts with ``runs_last`` (recorders, previews, ``Interrupt``).

    What changes on the pipeline, and when:

    * for the whole block, the instance's class is a subclass whose ``__call__`` wraps the
      original (``type(pipe)`` is restored on exit);
    * during each call: ``forward`` of the denoiser (and of a ControlNet) is replaced by the tap
      (``cache_context`` too on Flux); the call's ``callback_on_step_end`` is a chain around the
      caller's own, with the callback tensors the parts need added; parts may set the
      pipeline's interrupt flag (``Interrupt``) and IP-Adapter scales (``IPAdapterCutoff``); when
      no sample is guided for the rest of the run the guidance scale is set to 0 and the
      doubled callback tensors halved, as diffusers' cutoff callbacks do.

    After each call, also when it raises, the tap is removed, IP-Adapter scales are put back,
    and the guidance scale and interrupt flag are as the call itself set them (as after a plain
    call; as before the call if it failed before its loop). Two blocks may not tap one denoiser
    at once (pipelines built from shared components): the second is refused.
    """
    for p in parts:
        if not isinstance(p, Part):
            raise DlxError(f"attach() takes dlx parts (Recorder, CFGCutoff, ...); got {p!r}")
    if len({id(p) for p in parts}) != len(parts):
        raise DlxError("attach() got the same part twice")
    cls = type(pipe)
    try:
        family_of(pipe)
    except DlxError as e:
        raise DlxError(f"argument `pipe` ({cls.__name__}): {e}") from None
    if getattr(cls, "_dlx_session", None) is not None:
        raise DlxError(f"this {cls.__name__} is already attached to a dlx block; attach all parts at once")
    session = _Session(pipe, parts)
    mods = session.modules()
    with _LOCK:
        taken = [_TAPPED[id(m)] for m in mods if id(m) in _TAPPED]
        if taken:
            raise DlxError(
                f"the {session.family.denoiser} of this {cls.__name__} is already tapped by another dlx block "
                f"(on a {taken[0]} sharing it); two blocks cannot tap one denoiser at once: end that "
                f"block first, or attach to one pipeline"
            )
        for m in mods:
            _TAPPED[id(m)] = cls.__name__
    try:
        orig_call = cls.__call__

        def __call__(self, *args, **kwargs):
            return session.call(orig_call, self, args, kwargs)

        swapped = type(cls.__name__, (cls,), {
            "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "_dlx_session": session,
        })
        D.swap_class(pipe, swapped)
        try:
            yield session
        finally:
            D.swap_class(pipe, cls)
    finally:
        with _LOCK:
            for m in mods:
                _TAPPED.pop(id(m), None)

