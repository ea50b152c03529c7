"""Guidance controls: CFG cutoffs, intervals, scale schedules, adaptive cutoff, IP-Adapter cutoff.

All of them act at the denoiser through the tap (attach them with ``dlx.attach`` or
``dlx.record``): an unguided step computes only the conditional rows, so the compute a cutoff
promises is really saved, guidance can start late, and each sample of a batch can have its own
plan. They never slice with ``[-1:]``. When no sample is guided for the rest of a run, the run
leaves CFG the way diffusers' cutoff callbacks do, so the tail costs what the pipeline's own
unguided loop costs.

Per sample: every argument of ``CFGCutoff``, ``GuidanceInterval``, ``GuidanceSchedule`` and
``AdaptiveCutoff`` takes one value for the whole batch or a list with one value per sample
(``CFGCutoff(ratio=[0, .2, .4])`` on a batch of three). A list whose length is not the run's
batch is a ``DlxError`` naming the argument, raised before any denoiser evaluation.

Composition: a sample is guided on a step where every attached control guides it; at most one
attached control sets scales (``GuidanceSchedule``), checked when the block is attached.

Step semantics (dlx): with N denoising steps, a fraction r of the run is the first
``b(r) = ⌊r·N + ½⌋`` steps (round half up). ``GuidanceInterval(start, stop)`` guides steps i with
``b(start) ≤ i < b(stop)``, and ``CFGCutoff(ratio=r)`` is exactly ``GuidanceInterval(0, r)``: it
guides steps 0 … b(r)−1. ``compat="diffusers"`` reproduces diffusers' official cutoff callbacks,
whose callback runs *after* step k = ⌊N·ratio⌋ (or ``cutoff_step_index``), so they guide steps 0 … k.

After a run each control's ``report`` describes what ran (read from the run's per-step plans,
so a user callback that cut CFG too, or a call without CFG, shows), with the run's per-sample NFE;
a control that could not act (the call had no CFG to cut) warns once.

(Over 400 lines: one idea, the guidance controls, each a short class on the shared ``_Control``.)
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from . import _args
from . import _diffusers as D
from .protocol import DenoiserCall
from .errors import DlxError
from .protocol import Guide, Part, RunInfo

Run = RunInfo  # what a control reads (the run of a whole call exposes the same names)

__all__ = ["CFGCutoff", "GuidanceInterval", "GuidanceSchedule", "AdaptiveCutoff", "IPAdapterCutoff", "boundary"]


def _is_real(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real)


_per_sample = _args.per_sample
_fraction = _args.fraction
_threshold_arg = _args.in_unit_interval
_expand = _args.one_per_sample


def _step_arg(name: str, value) -> int:
    return _args.integer(name, value, minimum=0)


def _sigma_arg(name: str, value) -> float:
    return _args.finite(name, value, minimum=0)


_scale_arg = _sigma_arg  # a guidance scale: finite and >= 0


def boundary(fraction: float, num_steps: int) -> int:
    """Number of steps in the first ``fraction`` of a run of ``num_steps``: ⌊f·N + ½⌋."""
    return int(math.floor(fraction * num_steps + 0.5 + 1e-9))


class _Control(Part):
    """A guidance control; after a run ``report`` holds what ran (and the run's NFE).

    Per-run state lives in ``self._run_state`` between ``on_run_start`` and ``on_run_end``; a
    control instance serves one run at a time (``attach`` refuses a second concurrent use)."""

    _ARGS: tuple[str, ...] = ()

    def __init__(self):
        self.report: dict = {}
        self._masks: list[tuple[bool, ...]] | None = None  # planned mask per step (static controls)
        self._last_guided: tuple | None = None

    def _config_args(self) -> dict:
        return {k: getattr(self, k) for k in self._ARGS}

    def on_run_start(self, run: Run):
        self.report = {}
        self._masks = None

    def guidance(self, run: Run, step: int):
        masks = self._masks
        return Guide(mask=masks[step]) if masks is not None and step < len(masks) else None

    def unguided_after(self, run: Run, step: int) -> bool:
        masks = self._masks
        if masks is None:
            return False
        last = self._last_guided
        if last is None or last[0] is not masks:  # once per run: the last step any sample is guided
            last = self._last_guided = (masks, max((i for i, m in enumerate(masks) if any(m)), default=-1))
        return step >= last[1]

    def _planned(self) -> bool:
        """Whether this control planned to guide some sample on some step of the run."""
        return self._masks is None or any(any(m) for m in self._masks)

    def on_run_end(self, run, error):
        rec = run.record  # the run's one record: what ran, per step and sample
        ran = rec.guided_steps_run()
        if rec.plans:
            self.report["nfe"] = list(rec.nfe)
            self.report["nfe_full_cfg"] = 2.0 * rec.num_steps
        self.report["guided_steps_run"] = ran
        self.report["last_guided_step"] = ran[-1] if ran else None
        if rec.batch:
            self.report["last_guided_step_per_sample"] = rec.last_guided_step_per_sample()
        if error is None and run.loop_started and not rec.cfg_seen and self._planned():
            self.report["acted"] = False
            warnings.warn(
                f"{type(self).__name__}: no step of this call was guided, so it could not act (the call "
                f"had no classifier-free guidance: guidance_scale <= 1, or Flux without a negative prompt "
                f"and true_cfg_scale > 1)", stacklevel=2)


class GuidanceInterval(_Control):
    """Guide only inside ``[start, stop)`` of the run (Kynkäänniemi et al. 2024, arXiv 2404.07724).

    Steps ``b(start) ≤ i < b(stop)`` are guided, where ``b(f) = ⌊f·N + ½⌋``; other steps skip the
    unconditional pass. A late start (``start > 0``) works: the tap decides per call. ``start``
    and ``stop`` each take one value or one per sample.
    """

    _ARGS = ("start", "stop")

    def __init__(self, start=0.0, stop=1.0):
        super().__init__()
        self.start = _per_sample("start", start, _fraction)
        self.stop = _per_sample("stop", stop, _fraction)
        if isinstance(self.start, list) and isinstance(self.stop, list) and len(self.start) != len(self.stop):
            raise DlxError(f"arguments `start` and `stop` must have the same length; got {start!r} and {stop!r}")
        n = max(len(v) for v in (self.start, self.stop) if isinstance(v, list)) if any(
            isinstance(v, list) for v in (self.start, self.stop)) else 1
        lo = self.start if isinstance(self.start, list) else [self.start] * n
        hi = self.stop if isinstance(self.stop, list) else [self.stop] * n
        for j, (a, z) in enumerate(zip(lo, hi)):
            if a > z:
                where = "" if n == 1 and not isinstance(self.start, list) and not isinstance(self.stop, list) else f" for sample {j}"
                raise DlxError(f"argument `start` ({a!r}) must not exceed `stop` ({z!r}){where}")

    def __repr__(self):
        return f"GuidanceInterval(start={self.start}, stop={self.stop})"

    def on_loop_start(self, run: Run):
        n, b = run.num_steps, run.batch
        lo = [boundary(f, n) for f in _expand("start", self.start, b)]
        hi = [boundary(f, n) for f in _expand("stop", self.stop, b)]
        self._masks = [tuple(a <= i < z for a, z in zip(lo, hi)) for i in range(n)]


class CFGCutoff(_Control):
    """Stop classifier-free guidance after part of the run; give exactly one of ``ratio``,
    ``step`` or ``sigma`` (each one value, or one per sample).

    * ``ratio=r`` (int or float in [0, 1]): guide the first ⌊r·N + ½⌋ steps, same as
      ``GuidanceInterval(0, r)``.
    * ``step=k``: guide steps 0 … k−1 (k must be < N).
    * ``sigma=s``: guide while the step's noise level σ is above ``s``.
    * ``compat="diffusers"``: diffusers' semantics: k = ⌊N·ratio⌋ or ``step``; steps 0 … k are
      guided (their callback fires after step k). Bitwise equal to ``SDCFGCutoffCallback``,
      ``SDXLCFGCutoffCallback`` and ``SD3CFGCutoffCallback`` at batch 1, and correct at any batch.

    After a run ``report["last_guided_step"]`` states the last step that was guided (the trace
    has it too). Cutting CFG on Flux cuts its true CFG (``true_cfg_scale``), which no callback can reach.
    """

    def __init__(self, ratio=None, *, step=None, sigma=None, compat: str = "dlx"):
        super().__init__()
        given = [n for n, v in (("ratio", ratio), ("step", step), ("sigma", sigma)) if v is not None]
        if len(given) != 1:
            raise DlxError(
                f"CFGCutoff takes exactly one of `ratio`, `step`, `sigma`; got {given or 'none'} "
                f"(ratio={ratio!r}, step={step!r}, sigma={sigma!r})"
            )
        if compat not in ("dlx", "diffusers"):
            raise DlxError(f"argument `compat` must be 'dlx' or 'diffusers'; got {compat!r}")
        self.ratio = _per_sample("ratio", ratio, _fraction) if ratio is not None else None
        self.step = _per_sample("step", step, _step_arg) if step is not None else None
        if sigma is not None and compat == "diffusers":
            raise DlxError("argument `sigma` has no diffusers equivalent; use compat='dlx'")
        self.sigma = _per_sample("sigma", sigma, _sigma_arg) if sigma is not None else None
        self.compat = compat

    def _config_args(self) -> dict:
        args = {k: v for k in ("ratio", "step", "sigma") if (v := getattr(self, k)) is not None}
        args["compat"] = self.compat
        return args

    def __repr__(self):
        arg = next(f"{n}={v!r}" for n, v in (("ratio", self.ratio), ("step", self.step), ("sigma", self.sigma)) if v is not None)
        return f"CFGCutoff({arg}, compat={self.compat!r})"

    def guided_steps(self, run: Run) -> list[int]:
        """How many leading steps each sample is guided in this run."""
        n, b = run.num_steps, run.batch
        if self.step is not None:
            steps = _expand("step", self.step, b)
            for j, k in enumerate(steps):
                if k >= n:
                    name = "step" if not isinstance(self.step, list) else f"step[{j}]"
                    raise DlxError(f"argument `{name}` ({k}) must be less than the run's number of steps ({n})")
        if self.compat == "diffusers":
            ks = steps if self.step is not None else [int(n * r) for r in _expand("ratio", self.ratio, b)]
            return [min(k + 1, n) for k in ks]
        if self.ratio is not None:
            return [boundary(r, n) for r in _expand("ratio", self.ratio, b)]
        if self.step is not None:
            return steps
        sig = [run.sigma(i) for i in range(n)]
        return [next((i for i, s in enumerate(sig) if not s > lim), n) for lim in _expand("sigma", self.sigma, b)]

    def on_loop_start(self, run: Run):
        ks = self.guided_steps(run)
        self._masks = [tuple(i < k for k in ks) for i in range(run.num_steps)]


_NAMED = ("constant", "linear", "cosine")


def _shape(schedule: str, p: float) -> float:
    """The named schedule's progress from ``low`` (0) to ``high`` (1) at p."""
    if schedule == "linear":
        return p
    return (1 - math.cos(math.pi * p)) / 2


class GuidanceSchedule(_Control):
    """Guidance scale as a function of progress p = i / N (Wang et al. 2024, arXiv 2404.13040,
    who find increasing schedules beat constant guidance).

    ``schedule`` is ``"constant"``, ``"linear"`` (``low`` → ``high``), ``"cosine"`` (``low`` → ``high``
    along a half cosine) or any callable ``f(p) -> scale`` (a float, or one per sample). ``low``
    and ``high`` take one value or one per sample. ``high`` defaults to the value that keeps the
    constant schedule's mean over the steps that run: with s the call's ``guidance_scale`` and
    w_i the schedule's shape (0 … 1) at the N steps, ``high = low + (s − low) / mean(w)``
    (``2·s − low`` as N → ∞; at N = 1 the only step uses ``low``). A scale of exactly 1 skips the
    unconditional pass (u + 1·(c − u) = c). Every step's scale is computed and checked when the
    loop starts, before any denoiser evaluation. The call's ``guidance_scale`` must be > 1 so the
    pipeline builds the unconditional batch.
    """

    sets_scale = True
    _ARGS = ("schedule", "low", "high")

    def __init__(self, schedule="linear", *, low=1.0, high=None):
        super().__init__()
        if not (callable(schedule) or schedule in _NAMED):
            raise DlxError(f"argument `schedule` must be one of {list(_NAMED)} or a callable; got {schedule!r}")
        self.schedule = schedule
        self.low = _per_sample("low", low, _scale_arg)
        self.high = None if high is None else _per_sample("high", high, _scale_arg)
        self._scales: list[tuple[float, ...]] | None = None

    def __repr__(self):
        return f"GuidanceSchedule({self.schedule!r}, low={self.low}, high={self.high})"

    def scale_at(self, p: float, default: float, low: float | None = None, high: float | None = None):
        """The scale at progress ``p`` (one sample's ``low``/``high``; a callable decides alone)."""
        if callable(self.schedule):
            return self.schedule(p)
        if self.schedule == "constant":
            return default
        low = self.low if low is None else low
        hi = (2 * default - low) if high is None else high
        return low + (hi - low) * _shape(self.schedule, p)

    def _default_high(self, low: float, default: float, n: int) -> float:
        w = sum(_shape(self.schedule, i / n) for i in range(n)) / n
        return 2 * default - low if w == 0 else low + (default - low) / w

    def on_loop_start(self, run: Run):
        if run.family.cfg == "batch" and not D.cfg_on(run.pipe):
            raise DlxError(
                f"GuidanceSchedule needs the call's guidance_scale > 1 (got {run.pipe.guidance_scale!r}) so "
                "that the pipeline builds the unconditional batch"
            )
        n, b = run.num_steps, run.batch
        default = run.call_scale()
        scales = []
        if callable(self.schedule):
            for i in range(n):
                s = self.schedule(i / n)
                vals = s.tolist() if isinstance(s, torch.Tensor) else (list(s) if isinstance(s, (list, tuple)) else [s] * b)
                if len(vals) != b:
                    raise DlxError(f"schedule returned {len(vals)} scales at step {i}; the batch has {b} samples")
                scales.append(vals)
        else:
            lows = _expand("low", self.low, b)
            highs = _expand("high", self.high, b) if self.high is not None else [None] * b
            if self.schedule != "constant":
                highs = [h if h is not None else self._default_high(lo, default, n) for lo, h in zip(lows, highs)]
            for j, h in enumerate(highs):
                if h is not None and not h >= 0:
                    raise DlxError(
                        f"argument `low` ({lows[j]!r}) gives a negative default `high` ({h:.4g}) at guidance_scale "
                        f"{default} over {n} steps; pass `high`")
            scales = [[float(self.scale_at(i / n, default, lo, h)) for lo, h in zip(lows, highs)] for i in range(n)]
        for i, vals in enumerate(scales):
            for v in vals:
                if not _is_real(v) or not v >= 0 or math.isinf(v):
                    raise DlxError(f"schedule returned guidance scale {v!r} at step {i}; scales must be finite and >= 0")
        self._scales = [tuple(float(v) for v in vals) for vals in scales]
        self._masks = [tuple(v != 1.0 for v in vals) for vals in self._scales]
        self.report["scales"] = [list(v) for v in self._scales]

    def guidance(self, run: Run, step: int):
        return Guide(mask=self._masks[step], scale=self._scales[step])


class AdaptiveCutoff(_Control):
    """Adaptive Guidance (Castillo et al. 2023, arXiv 2312.12487): stop guiding a sample once the
    cosine similarity of its conditional and unconditional predictions exceeds ``threshold``
    (0.99 by default, as in the public reference node; one value or one per sample). Per sample
    and for the rest of the run; ``report["stopped_at"]`` gives each sample's first unguided step
    (None: guided to the end).

    Deciding needs the similarity on the host: one small device sync per guided step.
    """

    wants_calls = True
    _ARGS = ("threshold",)

    def __init__(self, threshold=0.99):
        super().__init__()
        self.threshold = _per_sample("threshold", threshold, _threshold_arg)
        self._stopped: list[int | None] = []
        self._thresholds: list[float] = []

    def __repr__(self):
        return f"AdaptiveCutoff(threshold={self.threshold})"

    def on_run_start(self, run: Run):
        super().on_run_start(run)
        self._stopped = []
        self.report["cos"] = []

    def on_loop_start(self, run: Run):
        self._thresholds = _expand("threshold", self.threshold, run.batch)
        self._stopped = [None] * run.batch

    def guidance(self, run: Run, step: int):
        return Guide(mask=tuple(s is None for s in self._stopped))

    def unguided_after(self, run: Run, step: int) -> bool:
        return all(s is not None and s <= step + 1 for s in self._stopped)

    def on_denoiser(self, run: Run, call: DenoiserCall):
        if call.uncond is None or call.revises:
            return
        c = call.cond.float().flatten(1)
        u = call.uncond.float().flatten(1)
        cos = torch.nn.functional.cosine_similarity(c, u, dim=1).tolist()
        self.report["cos"].append(cos)
        for j, v in enumerate(cos):
            if self._stopped[j] is None and v == v and v > self._thresholds[j]:
                self._stopped[j] = call.step + 1

    def on_run_end(self, run: Run, error):
        super().on_run_end(run, error)
        self.report["stopped_at"] = list(self._stopped)
        self.report["threshold"] = self.threshold


class IPAdapterCutoff(_Control):
    """Turn the IP-Adapter off after part of the run (``ratio`` or ``step``, dlx semantics as in
    ``CFGCutoff``: the first ⌊r·N + ½⌋ steps, or steps 0 … k−1, use it). Unlike diffusers'
    ``IPAdapterScaleCutoffCallback`` the previous scales are restored after the run, also on error.
    Composes with ``CFGCutoff``: after a CFG cut the tap also drops the negative image embeddings.
    One value for the whole batch: the adapter's scale is the pipeline's, not a sample's.
    """

    _ARGS = ("ratio", "step")

    def __init__(self, ratio=None, *, step=None):
        super().__init__()
        if (ratio is None) == (step is None):
            raise DlxError(f"IPAdapterCutoff takes exactly one of `ratio`, `step`; got ratio={ratio!r}, step={step!r}")
        self.ratio = _fraction("ratio", ratio) if ratio is not None else None
        self.step = _step_arg("step", step) if step is not None else None
        self._saved = None

    def _config_args(self) -> dict:
        return {"ratio": self.ratio} if self.ratio is not None else {"step": self.step}

    def __repr__(self):
        return f"IPAdapterCutoff(ratio={self.ratio}, step={self.step})"

    def guidance(self, run: Run, step: int):
        return None

    def unguided_after(self, run: Run, step: int) -> bool:
        return False

    def _planned(self) -> bool:
        return False  # it acts on the adapter's scale, not on CFG

    def on_run_start(self, run: Run):
        super().on_run_start(run)
        self._saved = None
        self._procs = run.ip_processors
        if not self._procs:
            raise DlxError(f"IPAdapterCutoff: {type(run.pipe).__name__} has no IP-Adapter loaded (pipe.load_ip_adapter)")
        self._saved = [list(p.scale) for p in self._procs]

    def on_loop_start(self, run: Run):
        n = run.num_steps
        if self.step is not None and self.step >= n:
            raise DlxError(f"argument `step` ({self.step}) must be less than the run's number of steps ({n})")
        self._active = boundary(self.ratio, n) if self.ratio is not None else self.step
        self.report.update(ip_adapter_steps=self._active)
        if self._active == 0:
            self._off()

    def _off(self):
        for p in self._procs:
            p.scale = [0.0] * len(p.scale)

    def on_step_end(self, run: Run, step, timestep, callback_kwargs):
        if step + 1 == self._active:
            self._off()
        return callback_kwargs

    def on_run_end(self, run: Run, error):
        super().on_run_end(run, error)
        if self._saved is not None:
            for p, s in zip(self._procs, self._saved):
                p.scale = s
