"""dlx.sweeps.cost: the cost model is fitted from steady calls, and says when the host was not."""

from __future__ import annotations

import pytest

from dlx.sweeps import cost

from .helpers import pipe_for


@pytest.fixture
def scripted(monkeypatch):
    """timed_call replaced by a script of pair times on a fake clock (1 s a call): no real calls."""
    clock = [0.0]
    script: list[float] = []
    seen = []

    def timed_call(pipe, kwargs, parts=()):
        clock[0] += 1.0
        (part,) = parts  # a cutoff at ratio 1 (guided) or 0, as a user runs a config
        kind = "guided" if part.ratio == 1 else "unguided"
        i = len(seen) // 2
        seen.append(kind)
        ms = script[min(i, len(script) - 1)]
        loop = ms - 10.0 if kind == "guided" else ms - 10.0 - 100.0  # 100 ms saved over 10 steps
        return ms if kind == "guided" else ms - 100.0, loop

    monkeypatch.setattr(cost, "timed_call", timed_call)
    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock[0])
    return script, seen


def _measure(repeats=4):
    return cost.measure(pipe_for("sd"), call={}, prompt="a red circle", seed=0, steps=10, scale=5.0,
                        repeats=repeats, warmup=1)


def test_a_slow_spell_at_the_start_is_left_out(scripted):
    script, seen = scripted
    # warm-up pair, then 3 pairs in a slow spell (+70 %), then the host's usual speed
    script[:] = [1000.0, 1700.0, 1700.0, 1700.0] + [1000.0] * 20
    m = _measure()
    assert m["steady"] and m["drift"] == 0.0
    assert m["full_ms"] == 1000.0 and m["none_ms"] == 900.0  # fitted on the last 4 (steady) pairs
    assert m["guided_step_ms"] == 99.0 and m["unguided_step_ms"] == 89.0 and m["fixed_ms"] == 10.0
    # 4 pairs, then more until the last 4 are steady: 3 more (the window moved past the spell)
    assert m["pairs_timed"] == 7 and len(seen) == 2 * (1 + 7)


def test_steady_calls_take_no_extra_pairs(scripted):
    script, _ = scripted
    script[:] = [1000.0, 1000.0, 1010.0, 990.0, 1000.0]
    m = _measure()
    assert m["steady"] and m["pairs_timed"] == 4 and m["full_ms"] == 1000.0


def test_a_host_that_never_settles_is_reported_not_hidden(scripted):
    script, _ = scripted
    # each pair 30 % slower than the last: never steady; extra pairs stop after as long again
    script[:] = [1000.0 * 1.3 ** i for i in range(40)]
    m = _measure()
    assert not m["steady"] and m["drift"] > cost.STEADY
    assert m["pairs_timed"] == 8  # 4 pairs took 8 s of the fake clock; 4 more in the next 8 s
    assert m["all_pairs_ms"][0] < m["all_pairs_ms"][-1]


def test_drift_compares_the_older_and_newer_halves():
    def pair(ms):
        return {"guided": (ms, 0.0), "unguided": (ms, 0.0)}

    assert cost.drift([pair(100.0)]) == 0.0
    assert cost.drift([pair(100.0), pair(110.0)]) == pytest.approx(0.10)
    assert cost.drift([pair(100.0), pair(300.0), pair(100.0), pair(100.0)]) == pytest.approx(0.5)  # medians of 2
    # one slow pair among three does not move a half's median
    assert cost.drift([pair(100.0), pair(300.0), pair(100.0), pair(100.0), pair(100.0), pair(100.0)]) == 0.0


def test_the_demo_says_when_the_timing_was_not_steady(tmp_path, monkeypatch):
    import dlx
    from dlx.demo import format_summary

    res = dlx.sweep(pipe_for("sd"), prompts=["a red circle"], seeds=[0], cutoffs=[0, 1.0], out=tmp_path,
                    timing=("eager",), timing_repeats=2, progress=False, metrics=["psnr", "ssim"],
                    num_inference_steps=2, guidance_scale=5.0, height=32, width=32)
    ((key, c),) = res.costs("eager").items()
    assert {"steady", "drift", "pairs_timed", "all_pairs_ms"} <= set(c)  # stored with the model
    unsteady = {key: {**c, "steady": False, "drift": 0.31}}
    monkeypatch.setattr(type(res), "costs", lambda self, mode="eager": unsteady if mode == "eager" else {})
    assert "still changing while these were measured (31%" in format_summary(res)
    monkeypatch.setattr(type(res), "costs", lambda self, mode="eager": {key: {**c, "steady": True}} if mode == "eager" else {})
    assert "still changing" not in format_summary(res)


