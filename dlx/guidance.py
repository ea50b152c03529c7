"""Guidance controls: CFG cutoffs, intervals, scale schedules, adaptive cutoff, IP-Adapter cutoff.

All of them act at the denoiser through the tap (attach them with ``dlx.attach`` or
``dlx.record``): an unguided step computes only the conditional rows, so the compute a cutoff
promises is really saved, guidance can start late, and each sample of a batch can have its own
plan. They never slice with ``[-1:]``.

Step semantics (dlx): with N denoising steps, a fraction r of the run is the first
``b(r) = ⌊r·N + ½⌋`` steps (round half up). ``GuidanceInterval(start, stop)`` guides steps i with
``b(start) ≤ i < b(stop)``, and ``CFGCutoff(ratio=r)`` is exactly ``GuidanceInterval(0, r)``: it
guides steps 0 … b(r)−1. ``compat="diffusers"`` reproduces diffusers' official cutoff callbacks,
whose callback runs *after* step k = ⌊N·ratio⌋ (or ``cutoff_step_index``), so they guide steps 0 … k.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._tap import DenoiserCall
from .errors import DlxError
from .session import Part, Run

__all__ = ["CFGCutoff", "GuidanceInterval", "GuidanceSchedule", "AdaptiveCutoff", "IPAdapterCutoff", "boundary"]


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 <= float(value) <= 1.0):
        raise DlxError(f"argument `{name}` must be a number in [0, 1]; got {value!r}")
    return float(value)


def _step_arg(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise DlxError(f"argument `{name}` must be a non-negative int; got {value!r}")
    return int(value)


def boundary(fraction: float, num_steps: int) -> int:
    """Number of steps in the first ``fraction`` of a run of ``num_steps``: ⌊f·N + ½⌋."""
    return int(math.floor(fraction * num_steps + 0.5 + 1e-9))


class _Control(Part):
    """A guidance control; after a run ``report`` holds what it did (and the run's NFE)."""

    def __init__(self):
        self.report: dict = {}

    def on_run_start(self, run: Run):
        self.report = {}

    def on_run_end(self, run: Run, error):
        if run.nfe is not None:
            self.report["nfe"] = list(run.nfe)
            if run.num_steps:
                self.report["nfe_full_cfg"] = 2.0 * run.num_steps
        self.report["guided_steps_run"] = [i for i, p in enumerate(run.step_plans) if p is not None and any(p.mask)]


class GuidanceInterval(_Control):
    """Guide only inside ``[start, stop)`` of the run (Kynkäänniemi et al. 2024, arXiv 2404.07724).

    Steps ``b(start) ≤ i < b(stop)`` are guided, where ``b(f) = ⌊f·N + ½⌋``; other steps skip the
    unconditional pass. A late start (``start > 0``) works: the tap decides per call.
    """

    def __init__(self, start: float = 0.0, stop: float = 1.0):
        super().__init__()
        self.start = _fraction("start", start)
        self.stop = _fraction("stop", stop)
        if self.start > self.stop:
            raise DlxError(f"argument `start` ({start!r}) must not exceed `stop` ({stop!r})")

    def __repr__(self):
        return f"GuidanceInterval(start={self.start}, stop={self.stop})"

    def _range(self, n: int) -> tuple[int, int]:
        return boundary(self.start, n), boundary(self.stop, n)

    def on_loop_start(self, run: Run):
        lo, hi = self._range(run.num_steps)
        self.report.update(first_guided_step=lo if hi > lo else None,
                           last_guided_step=hi - 1 if hi > lo else None, guided_steps=max(hi - lo, 0))

    def guidance(self, run: Run, step: int, batch: int):
        lo, hi = self._range(run.num_steps)
        return lo <= step < hi, None


class CFGCutoff(_Control):
    """Stop classifier-free guidance after part of the run; give exactly one of ``ratio``,
    ``step`` or ``sigma``.

    * ``ratio=r`` (int or float in [0, 1]): guide the first ⌊r·N + ½⌋ steps, same as
      ``GuidanceInterval(0, r)``.
    * ``step=k``: guide steps 0 … k−1 (k must be < N).
    * ``sigma=s``: guide while the step's noise level σ is above ``s``.
    * ``compat="diffusers"``: diffusers' semantics: k = ⌊N·ratio⌋ or ``step``; steps 0 … k are
      guided (their callback fires after step k). Bitwise equal to ``SDCFGCutoffCallback``,
      ``SDXLCFGCutoffCallback`` and ``SD3CFGCutoffCallback`` at batch 1, and correct at any batch.

    After a run ``report["last_guided_step"]`` states the last guided step (the trace has it too).
    Cutting CFG on Flux cuts its true CFG (``true_cfg_scale``), which no callback can reach.
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
        self.ratio = _fraction("ratio", ratio) if ratio is not None else None
        self.step = _step_arg("step", step) if step is not None else None
        if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or sigma < 0 or sigma != sigma):
            raise DlxError(f"argument `sigma` must be a non-negative number; got {sigma!r}")
        if sigma is not None and compat == "diffusers":
            raise DlxError("argument `sigma` has no diffusers equivalent; use compat='dlx'")
        self.sigma = float(sigma) if sigma is not None else None
        self.compat = compat
        self._guided: int | None = None

    def __repr__(self):
        arg = next(f"{n}={v!r}" for n, v in (("ratio", self.ratio), ("step", self.step), ("sigma", self.sigma)) if v is not None)
        return f"CFGCutoff({arg}, compat={self.compat!r})"

    def guided_steps(self, run: Run) -> int:
        """How many leading steps are guided in this run."""
        n = run.num_steps
        if self.step is not None and self.step >= n:
            raise DlxError(f"argument `step` ({self.step}) must be less than the run's number of steps ({n})")
        if self.compat == "diffusers":
            k = self.step if self.step is not None else int(n * self.ratio)
            return min(k + 1, n)
        if self.ratio is not None:
            return boundary(self.ratio, n)
        if self.step is not None:
            return self.step
        sig = [run.sigma(i) for i in range(n)]
        return next((i for i, s in enumerate(sig) if not s > self.sigma), n)

    def on_loop_start(self, run: Run):
        self._guided = self.guided_steps(run)
        self.report.update(guided_steps=self._guided,
                           last_guided_step=self._guided - 1 if self._guided > 0 else None)

    def guidance(self, run: Run, step: int, batch: int):
        return step < self._guided, None


_NAMED = ("constant", "linear", "cosine")


class GuidanceSchedule(_Control):
    """Guidance scale as a function of progress p = i / N (Wang et al. 2024, arXiv 2404.13040,
    who find increasing schedules beat constant guidance).

    ``schedule`` is ``"constant"``, ``"linear"`` (``low`` → ``high``), ``"cosine"`` (``low`` → ``high``
    along a half cosine) or any callable ``f(p) -> scale`` (a float, or one per sample). ``high``
    defaults to ``2·s − low`` where s is the call's ``guidance_scale``, so a linear schedule keeps
    the constant one's mean. A scale of exactly 1 skips the unconditional pass (u + 1·(c − u) = c).
    The call's ``guidance_scale`` must be > 1 so the pipeline builds the unconditional batch.
    """

    def __init__(self, schedule="linear", *, low: float = 1.0, high: float | None = None):
        super().__init__()
        if not (callable(schedule) or schedule in _NAMED):
            raise DlxError(f"argument `schedule` must be one of {list(_NAMED)} or a callable; got {schedule!r}")
        for name, v in (("low", low), ("high", high)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or v < 0):
                raise DlxError(f"argument `{name}` must be a non-negative number; got {v!r}")
        self.schedule = schedule
        self.low = float(low)
        self.high = None if high is None else float(high)

    def __repr__(self):
        return f"GuidanceSchedule({self.schedule!r}, low={self.low}, high={self.high})"

    def scale_at(self, p: float, default: float):
        if callable(self.schedule):
            return self.schedule(p)
        hi = self.high if self.high is not None else 2 * default - self.low
        if self.schedule == "constant":
            return default
        if self.schedule == "linear":
            return self.low + (hi - self.low) * p
        return self.low + (hi - self.low) * (1 - math.cos(math.pi * p)) / 2

    def on_loop_start(self, run: Run):
        if run.family.cfg == "batch" and not getattr(run.pipe, "do_classifier_free_guidance", False):
            raise DlxError(
                f"GuidanceSchedule needs the call's guidance_scale > 1 (got {run.pipe.guidance_scale!r}) so "
                "that the pipeline builds the unconditional batch"
            )
        self.report["scales"] = []

    def guidance(self, run: Run, step: int, batch: int):
        default = float(run.pipe.guidance_scale) if run.family.cfg == "batch" else run.flux_scale
        s = self.scale_at(step / run.num_steps, default)
        vals = s.tolist() if isinstance(s, torch.Tensor) else (list(s) if isinstance(s, (list, tuple)) else [s] * batch)
        if len(vals) != batch:
            raise DlxError(f"schedule returned {len(vals)} scales at step {step}; the batch has {batch} samples")
        for v in vals:
            if not isinstance(v, numbers.Real) or not v >= 0 or math.isinf(v):
                raise DlxError(f"schedule returned guidance scale {v!r} at step {step}; scales must be finite and >= 0")
        if len(self.report["scales"]) <= step:
            self.report["scales"].append(vals)
        return [v != 1.0 for v in vals], vals


class AdaptiveCutoff(_Control):
    """Adaptive Guidance (Castillo et al. 2023, arXiv 2312.12487): stop guiding a sample once the
    cosine similarity of its conditional and unconditional predictions exceeds ``threshold``
    (0.99 by default, as in the public reference node). Per sample and for the rest of the run;
    ``report["stopped_at"]`` gives each sample's first unguided step (None: guided to the end).

    Deciding needs the similarity on the host: one small device sync per guided step.
    """

    wants_calls = True

    def __init__(self, threshold: float = 0.99):
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not (0.0 < threshold <= 1.0):
            raise DlxError(f"argument `threshold` must be in (0, 1]; got {threshold!r}")
        self.threshold = float(threshold)
        self._stopped: list[int | None] = []

    def __repr__(self):
        return f"AdaptiveCutoff(threshold={self.threshold})"

    def on_run_start(self, run: Run):
        super().on_run_start(run)
        self._stopped = []
        self.report["cos"] = []

    def guidance(self, run: Run, step: int, batch: int):
        if not self._stopped:
            self._stopped = [None] * batch
        return [s is None for s in self._stopped], None

    def on_denoiser(self, run: Run, call: DenoiserCall):
        if call.uncond is None:
            return
        c = call.cond.float().flatten(1)
        u = call.uncond.float().flatten(1)
        cos = torch.nn.functional.cosine_similarity(c, u, dim=1).tolist()
        self.report["cos"].append(cos)
        for j, v in enumerate(cos):
            if self._stopped[j] is None and v == v and v > self.threshold:
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
    """

    def __init__(self, ratio=None, *, step=None):
        super().__init__()
        if (ratio is None) == (step is None):
            raise DlxError(f"IPAdapterCutoff takes exactly one of `ratio`, `step`; got ratio={ratio!r}, step={step!r}")
        self.ratio = _fraction("ratio", ratio) if ratio is not None else None
        self.step = _step_arg("step", step) if step is not None else None
        self._saved = None

    def __repr__(self):
        return f"IPAdapterCutoff(ratio={self.ratio}, step={self.step})"

    def on_run_start(self, run: Run):
        super().on_run_start(run)
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
