"""Interrupt: stops where it says, reports why (attached and as a plain callback), reusable."""

import threading

import pytest
from diffusers.callbacks import MultiPipelineCallbacks

import dlx

from .helpers import pipe_for, run


def test_reused_interrupt_reports_only_its_last_run():
    pipe = pipe_for("sd")
    stop = dlx.Interrupt(after_step=1)
    with dlx.record(pipe, stop):
        run(pipe, "sd")
    assert stop.report["stopped_after_step"] == 1
    stop.after_step = 10  # never reached in a 4-step run
    with dlx.record(pipe, stop):
        run(pipe, "sd")
    assert stop.report == {}
    # the same as a plain callback
    stop.after_step = 0
    run(pipe, "sd", callback_on_step_end=stop)
    assert stop.report["stopped_after_step"] == 0
    stop.after_step = 10
    run(pipe, "sd", callback_on_step_end=stop)
    assert stop.report == {}


def test_repr_says_whether_the_event_is_set():
    ev = threading.Event()
    assert "event=clear" in repr(dlx.Interrupt(event=ev))
    ev.set()
    assert "event=set" in repr(dlx.Interrupt(event=ev))
    assert "event=None" in repr(dlx.Interrupt(after_step=1))


def test_bare_recorder_after_a_bare_interrupt_gets_metadata_and_the_stop_reason():
    pipe = pipe_for("sd")
    stop, rec = dlx.Interrupt(after_step=1), dlx.Recorder(pipe)
    run(pipe, "sd", steps=6, callback_on_step_end=MultiPipelineCallbacks([stop, rec]))
    t = rec.trace
    assert len(t) == 2 and t.stop_reason == "after_step=1"
    assert t.meta["pipeline"] == "StableDiffusionPipeline" and t.meta["versions"]["dlx"] == dlx.__version__


def test_bare_recorder_before_the_interrupt_says_its_run_is_incomplete():
    pipe = pipe_for("sd")
    stop, rec = dlx.Interrupt(after_step=1), dlx.Recorder(pipe)
    run(pipe, "sd", steps=6, callback_on_step_end=MultiPipelineCallbacks([rec, stop]))
    t = rec.trace
    assert len(t) == 2 and t.stop_reason.startswith("incomplete") and t.meta["pipeline"] == "StableDiffusionPipeline"


def test_interrupt_attached_sets_the_stop_reason_and_restores_the_flag():
    pipe = pipe_for("sd")
    with dlx.record(pipe, dlx.Interrupt(after_step=2)) as trace:
        run(pipe, "sd", steps=6)
    assert len(trace) == 3 and trace.stop_reason == "after_step=2"
    assert pipe.interrupt is False


@pytest.mark.parametrize("kw, match", [
    (dict(after_step=1.5), r"`after_step`.*1\.5"),
    (dict(seconds=float("nan")), r"`seconds`.*nan"),
    (dict(on_nonfinite="yes"), r"`on_nonfinite`.*'yes'"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(dlx.DlxError, match=match):
        dlx.Interrupt(**kw)


# -- where Interrupt acts: after the other parts and the caller's callback (runs_last) ---------------

def test_interrupt_attached_first_still_sees_what_the_callers_callback_did_that_step():
    """A stop requested by the caller's callback during step 1 ends the run after step 1: the
    Interrupt is checked after that callback, though it is attached before everything else."""
    pipe = pipe_for("sd")
    ev = threading.Event()

    def user(p, step, t, kw):
        if step == 1:
            ev.set()
        return kw

    with dlx.record(pipe, dlx.Interrupt(event=ev), dlx.CFGCutoff(ratio=0.5)) as trace:
        run(pipe, "sd", steps=6, callback_on_step_end=user)
    assert len(trace) == 2 and trace.stop_reason == "stop requested (event set) after step 1"


def test_interrupt_checks_the_latents_the_callers_callback_returned():
    pipe = pipe_for("sd")

    def poison(p, step, t, kw):
        if step == 2:
            kw["latents"] = kw["latents"] * float("nan")
        return kw

    with dlx.record(pipe, dlx.Interrupt(on_nonfinite=True)) as trace:
        run(pipe, "sd", steps=6, callback_on_step_end=poison)
    assert len(trace) == 3 and trace.stop_reason == "non-finite latents at step 2"
    assert trace[2].latents.isnan().all(), "the recorder, also runs_last, saw the same latents"


class _Logged(dlx.Part):
    def __init__(self, name, log, runs_last=False):
        self.name, self.log, self.runs_last = name, log, runs_last

    def on_step_end(self, run, step, timestep, kw):
        self.log.append(self.name)
        return kw

    def on_run_end(self, run, error):
        self.log.append(f"{self.name} end")


class _LoggedInterrupt(dlx.Interrupt):
    def __init__(self, log, **kw):
        super().__init__(**kw)
        self.log = log

    def on_step_end(self, run, step, timestep, kw):
        self.log.append("interrupt")
        return super().on_step_end(run, step, timestep, kw)

    def on_run_end(self, run, error):
        self.log.append("interrupt end")


def test_runs_last_orders_step_ends_and_run_ends():
    pipe = pipe_for("sd")
    log = []

    def user(p, step, t, kw):
        log.append("user")
        return kw

    parts = _LoggedInterrupt(log, after_step=0), _Logged("last", log, runs_last=True), _Logged("part", log)
    with dlx.attach(pipe, *parts):
        run(pipe, "sd", steps=3, callback_on_step_end=user)
    # one step (stopped after step 0): other parts, the caller's callback, runs_last parts in the
    # order given; at the run's end the other parts first
    assert log == ["part", "user", "interrupt", "last", "part end", "interrupt end", "last end"]
    assert parts[0].report["stopped_after_step"] == 0


def test_the_parts_that_run_last():
    from dlx.recorder import Ledger  # the sweep's and the cost model's record of a run

    assert dlx.Part.runs_last is False and dlx.CFGCutoff.runs_last is False
    assert dlx.Interrupt.runs_last and dlx.Recorder.runs_last and dlx.Preview.runs_last and Ledger.runs_last
    assert not hasattr(dlx.Interrupt, "observer"), "the old flag name is gone: it said Interrupt observes"