class _FakeStore:
    def __init__(self, costs, batch=1):
        self._costs, self._batch, self.pairs, self.events = costs, batch, [], []

    def costs(self):
        return self._costs

    def meta(self, key, default=None):
        return self._batch if key == "timing_batch" else default

    def add_cost_pair(self, mode, steps, scale, batch, pair):
        self.pairs.append((mode, steps, scale, batch, pair))

    def event(self, kind, **detail):
        self.events.append((kind, detail))


def test_pairs_between_batches_stay_within_their_share_of_the_sweep(monkeypatch):
    from dlx.sweeps.spec import build_spec

    clock = [0.0]
    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock[0])

    def take_pair(pipe, **kw):
        clock[0] += 1.0  # a pair takes 1 s of the fake clock
        return {"guided": [100.0, 90.0], "unguided": [60.0, 50.0]}

    monkeypatch.setattr(cost, "take_pair", take_pair)
    spec = build_spec(prompts=["a red circle"], seeds=[0], cutoffs=[0, 1.0],
                      call={"num_inference_steps": 4, "guidance_scale": 5.0})
    store = _FakeStore([{"mode": "eager", "steps": 4, "scale": 5.0, "batch": 1},
                        {"mode": "compiled", "steps": 4, "scale": 5.0, "batch": 1}])
    timer = cost.Interleaved(pipe_for("sd"), spec, store)
    assert timer.mode == "eager"  # the tiny pipeline is not compiled: its eager model only
    clock[0] += 30.0  # a batch of 30 s: 10 % of it allows 3 pairs (the most between two batches)
    assert timer.after_batch(4, 5.0) == 3 and len(store.pairs) == 3
    clock[0] += 5.0  # 3 s of pairs in 38 s: a fourth would pass 10 % of the sweep's time
    assert timer.after_batch(4, 5.0) == 0
    clock[0] += 10.0  # at 48 s one more fits (4 s); a fifth (5 s at 49 s) would not
    assert timer.after_batch(4, None) == 1
    assert timer.after_batch(8, 5.0) == 0  # no model for 8 steps
    assert {p[:4] for p in store.pairs} == {("eager", 4, 5.0, 1)}

    def fails(pipe, **kw):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(cost, "take_pair", fails)
    clock[0] += 1000.0
    assert timer.after_batch(4, 5.0) == 0 and store.events[0][0] == "timing_pair_failed"
    assert timer.after_batch(4, 5.0) == 0 and len(store.events) == 1  # the timing stops; the sweep goes on


def test_pairs_refit_the_model_and_say_when_it_drifted():
    calls = {"guided": [1100.0, 1100.0], "unguided": [600.0, 600.0]}
    loops = {"guided": [1000.0, 1000.0], "unguided": [500.0, 500.0]}
    c = {**cost.fit(calls, loops, 10), "steps": 10, "steady": True, "drift": 0.0}
    assert cost.with_pairs(c, []) == {**c, "pairs": 2, "sweep_pairs": 0}
    same = cost.with_pairs(c, [{"guided": [1100.0, 1000.0], "unguided": [600.0, 500.0]}] * 2)
    assert same["steady"] and same["pairs"] == 4 and same["guided_step_ms"] == 100.0
    slow = cost.with_pairs(c, [{"guided": [2200.0, 2000.0], "unguided": [1200.0, 1000.0]}] * 3)
    assert not slow["steady"] and slow["drift"] == pytest.approx(1.0) and slow["guided_step_ms"] == 200.0
    lo, hi = cost.share_ci(same, [0.0, 10.0], 10.0)
    assert lo == pytest.approx([600 / 1100, 1.0]) and hi == pytest.approx([600 / 1100, 1.0])


def test_extra_single_passes_are_costed_as_unguided_steps():
    # a perturbation guider's third pass (+1 per pass) and a CFG-Zero* zero step (−1: no pass at
    # all) are read from the record's NFE and costed as one call of the conditional rows
    calls = {"guided": [1100.0, 1100.0], "unguided": [600.0, 600.0]}
    loops = {"guided": [1000.0, 1000.0], "unguided": [500.0, 500.0]}
    c = cost.with_pairs({**cost.fit(calls, loops, 10), "steps": 10, "steady": True, "drift": 0.0}, [])
    assert cost.predict_ms(c, 10, 10) == pytest.approx(1100.0)
    assert cost.predict_ms(c, 10, 10, 9) == pytest.approx(1100.0 + 9 * 50.0)
    assert cost.predict_ms(c, 9, 10, -1) == pytest.approx(100.0 + 9 * 100.0)
    lo, hi = cost.share_ci(c, [10.0, 4.0], 10.0, extra=[9.0, 0.0])
    assert lo == pytest.approx([1550 / 1100, 800 / 1100]) and hi == pytest.approx(lo)
    lo, hi = cost.share_ci(c, [10.0], 10.0, extra=[0.0], reference_extra=9.0)
    assert lo == pytest.approx([1100 / 1550])
