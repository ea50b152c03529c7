"""Interrupt: stop a run early and say why. The partial latents are still decoded (diffusers)."""

from __future__ import annotations

import numbers
import time
import weakref

import torch

from . import _diffusers as D
from .errors import DlxError
from .protocol import Part
from .run import Run

__all__ = ["Interrupt"]

# Why a plain-callback Interrupt stopped a pipeline's call, for a plain Recorder after it in the
# same MultiPipelineCallbacks (the pipeline has no place for it).
_BARE_REASONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def bare_stop_reason(pipe) -> str:
    """Why the pipeline's interrupt flag is set, as far as dlx knows."""
    try:
        reason = _BARE_REASONS.get(pipe)
    except TypeError:  # an unhashable pipeline object
        reason = None
    return reason or "interrupted (the pipeline's interrupt flag was set by a callback)"


class Interrupt(Part):
    """Stop after step ``after_step``, after ``seconds`` of denoising, on NaN/inf latents
    (``on_nonfinite=True``; costs one device sync per step) or when ``event`` (a
    ``threading.Event`` or anything with ``is_set()``, e.g. a gallery's Stop button) is set.

    Sets ``pipe._interrupt``, so diffusers skips the remaining steps and decodes what it has. Works
    as a plain ``callback_on_step_end``; attached, the trace's ``stop_reason`` says why it stopped.
    """

    tensor_inputs = ["latents"]
    # Checked after the other parts and the caller's callback, so it sees each step's final
    # latents and a stop event set during the step; it sets the flag the loop reads at the next step.
    runs_last = True

    def __init__(self, after_step=None, *, seconds=None, on_nonfinite: bool = False, event=None):
        if after_step is not None and (isinstance(after_step, bool) or not isinstance(after_step, numbers.Integral) or after_step < 0):
            raise DlxError(f"argument `after_step` must be a non-negative int; got {after_step!r}")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not seconds > 0):
            raise DlxError(f"argument `seconds` must be a positive number; got {seconds!r}")
        if event is not None and not callable(getattr(event, "is_set", None)):
            raise DlxError(f"argument `event` must have an is_set() method (threading.Event); got {event!r}")
        if not isinstance(on_nonfinite, bool):
            raise DlxError(f"argument `on_nonfinite` must be a bool; got {on_nonfinite!r}")
        if after_step is None and seconds is None and not on_nonfinite and event is None:
            raise DlxError("Interrupt needs at least one of `after_step`, `seconds`, `on_nonfinite`, `event`")
        self.after_step = after_step
        self.seconds = seconds
        self.on_nonfinite = on_nonfinite
        self.event = event
        self.report: dict = {}
        self._t0 = None

    def __repr__(self):
        ev = None if self.event is None else ("set" if self.event.is_set() else "clear")
        return (f"Interrupt(after_step={self.after_step}, seconds={self.seconds}, "
                f"on_nonfinite={self.on_nonfinite}, event={ev})")

    def _config_args(self) -> dict:
        return {"after_step": self.after_step, "seconds": self.seconds, "on_nonfinite": self.on_nonfinite,
                "event": self.event}

    def on_run_start(self, run: Run):
        self.report = {}
        self._t0 = None

    def on_loop_start(self, run: Run):
        self._t0 = time.perf_counter()

    def _reason(self, step, callback_kwargs) -> str | None:
        if self.event is not None and self.event.is_set():
            return f"stop requested (event set) after step {step}"
        if self.on_nonfinite:
            lat = callback_kwargs.get("latents")
            if lat is not None and not bool(torch.isfinite(lat).all()):
                return f"non-finite latents at step {step}"
        if self.after_step is not None and step >= self.after_step:
            return f"after_step={self.after_step}"
        if self.seconds is not None and self._t0 is not None and time.perf_counter() - self._t0 >= self.seconds:
            return f"time budget of {self.seconds} s spent after step {step}"
        return None

    def on_step_end(self, run: Run, step, timestep, callback_kwargs):
        reason = self._reason(step, callback_kwargs)
        if reason is not None:
            run.stop(reason)
            self.report.update(stop_reason=reason, stopped_after_step=int(step))
        return callback_kwargs

    def on_plain_step_end(self, pipe, step, timestep, callback_kwargs):
        if step == 0:
            self._t0 = time.perf_counter()  # bare: the clock starts at the first step's end
            self.report = {}
            try:
                _BARE_REASONS.pop(pipe, None)
            except TypeError:
                pass
        reason = self._reason(step, callback_kwargs)
        if reason is not None:
            D.set_interrupt(pipe, True)
            self.report.update(stop_reason=reason, stopped_after_step=int(step))
            try:
                _BARE_REASONS[pipe] = reason
            except TypeError:
                pass
        return callback_kwargs
