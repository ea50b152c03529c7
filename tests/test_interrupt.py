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
