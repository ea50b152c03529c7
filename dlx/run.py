"""``Run``: one pipeline call inside an ``attach`` block, and the bookkeeping every number comes from.

The tap (``dlx._tap``) reports to the run (loop start, each denoiser evaluation, step ends); the
run asks the controls for each step's plan and combines their guides by one rule
(``protocol.combine``), groups equal samples for ``dlx.Share`` (``layout``), keeps the clocks, and
when no sample is guided for the rest of the call takes the pipeline out of CFG the way
diffusers' cutoff callbacks do. At the end it writes the one record of the call
(``run.record``, a ``protocol.RunRecord``) that traces, controls' reports, sweep rows and the cost
model read.

Per-sample controls: ``attach(..., per_sample=[[controls of sample 0], ...], scales=[...])``
gives each sample its own controls, asked with the run as that sample alone sees it
(``RunInfo.sample(j)``: batch 1, its own scale); a sample at a scale <= 1 is never guided (a
call at that scale has no CFG) and its controls are not asked.

(Over 400 lines: one object, the run's bookkeeping; its plan, layout, counts and clocks read one
another's per-step state.)
"""

from __future__ import annotations

import threading
import time

import torch

from . import _diffusers as D
from .errors import DlxError
from .families import Family, sigmas_at
from .protocol import DenoiserCall, Guide, Layout, Part, Plan, RunInfo, RunRecord, StepRecord, combine_fields

__all__ = ["Run", "overrides"]


def overrides(part: Part, name: str) -> bool:
    """Whether ``part`` has its own ``name`` hook (the base class's hooks do nothing)."""
    return name in vars(part) or getattr(type(part), name) is not getattr(Part, name)


_UNGUIDED = Guide(mask=(False,))  # a sample at a scale <= 1


