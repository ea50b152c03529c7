"""The run protocol: what a part is, what it may read, what it returns, and the one record of a run.

A *part* is anything attached to a pipeline call with ``dlx.attach`` (``dlx.session``): recorders,
previews, interrupts, and *controls*, the parts that decide guidance. This module holds only
values and the base class, so every floor above can import it:

* ``Part``: the base class; its hooks are the events of a run, documented where declared.
* ``RunInfo``: the small frozen value a control reads (steps, batch, schedule, family, the
  scale each sample runs at). ``Run`` (``dlx.run``) exposes the same names, so a control reads
  them from whichever it is handed.
* ``Guide``: a control's per-sample plan for one step; ``combine`` merges the guides of every
  control of a sample, by one rule, into a ``Plan``.
* ``StepRecord`` / ``RunRecord``: what ran, step by step and per sample (who was guided, at which
  scale, denoiser evaluations, wall time). It is written once, by the run, and everything that
  reports a number reads it: the ``Trace``, the controls' ``report``, the sweep's rows and its
  cost model.

Writing a control takes one short class (``docs/custom_control.md`` shows one, tested)::

    class EveryOther(dlx.Part):
        '''Guide only the even steps.'''
        def guidance(self, run, step):
            return dlx.Guide(mask=[step % 2 == 0] * run.batch)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import torch

from ._diffusers import rescale_noise_cfg
from .config import default_config
from .errors import DlxError

if TYPE_CHECKING:  # pragma: no cover
    from .families import Family

__all__ = ["Part", "Guide", "DenoiserCall", "Plan", "Layout", "RunInfo", "StepRecord", "RunRecord", "combine", "combine_fields", "REGISTRY"]

#: every Part subclass by class name (``dlx.part_from_config`` rebuilds from it)
REGISTRY: dict[str, type] = {}


class Guide(NamedTuple):
    """A control's plan for one step, one entry per sample (None: no opinion on that field).

    ``mask[j]``: sample j is guided (its unconditional pass runs). ``scale[j]``: its guidance
    scale. ``rule[j]``: how its guided prediction is formed: None is CFG, ``u + s·(c − u)`` (with
    the pipeline's ``guidance_rescale``), else an object with ``combine(run, step, samples, cond,
    uncond, scale) -> Tensor`` (a guidance method, e.g. ``dlx.Guider``); a rule whose result depends
    on a sample's own history says so with ``stateful = True`` (the default for a rule without the
    attribute), and ``dlx.Share`` then never evaluates that sample as another's copy; a stateless
    rule may define ``key``, a value equal for rules that compute the same thing (the same guider
    and config), so that ``dlx.Share`` evaluates samples of equal rules once (by identity without it). ``zero[j]``: sample j
    gets no denoiser evaluation at this step and a prediction of exactly 0 (CFG-Zero*'s zero-init).
    ``perturb[j]``: sample j's rule needs a third, *perturbed* pass of its conditional rows at this
    step (skip-layer, perturbed-attention, smoothed-energy guidance): the rule then has
    ``perturbation(run)``, a context manager inside which the denoiser is the perturbed model,
    and its ``combine`` takes ``perturbed=`` (that pass's predictions) and ``uncond=None`` for a
    sample whose unconditional pass does not run. The perturbed pass follows the rule's own
    window, not the mask (a ``CFGCutoff`` cuts the unconditional pass only); it counts one NFE.
    A rule with ``perturbs_uncond = True`` (AutoGuidance) has its guided samples' unconditional
    rows evaluated inside its ``perturbation(run)`` instead of in the main call (no extra NFE).
    """

    mask: Sequence[bool] | None = None
    scale: Sequence[float] | None = None
    rule: Sequence[Any] | None = None
    zero: Sequence[bool] | None = None
    perturb: Sequence[bool] | None = None


@dataclass(frozen=True)
class RunInfo:
    """What a control may read about the run it steers (known from the first denoiser call on).

    ``scales`` holds the guidance scale each sample runs at when no control sets one: the call's
    scale, or (a sweep's per-sample rows) the row's own. ``call_scale()`` is a sample's when the
    batch has one sample or all agree.
    """

    pipe: Any
    family: "Family"
    call: dict
    num_steps: int
    batch: int
    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]
    scales: tuple[float, ...]

    def sigma(self, step: int) -> float:
        """Noise level σ of loop step ``step`` (NaN past the end)."""
        s = self.sigmas
        return s[step] if step < len(s) else float("nan")

    def t_of(self, step: int) -> float:
        """Scheduler timestep of loop step ``step`` (NaN past the end)."""
        t = self.timesteps
        return float(t[step]) if step < len(t) else float("nan")

    def call_scale(self) -> float:
        """The scale the samples run at (the first sample's where they differ)."""
        return self.scales[0]

    def sample(self, j: int) -> "RunInfo":
        """The run as sample ``j`` alone sees it (batch 1, its own scale): what a per-sample
        control is handed."""
        return replace(self, batch=1, scales=(self.scales[j],))


class DenoiserCall:
    """What one denoiser evaluation produced, split per CFG half (rows of the batch of B samples).

    ``uncond`` is None when no sample was guided; rows of unguided samples are NaN otherwise.
    ``guided`` holds the prediction the scheduler steps with. Passed as None, it is the
    pipeline's own combination ``lerp(uncond, cond, scale)``, computed on first access (one
    kernel per step saved when no part reads it). Like ``cond`` and ``uncond`` (views of
    the denoiser's output, which a CUDA graph overwrites on its next replay), read it inside
    ``on_denoiser``.
    """

    __slots__ = ("step", "timestep", "x_in", "cond", "uncond", "_guided", "mask", "scale", "lerp_guided",
                 "pair", "rescale", "revises")

    def __init__(self, step: int, timestep, x_in: torch.Tensor, cond: torch.Tensor,
                 uncond: torch.Tensor | None, guided: torch.Tensor | None, mask: tuple[bool, ...],
                 scale: torch.Tensor | float, pair: torch.Tensor | None = None, rescale: float = 0.0,
                 revises: bool = False):
        self.step = step
        self.timestep = timestep
        self.x_in = x_in  # denoiser input of the conditional rows (after scale_model_input)
        self.cond = cond
        self.uncond = uncond
        self._guided = guided
        self.mask = mask
        self.scale = scale
        #: the pipeline's ``guidance_rescale`` (arXiv 2305.08891) applied to ``guided`` when it is
        #: the pipeline's own CFG (``guided`` passed as None)
        self.rescale = rescale
        #: ``guided`` is ``lerp(uncond, cond, scale)`` (the pipeline's own CFG, no rescale): a
        #: part may compute it, or what follows from it, later from copies of ``uncond`` and ``cond``
        self.lerp_guided = guided is None and not rescale
        #: a second event for the same step whose ``guided`` replaces the first one's: SD3's
        #: skip-layer guidance adds (cond − skip-layer prediction)·scale after CFG
        self.revises = revises
        #: the denoiser's whole output when ``uncond`` and ``cond`` are its two halves, in that
        #: order (the pipeline's own CFG batch): one copy of it keeps both
        self.pair = pair

    @property
    def guided(self) -> torch.Tensor:
        g = self._guided
        if g is None:
            g = torch.lerp(self.uncond, self.cond, self.scale)
            if self.rescale:
                g = rescale_noise_cfg(g, self.cond, self.rescale)
            self._guided = g
        return g

    def __repr__(self) -> str:
        return (f"DenoiserCall(step={self.step}, cond={tuple(self.cond.shape)}, "
                f"uncond={'None' if self.uncond is None else tuple(self.uncond.shape)}, mask={self.mask}, "
                f"scale={self.scale!r})")


class Part:
    """Base of everything that can be attached (``dlx.attach``).

    Events, in order (override what you need):

    ====================  ==========================================================================
    ``on_run_start(run)``  before the pipeline call: ``run.pipe``, ``run.family``, ``run.call``.
    ``on_loop_start(run)`` at the first denoiser call, before it runs: ``num_steps``, ``batch``,
                           ``timesteps``, ``sigmas`` are known. Check per-sample arguments here.
    ``guidance(run, step)`` (controls) once per step, before the denoiser: a ``Guide`` or None.
    ``on_denoiser(run, call)`` (``wants_calls``) after each denoiser evaluation (``DenoiserCall``).
    ``on_step_end(run, step, timestep, callback_kwargs)`` after the scheduler step, as diffusers'
                           ``callback_on_step_end``: return the (possibly changed) dict.
    ``on_run_end(run, error)`` in ``finally``; ``run.record`` holds what ran.
    ====================  ==========================================================================

    ``__call__`` has diffusers' ``callback_on_step_end`` signature: inside an attached call it is
    ``on_step_end``; as a plain callback it is ``on_plain_step_end``.
    """

    #: callback tensors the part reads at step end (checked against the pipeline before the call)
    tensor_inputs: list[str] = []
    #: the part's step end runs after the other parts' and the caller's callback, its run end last
    runs_last: bool = False
    #: the part wants ``DenoiserCall`` events through ``on_denoiser``
    wants_calls: bool = False
    #: the part sets guidance scales (at most one such part per sample)
    sets_scale: bool = False
    #: the part sets the guidance rule (``Guide.rule``; at most one such part per sample)
    sets_rule: bool = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if not cls.__name__.startswith("_"):
            REGISTRY[cls.__name__] = cls

    def on_run_start(self, run) -> None:
        """Before the pipeline call."""

    def on_loop_start(self, run) -> None:
        """At the first denoiser call, before it runs: steps, batch and schedule are known."""

    def guidance(self, run, step: int) -> Guide | None:
        """The per-sample plan of ``step`` (controls); None: no opinion."""
        return None

    def unguided_after(self, run, step: int) -> bool:
        """True when this part guides no sample at any step after ``step`` (lets the run take the
        pipeline out of CFG for the tail). Only controls that know it say True."""
        return False

    def perturbs_after(self, run, step: int) -> bool:
        """True when this part still asks for a perturbed pass (``Guide.perturb``) at a step after
        ``step``: the run then keeps the pipeline's CFG batch, whose conditional rows that pass
        evaluates, even once no sample is guided."""
        return False

    def on_denoiser(self, run, call) -> None:
        """After each denoiser evaluation (parts with ``wants_calls``)."""

    def on_step_end(self, run, step: int, timestep, callback_kwargs: dict) -> dict:
        """After the scheduler step; return ``callback_kwargs`` (changed or not)."""
        return callback_kwargs

    def on_run_end(self, run, error: BaseException | None) -> None:
        """In ``finally``; ``error`` is what the call raised (None: it returned)."""

    def on_plain_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """Used as a plain ``callback_on_step_end`` (not attached)."""
        raise DlxError(
            f"{type(self).__name__} acts inside the denoiser and must be attached: "
            f"`with dlx.attach(pipe, {type(self).__name__}(...)): pipe(...)`"
        )

    def config(self) -> dict:
        """``{"type": ..., "args": {...}}``: the part's constructor arguments as JSON, the one
        serialisation of a part (traces, sweep specs and stores, labels); ``dlx.part_from_config``
        rebuilds it. ``"rebuildable": False`` where an argument is a callable or an object."""
        return default_config(self)

    def __call__(self, pipe, step, timestep, callback_kwargs):
        session = type(pipe).__dict__.get("_dlx_session")
        run = session.run if session is not None else None
        if run is not None and self in run.parts:
            return self.on_step_end(run, step, timestep, callback_kwargs)
        return self.on_plain_step_end(pipe, step, timestep, callback_kwargs)


@dataclass(eq=False)
class Plan:
    """Guidance for one step: per-sample mask, scale, rule and zero flags, and the pipeline's own
    scale. Treat as immutable: a run reuses one plan for every step whose guidance does not change."""

    mask: tuple[bool, ...]
    scale: tuple[float, ...]
    default: float  # the pipeline's own scale
    rule: tuple = ()  # per sample: None (CFG) or a rule object; () when every sample is CFG
    zero: tuple[bool, ...] = ()  # per sample: no evaluation, prediction 0; () when none
    perturb: tuple[bool, ...] = ()  # per sample: its rule's perturbed pass runs; () when none

    @functools.cached_property
    def passthrough(self) -> bool:
        """Every sample guided by CFG at the pipeline's scale: the pipeline's own CFG does the step."""
        return (all(self.mask) and all(s == self.default for s in self.scale) and not self.rule
                and not self.zero and not self.perturb)

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

    def sample_key(self, j: int) -> tuple:
        """What makes sample j's step differ from another's (``dlx.Share`` groups on it)."""
        rule = self.rule[j] if self.rule else None
        return (self.mask[j], self.scale[j], None if rule is None else getattr(rule, "key", id(rule)),
                self.zero[j] if self.zero else False, self.perturb[j] if self.perturb else False)


def combine(batch: int, default_scales: Sequence[float], guides: Sequence[tuple[int | None, Guide]],
            default: float) -> Plan:
    """The one rule that merges controls' guides into a step's plan.

    ``guides`` holds (sample, guide) pairs: sample None for a guide about the whole batch (one
    entry per sample in each field), else a guide about that one sample (fields of length 1). A
    sample is guided where every guide guides it (masks AND); a zero flag from any guide zeroes it
    (ORs); a perturb flag ORs too (it comes from the rule's setter) and a zeroed sample has no
    pass at all; scale and rule come from the (at most one) guide that sets them, else the
    sample's default scale and CFG."""
    mask, scale, rule, zero, perturb = combine_fields(batch, default_scales, guides)
    return Plan(mask, scale, default, rule, zero, perturb)


def combine_fields(batch: int, default_scales: Sequence[float], guides) -> tuple:
    """``combine``'s (mask, scale, rule, zero, perturb) as tuples, without making a plan (the run
    compares them with the last step's first: one plan object while guidance does not change)."""
    mask = (True,) * batch
    scale = tuple(default_scales)
    rule: tuple = ()
    zero: tuple = ()
    perturb: tuple = ()
    per = None
    first_mask = True
    for j, g in guides:  # whole-batch guides first, field by field (the common case: cutoffs)
        if g is None:
            continue
        if j is not None:
            per = [] if per is None else per
            per.append((j, g))
            continue
        if g.mask is not None:
            m = g.mask
            if first_mask and type(m) is tuple and all(type(v) is bool for v in m):
                mask = m  # the first mask as the control made it: nothing to AND yet
            else:
                mask = tuple([a and bool(c) for a, c in zip(mask, m)])
            first_mask = False
        if g.scale is not None:
            scale = tuple([float(v) for v in g.scale])
        if g.rule is not None and any(r is not None for r in g.rule):
            rule = tuple(g.rule)
        if g.zero is not None and any(g.zero):
            zero = tuple(bool(z) for z in g.zero) if not zero else tuple(a or bool(z) for a, z in zip(zero, g.zero))
        if g.perturb is not None and any(g.perturb):
            perturb = (tuple(bool(z) for z in g.perturb) if not perturb
                       else tuple(a or bool(z) for a, z in zip(perturb, g.perturb)))
    if per:  # one sample's own guides
        mask, scale = list(mask), list(scale)
        rule = list(rule) if rule else [None] * batch
        zero = list(zero) if zero else [False] * batch
        perturb = list(perturb) if perturb else [False] * batch
        for j, g in per:
            if g.mask is not None:
                mask[j] = mask[j] and bool(g.mask[0])
            if g.scale is not None:
                scale[j] = float(g.scale[0])
            if g.rule is not None and g.rule[0] is not None:
                rule[j] = g.rule[0]
            if g.zero is not None and g.zero[0]:
                zero[j] = True
            if g.perturb is not None and g.perturb[0]:
                perturb[j] = True
        mask, scale = tuple(mask), tuple(scale)
        rule = tuple(rule) if any(r is not None for r in rule) else ()
        zero = tuple(zero) if any(zero) else ()
        perturb = tuple(perturb) if any(perturb) else ()
    if zero:
        mask = tuple(m and not z for m, z in zip(mask, zero))
        if perturb:
            perturb = tuple(p and not z for p, z in zip(perturb, zero))
            perturb = perturb if any(perturb) else ()
    return mask, scale, rule, zero, perturb


class Layout(NamedTuple):
    """Which samples a step evaluates when ``dlx.Share`` groups equal ones: ``reps`` (one sample
    per group, ascending) and ``expand`` (for each sample, the position of its group in ``reps``)."""

    reps: tuple[int, ...]
    expand: tuple[int, ...]


class StepRecord(NamedTuple):
    """What ran at one step, per sample: ``guided`` (the unconditional pass ran), ``scale``,
    ``nfe`` (nominal denoiser evaluations: 1 conditional + 1 unconditional where guided),
    ``evaluations`` (sample-rows the denoiser really computed: fewer under ``dlx.Share``) and
    ``ms`` (the step's wall time; NaN where unknown)."""

    guided: tuple[bool, ...]
    scale: tuple[float, ...]
    nfe: tuple[float, ...]
    evaluations: int
    ms: float


@dataclass(frozen=True)
class RunRecord:
    """The one record of a run: what ran at each step, per sample, and how the run ended. Every
    count a trace, a control's report, a sweep row or the cost model shows is read from here.

    Kept as the run wrote it (each step's ``Plan``, nominal evaluations per sample, rows evaluated,
    wall time), so writing it costs nothing per step; ``steps`` gives a ``StepRecord`` per step."""

    batch: int
    num_steps: int
    plans: tuple = ()  # each step's Plan (None: no denoiser call in that step)
    step_nfe: tuple = ()  # each step's per-sample nominal evaluations
    step_evaluations: tuple = ()  # each step's sample-rows evaluated
    step_ms: tuple[float, ...] = field(default=())
    stop_reason: str | None = None
    switched_at: int | None = None
    cfg_seen: bool = False
    total_nfe: tuple | None = None  # the run's running sum of step_nfe, per sample

    @functools.cached_property
    def steps(self) -> tuple[StepRecord, ...]:
        """A ``StepRecord`` per step that ran."""
        b, ms, sn, se = self.batch, self.step_ms, self.step_nfe, self.step_evaluations
        nan = float("nan")
        out = []
        for i, p in enumerate(self.plans):
            if p is None:
                out.append(StepRecord((False,) * b, (nan,) * b, (0.0,) * b, 0, nan))
            else:
                out.append(StepRecord(p.mask, p.scale, tuple(sn[i]) if i < len(sn) else (0.0,) * b,
                                      se[i] if i < len(se) else 0, ms[i] if i < len(ms) else nan))
        return tuple(out)

    @functools.cached_property
    def nfe(self) -> list[float]:
        """Per sample: nominal denoiser evaluations over the run (the sum of ``step_nfe``, which
        the run keeps as it counts: ``total_nfe``)."""
        if self.total_nfe is not None:
            return list(self.total_nfe)
        out = [0.0] * self.batch
        for row in self.step_nfe:
            out = [a + b for a, b in zip(out, row)]
        return out

    @functools.cached_property
    def guided_steps(self) -> list[int]:
        """Per sample: how many steps guided it."""
        out = [0] * self.batch
        for p in self.plans:
            if p is not None and p.any_guided:
                out = [n + bool(m) for n, m in zip(out, p.mask)]
        return out

    @property
    def evaluations(self) -> int:
        """Sample-rows the denoiser computed over the run."""
        return sum(self.step_evaluations)

    def guided_steps_run(self) -> list[int]:
        """Steps on which some sample was guided."""
        return [i for i, p in enumerate(self.plans) if p is not None and p.any_guided]

    def last_guided_step_per_sample(self) -> list[int | None]:
        last: list[int | None] = [None] * self.batch
        for i, p in enumerate(self.plans):
            if p is not None and p.any_guided:
                last = [i if m else v for v, m in zip(last, p.mask)]
        return last
