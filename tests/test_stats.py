"""dlx.stats and the sweep's statistics: intervals against known cases, the cluster bootstrap
against row resampling, paired differences, the time share's interval, the recommendation."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from dlx import DlxError, stats
from dlx.sweeps import cost
from dlx.sweeps.result import SweepResult
from dlx.sweeps.spec import build_spec
from dlx.sweeps.store import Store

Z = 1.959963984540054  # the 97.5 % standard normal quantile


# --- proportions ----------------------------------------------------------------------------------


def test_wilson_known_cases():
    # n of n: the lower bound is n / (n + z²), not 1 (the "100% [100%, 100%]")
    lo, hi = stats.wilson(16, 16)
    assert lo == pytest.approx(16 / (16 + Z * Z), abs=1e-12) and hi == 1.0
    assert lo == pytest.approx(0.8064, abs=1e-4)
    lo, hi = stats.wilson(0, 16)
    assert lo == 0.0 and hi == pytest.approx(Z * Z / (16 + Z * Z), abs=1e-12)
    lo, hi = stats.wilson(8, 16)  # symmetric about 1/2
    half = Z * math.sqrt(0.25 / 16 + Z * Z / (4 * 16 ** 2)) / (1 + Z * Z / 16)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert (lo, hi) == pytest.approx((0.2800, 0.7200), abs=1e-4)
    assert all(math.isnan(x) for x in stats.wilson(0, 0))
    assert stats.z_of(0.95) == pytest.approx(Z, abs=1e-12)


def test_clopper_pearson_known_cases():
    # closed forms at the edges: (α/2)^(1/n)
    assert stats.clopper_pearson(0, 16) == pytest.approx((0.0, 1 - 0.025 ** (1 / 16)), abs=1e-9)
    assert stats.clopper_pearson(16, 16) == pytest.approx((0.025 ** (1 / 16), 1.0), abs=1e-9)
    lo, hi = stats.clopper_pearson(8, 16)
    assert lo == pytest.approx(1 - hi, abs=1e-9) and (lo, hi) == pytest.approx((0.2465, 0.7535), abs=1e-4)
    beta = pytest.importorskip("scipy.stats").beta  # the textbook form, where scipy is there
    assert (lo, hi) == pytest.approx((beta.ppf(0.025, 8, 9), beta.ppf(0.975, 9, 8)), abs=1e-9)
    with pytest.raises(DlxError, match="`k`"):
        stats.clopper_pearson(3, 2)


def test_clustered_proportions_use_the_effective_n():
    prompts = np.repeat(["a", "b", "c", "d"], 4)
    # every image passes: no spread, nothing to shrink: exactly Wilson's 16/16
    lo, hi, how = stats.proportion_ci(np.ones(16), prompts)
    assert (lo, hi) == stats.wilson(16, 16) and how.startswith("Wilson score")
    # 8 of 16, but by prompt all or nothing: the seeds repeat their prompt's answer. The design
    # effect is 4/3 · (4 · 2²) / 16² / (1/4 / 16) = 16/3, so the 16 images count as 3
    y = np.array([1.0] * 8 + [0.0] * 8)
    assert stats.design_effect(y, prompts) == pytest.approx(16 / 3)
    lo, hi, how = stats.proportion_ci(y, prompts)
    assert (lo, hi) == pytest.approx(stats.wilson(1.5, 3)) and how == stats.WILSON_CLUSTERED
    assert hi - lo > 1.5 * np.subtract(*stats.wilson(8, 16)[::-1])
    # 2 of 4 in every prompt: prompts agree, the design effect is 1: Wilson's 8/16
    y = np.tile([1.0, 0.0, 1.0, 0.0], 4)
    assert stats.proportion_ci(y, prompts)[:2] == pytest.approx(stats.wilson(8, 16))
    # one prompt: plain Wilson, and NaNs are left out
    assert stats.proportion_ci([1, 0, 1, math.nan])[:2] == stats.wilson(2, 3)
    with pytest.raises(DlxError, match="0 or 1"):
        stats.proportion_ci([0.5, 1.0])


# --- bootstraps -------------------------------------------------------------------------------------


def test_bootstrap_ci_edge_cases_and_median():
    assert all(math.isnan(x) for x in stats.bootstrap_ci([3.0]))
    assert stats.bootstrap_ci([2.0, 2.0, math.nan]) == (2.0, 2.0)
    lo, hi = stats.bootstrap_ci([1.0, 2.0, 3.0, 4.0, 100.0], stat="median")
    assert 1.0 <= lo <= 3.0 <= hi <= 100.0
    with pytest.raises(DlxError, match="`level`"):
        stats.bootstrap_ci([1.0, 2.0], level=95)
    with pytest.raises(DlxError, match="`n_boot`"):
        stats.mean_ci([1.0, 2.0], n_boot=0)


def _two_level(rng, n_prompts, n_seeds, prompt_sd=10.0, seed_sd=1.0):
    """Values of a two-level model (true mean 0): a prompt effect shared by its seeds, plus noise."""
    effects = rng.normal(0, prompt_sd, n_prompts)
    v = (effects[:, None] + rng.normal(0, seed_sd, (n_prompts, n_seeds))).reshape(-1)
    return v, np.repeat(np.arange(n_prompts), n_seeds)


def test_row_resampling_is_too_narrow_where_prompts_differ():
    rng = np.random.default_rng(1)
    # one sample: 4 prompts far apart, 4 seeds each close to their prompt
    v = np.array([0.0, 0.5, 1.0, 0.5, 10, 10.5, 11, 10.5, 20, 20.5, 21, 20.5, 30, 30.5, 31, 30.5])
    clusters = np.repeat(["a", "b", "c", "d"], 4)
    rows = stats.bootstrap_ci(v)
    clus = stats.cluster_bootstrap_ci(v, clusters)
    assert clus[0] < rows[0] < v.mean() < rows[1] < clus[1]
    assert (clus[1] - clus[0]) > 1.7 * (rows[1] - rows[0])  # the mean rests on 4 prompts, not 16 images
    # coverage of the true mean over repeated studies (8 prompts × 4 seeds): rows miss it far more
    # often than 5 %; prompts then seeds come close to the level asked
    hit_rows = hit_clus = 0
    for _ in range(200):
        v, c = _two_level(rng, 8, 4)
        lo, hi = stats.bootstrap_ci(v, n=400, seed=int(rng.integers(1 << 30)))
        hit_rows += lo <= 0 <= hi
        lo, hi = stats.cluster_bootstrap_ci(v, c, n=400, seed=int(rng.integers(1 << 30)))
        hit_clus += lo <= 0 <= hi
    # (measured: 0.57 and 0.86; percentile bootstraps with 8 clusters cover a little under 95 %)
    assert hit_rows / 200 < 0.7 and hit_clus / 200 > 0.8 and hit_clus - hit_rows > 0.2 * 200


def test_mean_ci_picks_the_method_by_the_data():
    v = [1.0, 2.0, 3.0, 4.0]
    assert stats.mean_ci(v)[3] == stats.BOOTSTRAP
    assert stats.mean_ci(v, ["a", "a", "b", "b"])[3] == stats.CLUSTER_BOOTSTRAP
    assert stats.mean_ci([1, 0, 1, 1], binary=True)[1:] == (*stats.wilson(3, 4), stats.WILSON)
    mean, lo, hi, _ = stats.mean_ci([math.nan, 2.0, 4.0])
    assert mean == 3.0 and lo <= 3.0 <= hi


# --- paired differences -------------------------------------------------------------------------------


def test_newcombe_paired_known_cases():
    # both configs pass every one of 16 images: a difference of 0 within ± (1 − Wilson's lower
    # bound), not the [0, 0] a bootstrap of sixteen zeros gives
    w = 1 - 16 / (16 + Z * Z)
    assert stats.newcombe_paired(16, 0, 0, 0) == pytest.approx((-w, w), abs=1e-12)
    assert stats.paired_proportion_ci(np.ones(16), np.ones(16))[:2] == pytest.approx((-w, w), abs=1e-12)
    # swapping the configs mirrors the interval
    lo, hi = stats.newcombe_paired(10, 4, 1, 5)
    assert stats.newcombe_paired(10, 1, 4, 5) == pytest.approx((-hi, -lo), abs=1e-12)
    assert lo < 3 / 20 < hi
    # positively correlated pairs (phi > 0) give a narrower interval than a table with the same
    # margins (14/20 and 11/20) and no correlation (phi = 0)
    ilo, ihi = stats.newcombe_paired(7.7, 6.3, 3.3, 2.7)
    assert ihi - ilo > 1.2 * (hi - lo) and (ilo + ihi) / 2 == pytest.approx((lo + hi) / 2, abs=0.05)


def test_newcombe_paired_covers_at_about_its_level():
    rng = random.Random(0)
    n, p1, p2, rho = 40, 0.8, 0.7, 0.5
    # correlated 0/1 pairs from a shared uniform: P(x)=p1, P(y)=p2
    hits = 0
    for _ in range(2000):
        a = b = c = d = 0
        for _ in range(n):
            u = rng.random()
            v = u if rng.random() < rho else rng.random()
            x, y = u < p1, v < p2
            a += x and y
            b += x and not y
            c += y and not x
            d += not x and not y
        lo, hi = stats.newcombe_paired(a, b, c, d)
        hits += lo <= p1 - p2 <= hi
    assert 0.93 <= hits / 2000 <= 0.985


def test_paired_differences_on_synthetic_frames():
    rng = np.random.default_rng(3)
    prompt_effect = np.repeat(rng.normal(0, 5, 4), 4)  # shared by both configs on a prompt
    prompts = np.repeat(["a", "b", "c", "d"], 4)
    ref = 20 + prompt_effect + rng.normal(0, 0.2, 16)
    x = ref - 1.0 + rng.normal(0, 0.2, 16)  # a config one unit worse on every pair
    d, lo, hi, how = stats.paired_diff_ci(x, ref, prompts)
    assert d == pytest.approx(float(np.mean(x - ref)), abs=1e-12) and how == stats.CLUSTER_BOOTSTRAP
    assert (lo, hi) == stats.cluster_bootstrap_ci(x - ref, prompts)
    assert lo < -1.0 < hi and hi < -0.5  # the loss is seen
    # the same numbers unpaired: the prompts' spread swamps the one-unit loss
    mx, mr = stats.mean_ci(x, prompts), stats.mean_ci(ref, prompts)
    assert (hi - lo) < 0.2 * ((mx[2] - mx[1]) + (mr[2] - mr[1]))
    with pytest.raises(DlxError, match="pair up"):
        stats.paired_diff_ci([1.0], [1.0, 2.0])


# --- a synthetic sweep, written into a store directly ------------------------------------------------

STEPS = 10


def synthetic(out, *, n_prompts=4, n_seeds=4, cutoffs=(0.0, 0.5, 0.8, 1.0), value=None, info=None,
              pairs_ms=None, sweep_pairs=()):
    """A sweep folder with rows but no model: ``value(cutoff, prompt_index, seed) -> {metric: v}``;
    a cost model fitted from ``pairs_ms`` (guided loop ms, unguided loop ms, fixed ms per pair)."""
    info = info or {"adherence": {"higher_is_better": True, "reference": False}}
    prompts = [f"prompt {i}" for i in range(n_prompts)]
    spec = build_spec(prompts=prompts, seeds=range(n_seeds), cutoffs=list(cutoffs), metrics=list(info),
                      call={"num_inference_steps": STEPS, "guidance_scale": 5.0})
    st = Store(out)
    try:
        st.bind(spec)
        st.set_meta("metric_info", info)
        st.set_meta("timing_batch", 1)
        pairs_ms = pairs_ms or [(1000.0, 500.0, 100.0)] * 3
        calls = {"guided": [g + f for g, u, f in pairs_ms], "unguided": [u + f for g, u, f in pairs_ms]}
        loops = {"guided": [g for g, u, f in pairs_ms], "unguided": [u for g, u, f in pairs_ms]}
        st.set_cost("eager", STEPS, 5.0, 1, {**cost.fit(calls, loops, STEPS), "repeats": len(pairs_ms), "steady": True,
                                            "drift": 0.0, "device": "cpu", "device_name": "cpu", "batch": 1})
        for g, u, f in sweep_pairs:
            st.add_cost_pair("eager", STEPS, 5.0, 1, {"guided": [g + f, g], "unguided": [u + f, u]})
        cfgs = {c.name: c for c in spec.configs}
        for r in spec.rows():
            c = cfgs[r["config"]]
            k = round(c.cutoff * STEPS)
            st.add_row({"row_id": r["row_id"], "config": r["config"], "prompt": r["prompt"], "seed": r["seed"],
                        "status": "ok", "nfe": STEPS + k, "evaluations": STEPS + k, "guided_steps": k,
                        "metrics": value(c.cutoff, r["prompt_index"], r["seed"]), "batch": 1, "device": "cpu"})
    finally:
        st.close()
    return SweepResult(out)


def _adherence(losses):
    """Adherence 1 except where ``losses[cutoff](prompt, seed)`` says the image fails."""
    return lambda cut, p, s: {"adherence": 0.0 if losses.get(cut, lambda p, s: False)(p, s) else 1.0}


def test_summary_intervals_and_reference_on_a_synthetic_sweep(tmp_path):
    res = synthetic(tmp_path, value=_adherence({0.0: lambda p, s: p < 2}))  # cutoff 0 fails 2 prompts
    s = res.summary().set_index("config")
    assert s.attrs["interval_method"]["adherence"] == stats.WILSON_CLUSTERED
    assert s.attrs["reference"] == {(5.0, STEPS): "cutoff=1"}
    assert s.is_reference.to_dict() == {"cutoff=0": False, "cutoff=0.5": False, "cutoff=0.8": False, "cutoff=1": True}
    # 16/16: Wilson's [0.806, 1], not [1, 1]
    assert (s.loc["cutoff=1", "adherence_lo"], s.loc["cutoff=1", "adherence_hi"]) == stats.wilson(16, 16)
    assert s.loc["cutoff=1", "adherence_n"] == 16
    # 8/16 all or nothing by prompt: effective n 3
    assert (s.loc["cutoff=0", "adherence_lo"], s.loc["cutoff=0", "adherence_hi"]) == pytest.approx(stats.wilson(1.5, 3))
    # time share from the cost model: (f + k g + (N − k) u) / (f + N g), steps of 100 and 50 ms
    assert s.loc["cutoff=0", "time_eager_vs_full"] == pytest.approx((100 + 500) / (100 + 1000))
    assert s.loc["cutoff=0.5", "time_eager_vs_full"] == pytest.approx((100 + 500 + 250) / 1100)
    # identical timed pairs: the interval is the point
    assert s.loc["cutoff=0", "time_eager_vs_full_lo"] == pytest.approx(600 / 1100)
    assert s.loc["cutoff=0", "time_eager_vs_full_hi"] == pytest.approx(600 / 1100)
    assert s.timing_steady_eager.all()


def test_the_time_share_interval_comes_from_the_timed_pairs(tmp_path):
    noisy = [(1000.0, 500.0, 100.0), (1100.0, 520.0, 100.0), (950.0, 470.0, 100.0), (1040.0, 530.0, 100.0)]
    res = synthetic(tmp_path, value=_adherence({}), pairs_ms=noisy[:2], sweep_pairs=noisy[2:])
    c = res.costs("eager")[(STEPS, 5.0)]
    assert c["pairs"] == 4 and c["sweep_pairs"] == 2  # the pairs between batches refit the model
    assert c["guided_step_ms"] == pytest.approx(np.median([1000, 1100, 950, 1040]) / STEPS)
    s = res.summary().set_index("config")
    share, lo, hi = (s.loc["cutoff=0", k] for k in ("time_eager_vs_full", "time_eager_vs_full_lo",
                                                     "time_eager_vs_full_hi"))
    ratios = [(u + 100) / (g + 100) for g, u, _ in noisy]  # each pair's own share
    assert min(ratios) - 0.01 < lo < share < hi < max(ratios) + 0.01
    assert s.loc["cutoff=1", "time_eager_vs_full_lo"] == s.loc["cutoff=1", "time_eager_vs_full_hi"] == 1.0


def test_a_timing_that_drifted_across_the_sweep_is_marked(tmp_path):
    from dlx.demo import format_summary

    slow = [(2000.0, 1000.0, 200.0)] * 4  # the host at half speed later in the sweep
    res = synthetic(tmp_path, value=_adherence({}), sweep_pairs=slow)
    s = res.summary()
    assert not s.timing_steady_eager.any() and res.costs("eager")[(STEPS, 5.0)]["drift"] > cost.STEADY
    text = format_summary(res)
    assert "* the timing never settled" in text
    rows = [line for line in text.splitlines() if line.startswith("cutoff=")]
    assert len(rows) == 4 and all("]*" in line for line in rows)  # each share marked in the table


def test_compare_gives_paired_differences_with_the_reference_marked(tmp_path):
    # cutoff 0 fails seeds 0 and 1 of every prompt; the metric "score" drops 2 for cutoff 0
    value = lambda cut, p, s: {"adherence": 0.0 if cut == 0 and s < 2 else 1.0,  # noqa: E731
                               "score": 10.0 * p + s - (2.0 if cut == 0 else 0.0)}
    info = {"adherence": {"higher_is_better": True, "reference": False},
            "score": {"higher_is_better": True, "reference": False}}
    res = synthetic(tmp_path, value=value, info=info)
    cmp = res.compare().set_index("config")
    assert list(cmp.columns[:4]) == ["is_reference", "reference", "n_pairs", "nfe"]
    assert cmp.loc["cutoff=1", "is_reference"] and not cmp.loc["cutoff=0", "is_reference"]
    assert (cmp.n_pairs == 16).all()
    assert cmp.loc["cutoff=0", "score_diff"] == -2.0 and cmp.loc["cutoff=0", "score_diff_lo"] == -2.0
    assert cmp.loc["cutoff=0.5", "score_diff"] == 0.0
    assert cmp.loc["cutoff=0", "adherence_diff"] == -0.5
    lo, hi = cmp.loc["cutoff=0", "adherence_diff_lo"], cmp.loc["cutoff=0", "adherence_diff_hi"]
    # the same pairs' table, a = 8 both pass, c = 8 only the reference: the design effect is 1
    # (every prompt loses the same two seeds), so Newcombe's plain interval
    assert (lo, hi) == pytest.approx(stats.newcombe_paired(8, 0, 8, 0))
    assert cmp.attrs["method"] == {"adherence": stats.NEWCOMBE_CLUSTERED, "score": stats.CLUSTER_BOOTSTRAP}
    assert cmp.loc["cutoff=1", ["adherence_diff", "adherence_diff_lo", "adherence_diff_hi"]].tolist() == [0, 0, 0]
    # another reference, by name
    other = res.compare(reference="cutoff=0.5", metrics="score").set_index("config")
    assert other.loc["cutoff=0.5", "is_reference"] and other.loc["cutoff=0", "score_diff"] == -2.0
    assert "adherence_diff" not in other.columns
    with pytest.raises(DlxError, match="`reference`"):
        res.compare(reference="cutoff=0.3")
    with pytest.raises(DlxError, match="`metrics`"):
        res.compare(metrics=["fid"])


def test_reference_metrics_are_not_differenced_and_the_reference_is_infinite(tmp_path):
    base = {0.0: 15.0, 0.5: 28.0, 0.8: 34.0, 1.0: 100.0}  # 100: the metric's cap for identical images
    value = lambda cut, p, s: {"psnr": base[cut] + (s if cut < 1 else 0),  # noqa: E731
                               "ssim": 1.0 if cut == 1 else 0.8 + 0.2 * cut}
    info = {"psnr": {"higher_is_better": True, "reference": True},
            "ssim": {"higher_is_better": True, "reference": True}}
    res = synthetic(tmp_path, value=value, info=info)
    s = res.summary().set_index("config")
    assert s.loc["cutoff=1", "psnr"] == math.inf and s.loc["cutoff=1", "psnr_lo"] == math.inf
    assert s.loc["cutoff=1", "ssim"] == 1.0
    assert s.loc["cutoff=0.5", "psnr"] == pytest.approx(28 + 1.5)
    cmp = res.compare().set_index("config")
    assert cmp.attrs["kind"]["psnr"] == "against the reference image"
    assert cmp.loc["cutoff=0.5", "psnr_diff"] == s.loc["cutoff=0.5", "psnr"]  # its own value, not differenced
    assert cmp.loc["cutoff=1", "psnr_diff"] == math.inf
    # PSNR >= 30 dB at the lower bound: cutoff 0.8 (35.5 dB), not 0.5 (29.5 dB) nor 0 (16.5 dB)
    rec = res.recommend(metric="psnr")
    assert rec.config == "cutoff=0.8" and rec.margin == 30.0 and "psnr" in str(rec)


def test_recommend_picks_the_cheapest_non_inferior_config(tmp_path):
    # 4 prompts × 50 seeds: enough pairs to show a loss under 5 points; cutoff 0 fails half
    res = synthetic(tmp_path, n_seeds=50, value=_adherence({0.0: lambda p, s: s % 2 == 0}))
    rec = res.recommend()
    assert rec.config == "cutoff=0.5" and rec.metric == "adherence" and rec.margin == 0.05 and rec.mode == "eager"
    assert str(rec) == rec.sentence and rec.sentence.startswith("cutoff=0.5 is the cheapest config")
    assert "0.77 of full guidance's time" in rec.sentence  # (100 + 500 + 250) / 1100
    t = rec.table
    assert list(t.config) == ["cutoff=0", "cutoff=0.5", "cutoff=0.8"]  # cheapest first, the reference left out
    assert t.non_inferior.tolist() == [False, True, True]
    assert t.adherence_lo[1] >= -0.05
    # ordered by NFE alone where no timing is asked
    assert res.recommend(mode="nfe").config == "cutoff=0.5"
    # a margin no config meets
    none = res.recommend(margin=0.001)
    assert none.config is None and none.sentence.startswith("No config cheaper than full guidance")
    assert "keep full guidance" in none.sentence and "Closest: cutoff=0.5" in none.sentence
    with pytest.raises(DlxError, match="`metric`"):
        res.recommend(metric="fid")
    with pytest.raises(DlxError, match="`mode`"):
        res.recommend(mode="compiled")
    with pytest.raises(DlxError, match="`margin`"):
        res.recommend(margin=-0.1)


def test_recommend_says_none_when_16_images_cannot_show_it(tmp_path):
    # every config passes all 16 images, yet 16 pairs cannot bound a loss within 5 points
    res = synthetic(tmp_path, value=_adherence({}))
    rec = res.recommend()
    assert rec.config is None and not rec.table.non_inferior.any()
    assert rec.table.adherence_lo.tolist() == pytest.approx([-(1 - 16 / (16 + Z * Z))] * 3)
    assert "more seeds" in rec.sentence
    # with a margin of 0.2 the cheapest qualifies
    assert res.recommend(margin=0.2).config == "cutoff=0"


# --- timing across the sweep ----------------------------------------------------------------------------


def test_a_real_sweep_times_pairs_between_batches(tmp_path):
    import dlx

    from .helpers import pipe_for

    res = dlx.sweep(pipe_for("sd"), prompts=["a red circle", "a blue square"], seeds=[0, 1], cutoffs=[0, 1.0],
                    out=tmp_path, timing=("eager",), timing_repeats=2, progress=False, metrics=["psnr"],
                    max_batch=2, num_inference_steps=2, guidance_scale=5.0, height=32, width=32)
    store = Store(tmp_path)
    try:
        pairs = store.cost_pairs()
    finally:
        store.close()
    assert pairs and all(set(p) >= {"guided", "unguided", "at", "mode"} and p["mode"] == "eager" for p in pairs)
    c = res.costs("eager")[(2, 5.0)]
    assert c["sweep_pairs"] == len(pairs) and c["pairs"] == 2 + len(pairs)
    s = res.summary()
    assert s.time_eager_vs_full_lo.notna().all() and "timing_steady_eager" in s.columns