class Run:
    """One pipeline call made inside an ``attach`` block (read-only for parts; see the module
    docstring for what is known at each event)."""

    def __init__(self, session, pipe, call: dict):
        self.session = session
        self.pipe = pipe
        self.family: Family = session.family
        self.parts: list[Part] = session.parts
        self.per_sample: list[list[Part]] | None = session.per_sample
        self.sample_scales: list[float] | None = session.scales
        self.info: RunInfo | None = None
        self.record: RunRecord | None = None
        self._sample_infos: list[RunInfo] = []
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
        self.step_parts = [p for p in self.parts if not p.runs_last and overrides(p, "on_step_end")]
        self.last_parts = [p for p in self.parts if p.runs_last and overrides(p, "on_step_end")]
        self.controls = [p for p in self.parts if overrides(p, "guidance")]
        self.share = session.share
        self._tail_parts = [p for p in self.parts if overrides(p, "unguided_after")]
        self._perturb_parts = [p for p in self.parts if overrides(p, "perturbs_after")]
        self._sample_perturb = [(j, p) for j, ps in enumerate(self.per_sample or []) for p in ps
                                if overrides(p, "perturbs_after")]
        self._sample_calls = [[p for p in ps if p.wants_calls] for ps in (self.per_sample or [])]
        self.wants_calls = bool(self.call_parts) or any(self._sample_calls)
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
        if self.per_sample is not None and len(self.per_sample) != batch:
            raise DlxError(f"argument `per_sample` has {len(self.per_sample)} entries (one per sample) but the "
                           f"call has batch {batch}")
        call_scale = self.default_scale()
        if self.sample_scales is not None and len(self.sample_scales) != batch:
            raise DlxError(f"argument `scales` has {len(self.sample_scales)} values (one per sample) but the "
                           f"call has batch {batch}")
        scales = tuple(self.sample_scales) if self.sample_scales is not None else (call_scale,) * batch
        if self.sample_scales is not None and max(scales) > 1.0 and not D.cfg_on(pipe):
            raise DlxError(f"argument `scales` guides samples at {max(scales):g}, but the call's guidance_scale is "
                           f"{call_scale:g}: the pipeline builds no unconditional batch at a scale <= 1; call it "
                           f"with guidance_scale > 1 (the largest of `scales`, say)")
        self.info = RunInfo(pipe=pipe, family=self.family, call=self.call, num_steps=n, batch=batch,
                            timesteps=tuple(self.timesteps), sigmas=tuple(self.sigmas), scales=scales)
        self._sample_infos = [self.info.sample(j) for j in range(batch)]
        for p in self.parts:
            p.on_loop_start(self)
        for j, ps in enumerate(self.per_sample or []):
            for p in ps:
                p.on_loop_start(self._sample_infos[j])
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
        """The plan of the step in progress (computed once per step): every control's guide, the
        per-sample controls' too, merged by ``protocol.combine``."""
        cached = self._plan_cache
        step = self.step
        if cached is not None and cached[0] == step:
            return cached[1]
        b = self.batch
        default = self.default_scale()
        self.cfg_seen = True
        if self.switched_at is not None:
            return self._unguided(b, self._switch_default)
        scales = self.info.scales if self.sample_scales is not None else (default,) * b
        if not self.controls and self.per_sample is None and self.sample_scales is None:
            last = self._last_plan  # nothing steers: one plan for the run while the scale holds
            if last is not None and last.default == default and not last.rule and all(last.mask):
                self._plan_cache = (step, last)
                return last
            return self._set_plan(Plan((True,) * b, scales, default))
        guides = [(None, p.guidance(self, step)) for p in self.controls]
        for j in (range(b) if self.sample_scales is not None or self.per_sample is not None else ()):
            if self.sample_scales is not None and scales[j] <= 1.0:
                # no CFG at this scale: never guided, its controls never asked, as when run alone
                guides.append((j, _UNGUIDED))
            elif self.per_sample is not None:
                info = self._sample_infos[j]
                guides += [(j, p.guidance(info, step)) for p in self.per_sample[j]]
        mask, scale, rule, zero, perturb = combine_fields(b, scales, guides)
        if perturb and self.sample_scales is not None:  # a sample at a scale <= 1 gets no pass beyond its own
            perturb = tuple(p and scales[j] > 1.0 for j, p in enumerate(perturb))
            perturb = perturb if any(perturb) else ()
        last = self._last_plan
        if (last is not None and last.mask == mask and last.scale == scale and last.default == default
                and last.zero == zero and last.perturb == perturb and len(last.rule) == len(rule)
                and all(x is y for x, y in zip(last.rule, rule))):
            self._plan_cache = (step, last)  # guidance unchanged: the same plan object
            return last
        return self._set_plan(Plan(mask, scale, default, rule, zero, perturb))

    def unguided_plan(self) -> Plan:
        """The plan of a step the pipeline runs without its CFG batch."""
        cached = self._plan_cache
        if cached is not None and cached[0] == self.step:
            return cached[1]
        b = self.batch
        d = self._switch_default if self.switched_at is not None else self.default_scale()
        return self._unguided(b, d)

    def _unguided(self, b: int, d: float) -> Plan:
        """The plan that guides no sample at the pipeline's scale ``d`` (the last one reused)."""
        last = self._last_plan
        if last is not None and last.default == d and not last.any_guided and not last.rule and not last.zero \
                and not last.perturb and last.scale == (d,) * b:
            self._plan_cache = (self.step, last)
            return last
        return self._set_plan(Plan((False,) * b, (d,) * b, d))

    def _set_plan(self, plan: Plan) -> Plan:
        last = self._last_plan
        if (last is not None and last.mask == plan.mask and last.scale == plan.scale and last.default == plan.default
                and last.zero == plan.zero and last.perturb == plan.perturb and len(last.rule) == len(plan.rule)
                and all(a is c for a, c in zip(last.rule, plan.rule))):
            plan = last  # one object while guidance does not change (cached properties kept)
        self._last_plan = plan
        self._plan_cache = (self.step, plan)
        return plan

    def call_scale(self) -> float:
        """The scale the samples run at when no control sets one (``RunInfo.call_scale``)."""
        return self.info.call_scale() if self.info is not None else self.default_scale()

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
            key = plan.sample_key(j)
            if plan.rule and getattr(plan.rule[j], "stateful", plan.rule[j] is not None):
                key = (key, j)  # a rule with per-sample state (APG momentum): never shared
            groups.append(ids.setdefault((h, key), len(ids)))
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

    def count(self, rows: int, cond: bool, uncond=None, zero=()) -> None:
        """One denoiser call: ``rows`` sample-rows evaluated; nominally each sample's conditional
        row (``cond``; not for samples with ``zero``) and its unconditional row where ``uncond``
        (per-sample bools) is True. Plain Python on the per-step hot path: no tensor ops."""
        b = self.batch
        key = (cond, uncond, zero)
        per = self._nfe_per.get(key)
        if per is None:
            per = self._nfe_per[key] = tuple(
                0.0 if zero and zero[j] else
                (1.0 if cond else 0.0) + (1.0 if uncond is not None and uncond[j] else 0.0) for j in range(b))
        self.nfe = list(per) if self.nfe is None else [a + c for a, c in zip(self.nfe, per)]
        self.evaluations += rows
        step, sn, se = self.step, self.step_nfe, self.step_evaluations
        while len(sn) <= step:
            sn.append([0.0] * b)
            se.append(0)
        sn[step] = [a + c for a, c in zip(sn[step], per)]
        se[step] += rows

    def observe(self, call) -> None:
        for p in self.call_parts:
            p.on_denoiser(self, call)
        if self._sample_calls:
            self._observe_samples(call)

    def _observe_samples(self, call) -> None:
        """Per-sample parts that read denoiser calls see their own sample's rows (batch 1); an
        unguided sample has no unconditional prediction, as when it runs alone."""
        for j, obs in enumerate(self._sample_calls):
            if not obs:
                continue
            u = call.uncond[j:j + 1] if call.uncond is not None and call.mask[j] else None
            c = call.cond[j:j + 1]
            # guided: what the sample stepped with (not c where only a perturbed pass ran)
            sub = DenoiserCall(call.step, call.timestep, call.x_in[j:j + 1], c, u, call.guided[j:j + 1],
                               call.mask[j:j + 1],
                               call.scale if not isinstance(call.scale, torch.Tensor) else call.scale[j:j + 1],
                               revises=call.revises)
            for p in obs:
                p.on_denoiser(self._sample_infos[j], sub)

    def step_record(self, step: int) -> StepRecord:
        """What ran at ``step`` (complete once the step's denoiser calls are done); ``ms`` is NaN
        until the run ends (the clocks are read once, then)."""
        plans, sn, se = self.plans, self.step_nfe, self.step_evaluations
        plan = plans[step] if step < len(plans) else None
        if plan is None:
            cached = self._plan_cache
            plan = cached[1] if cached is not None and cached[0] == step else None
        b = self.batch or 0
        if plan is None:
            return StepRecord((False,) * b, (float("nan"),) * b, (0.0,) * b, 0, float("nan"))
        nfe = tuple(sn[step]) if step < len(sn) else (0.0,) * b
        return StepRecord(plan.mask, plan.scale, nfe, se[step] if step < len(se) else 0, float("nan"))

    def finish_record(self) -> RunRecord:
        """Write the one record of the call (at its end, also when it raised): the run's own
        per-step lists, handed over as they are."""
        started = self.loop_started
        plans = list(self.plans) if started else []
        cached = self._plan_cache
        for i, p in enumerate(plans):  # a step cut short (an error) before its step end
            if p is None and cached is not None and cached[0] == i:
                plans[i] = cached[1]
        self.record = RunRecord(batch=self.batch or 0, num_steps=self.num_steps or 0, plans=tuple(plans),
                                step_nfe=tuple(self.step_nfe) if started else (),
                                step_evaluations=tuple(self.step_evaluations) if started else (),
                                step_ms=tuple(self.step_ms()) if started else (),
                                stop_reason=self.stop_reason, switched_at=self.switched_at, cfg_seen=self.cfg_seen,
                                total_nfe=tuple(self.nfe) if started and self.nfe is not None else None)
        return self.record

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

    def _unguided_after(self, step: int) -> bool:
        """No sample is guided after ``step``: an attached control knows it for the batch, or every
        sample is at a scale <= 1 or has a control of its own that knows it; and no part still
        runs a perturbed pass later (it evaluates rows of the CFG batch)."""
        if (self._perturb_parts or self._sample_perturb) and (
                any(p.perturbs_after(self, step) for p in self._perturb_parts)
                or any(p.perturbs_after(self._sample_infos[j], step) for j, p in self._sample_perturb)):
            return False
        for p in self._tail_parts:
            if p.unguided_after(self, step):
                return True
        if self.per_sample is None and self.sample_scales is None:
            return False
        scales = self.info.scales
        per = self.per_sample or [[] for _ in scales]
        return all((self.sample_scales is not None and scales[j] <= 1.0)
                   or any(overrides(p, "unguided_after") and p.unguided_after(info, step) for p in ps)
                   for j, (ps, info) in enumerate(zip(per, self._sample_infos)))

    def _maybe_leave_cfg(self, step: int, kw: dict) -> None:
        """When no sample is guided after ``step``, take the pipeline out of CFG as diffusers'
        cutoff callbacks do (guidance scale 0, the doubled callback tensors halved with
        ``chunk(2)[1]``): the tail then costs the pipeline's own unguided loop, no tap work."""
        pipe = self.pipe
        if getattr(pipe, "interrupt", False) or not D.cfg_on(pipe):
            return
        if not self._unguided_after(step):
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
