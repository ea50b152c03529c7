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
