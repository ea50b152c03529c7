"""dlx.plots: (fig, ax) back, the axes given are used, the Pareto front respects the direction."""

from __future__ import annotations

import pandas as pd
import pytest

from dlx import DlxError
from dlx.plots import pareto_front, quality_vs_cutoff, speed_quality


def _summary(hib=True):
    s = pd.DataFrame({"config": ["cutoff=0", "cutoff=0.5", "cutoff=1", "odd"], "cutoff": [0.0, 0.5, 1.0, None],
                      "nfe": [25, 37, 50, 40], "time_eager_s": [1.0, 1.5, 2.0, 1.8],
                      "regime_eager": ["denoiser-bound"] * 4,
                      "adherence": [0.6, 0.9, 0.95, 0.7], "adherence_lo": [0.5, 0.8, 0.9, 0.6],
                      "adherence_hi": [0.7, 1.0, 1.0, 0.8]})
    s.attrs["higher_is_better"] = {"adherence": hib}
    return s


def test_pareto_front_by_direction():
    x, y = [1.0, 1.5, 2.0, 1.8], [0.6, 0.9, 0.95, 0.7]
    assert pareto_front(x, y, True) == [0, 1, 2]
    assert pareto_front(x, y, False) == [0]


def test_speed_quality_returns_fig_ax_and_uses_the_axes_given():
    import matplotlib.pyplot as plt

    fig, ax = speed_quality(_summary())
    assert ax.figure is fig and "predicted wall time" in ax.get_xlabel() and "denoiser-bound" in ax.get_xlabel()
    assert "higher is better" in ax.get_ylabel()
    assert any(line.get_label() == "Pareto front" for line in ax.get_lines())
    n = len(plt.get_fignums())
    fig2, ax2 = plt.subplots()
    f, a = speed_quality(_summary(), mode="nfe", ax=ax2)
    assert a is ax2 and f is fig2 and "NFE" in a.get_xlabel()
    assert len(plt.get_fignums()) == n + 1  # only the one the caller made: plots never open figures
    plt.close(fig2)


def test_quality_vs_cutoff_and_bad_arguments():
    fig, ax = quality_vs_cutoff(_summary(hib=False))
    assert "lower is better" in ax.get_ylabel()
    assert list(ax.get_lines()[0].get_xdata()) == [0.0, 0.5, 1.0]
    with pytest.raises(DlxError, match="`metric`"):
        speed_quality(_summary(), metric="fid")
    with pytest.raises(DlxError, match="`mode`"):
        speed_quality(_summary(), mode="compiled")


def _psnr_summary():
    s = pd.DataFrame({"config": ["cutoff=0", "cutoff=0.5", "cutoff=1"], "cutoff": [0.0, 0.5, 1.0],
                      "is_reference": [False, False, True], "nfe": [25, 37, 50], "time_eager_s": [1.0, 1.5, 2.0],
                      "time_eager_vs_full": [0.5, 0.75, 1.0], "time_eager_vs_full_lo": [0.45, 0.7, 1.0],
                      "time_eager_vs_full_hi": [0.55, 0.8, 1.0], "timing_steady_eager": [True, False, True],
                      "regime_eager": ["denoiser-bound"] * 3,
                      "psnr": [18.0, 42.0, float("inf")], "psnr_lo": [17.0, 40.0, float("inf")],
                      "psnr_hi": [19.0, 44.0, float("inf")]})
    s.attrs["higher_is_better"] = {"psnr": True}
    return s


def test_the_reference_is_left_off_a_psnr_axis():
    import numpy as np

    fig, ax = speed_quality(_psnr_summary(), metric="psnr")
    ys = np.concatenate([line.get_ydata() for line in ax.get_lines()])
    assert set(ys[np.isfinite(ys)]) <= {17.0, 18.0, 19.0, 40.0, 42.0, 44.0} and not np.isinf(ys).any()
    lo, hi = ax.get_ylim()
    assert hi < 60  # the 18 -> 42 dB trend fills the axis, no point at 100 dB or infinity
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("not drawn: cutoff=1" in t and "∞" in t for t in legend)
    assert "timing not settled" in ax.get_xlabel()
    # the time's error bars: the share's interval, in seconds (reference time 2 s)
    caps = sorted({round(x, 6) for line in ax.get_lines() for x in line.get_xdata() if line.get_marker() == "|"})
    assert caps == [0.9, 1.1, 1.4, 1.6]
    fig, ax = quality_vs_cutoff(_psnr_summary(), metric="psnr")
    assert list(ax.get_lines()[0].get_xdata()) == [0.0, 0.5]


def test_one_colour_per_config_across_panels():
    from matplotlib.colors import to_hex

    from dlx.plots import config_colors, step_curves
    from dlx.testing import example_inputs, tiny_pipeline

    import dlx

    colors = config_colors(["cutoff=0", "cutoff=0.5", "cutoff=1"])
    assert len({to_hex(c) for c in colors.values()}) == 3
    fig, ax = speed_quality(_psnr_summary(), metric="psnr", colors=colors)
    dots = {to_hex(line.get_color()) for line in ax.get_lines() if line.get_marker() == "o"}
    assert dots == {to_hex(colors["cutoff=0"]), to_hex(colors["cutoff=0.5"])}
    pipe = tiny_pipeline("sd")
    traces = {}
    for name, parts in (("full", []), ("cut", [dlx.CFGCutoff(ratio=0.5)])):
        with dlx.record(pipe, *parts) as t:
            pipe(**example_inputs("sd", steps=4))
        traces[name] = t
    # the divergence panel leaves the reference out; "cut" keeps its colour all the same
    _, a1 = step_curves(traces, "cond_uncond_cos")
    _, a2 = step_curves(traces, "divergence", reference="full")
    c1 = {line.get_label(): to_hex(line.get_color()) for line in a1.get_lines()}
    c2 = {line.get_label(): to_hex(line.get_color()) for line in a2.get_lines()}
    assert c2["cut"] == c1["cut"] != c1["full"]
    _, a3 = step_curves(traces, "latent_std", colors={"cut": "#000000"})
    assert {line.get_label(): to_hex(line.get_color()) for line in a3.get_lines()}["cut"] == "#000000"
