"""dlx.timing: the timing regime judged from a trace's step times (policy beside the timing)."""

import math

import pytest

import dlx
from dlx.timing import HOST_BOUND_BELOW, regime
from dlx.trace import Step, Trace

from .helpers import pipe_for, run


def _trace(guided_ms, unguided_ms, n=6, guided=3, warmup=500.0):
    steps = [Step(index=i, timestep=0.0, sigma=1.0, guidance_scale=[5.0], cfg_active=[i < guided], nfe=[2.0],
                  step_ms=(guided_ms if i < guided else unguided_ms)) for i in range(n)]
    steps[0].step_ms = warmup  # warm-up outlier, left out
    return Trace(steps=steps, meta={"timing": "cuda-events"})


def test_regime_is_named_from_step_times():
    host = regime(_trace(29.2, 29.1))
    assert host["regime"] == "host-bound" and host["guided_ms"] == 29.2
    assert host["saving"] == pytest.approx(1 - 29.1 / 29.2) and host["timer"] == "cuda-events"
    dev = regime(_trace(7.15, 5.28))
    assert dev["regime"] == "denoiser-bound" and dev["saving"] == pytest.approx(1 - 5.28 / 7.15)
    only = regime(Trace(steps=_trace(1, 1).steps[:3], meta={}))
    assert only["regime"] == "unknown" and math.isnan(only["unguided_ms"]) and only["timer"] is None


def test_the_threshold_is_ten_percent_and_the_first_step_is_left_out():
    assert HOST_BOUND_BELOW == 0.10
    assert regime(_trace(10.0, 9.01))["regime"] == "host-bound"  # saves 9.9 %
    assert regime(_trace(10.0, 8.99))["regime"] == "denoiser-bound"  # saves 10.1 %
    # the warm-up step is the only slow guided one: left out, so it cannot decide
    assert regime(_trace(10.0, 9.5, warmup=1e6))["guided_ms"] == 10.0


def test_untimed_steps_and_zero_times_give_unknown_not_an_error():
    assert regime(_trace(math.nan, math.nan))["regime"] == "unknown"
    zero = regime(_trace(0.0, 0.0))
    assert zero["regime"] == "unknown" and math.isnan(zero["saving"])
    assert regime(Trace())["regime"] == "unknown"


def test_trace_timing_is_the_same_policy():
    t = _trace(7.15, 5.28)
    assert t.timing() == regime(t)


def test_of_a_real_cpu_run():
    pipe = pipe_for("sd")
    with dlx.record(pipe, dlx.CFGCutoff(ratio=0.5)) as t:
        run(pipe, "sd", steps=4)
    r = regime(t)
    assert r["timer"] == "perf_counter" and r["guided_ms"] > 0 and r["unguided_ms"] > 0
    assert r["regime"] in ("host-bound", "denoiser-bound")
