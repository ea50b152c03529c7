"""Plots of sweep results. Each takes ``ax=None`` (a new figure) and returns ``(fig, ax)``; none
calls ``plt.show()``. They read summary frames (``SweepResult.summary()``) and never compute."""

from __future__ import annotations

import math

from .errors import DlxError

__all__ = ["speed_quality", "quality_vs_cutoff", "pareto_front"]


def _axes(ax, figsize=(5.5, 3.6)):
    import matplotlib

    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)  # not registered with pyplot: nothing shows by itself
        ax = fig.add_subplot()
        return fig, ax
    del matplotlib
    return ax.figure, ax


def _pick_metric(summary, metric):
    hib = summary.attrs.get("higher_is_better", {})
    if metric is None:
        cands = [m for m in ("adherence", "psnr", "ssim", "lpips", "clip") if m in summary.columns] + list(hib)
        if not cands:
            raise DlxError("argument `metric`: the summary has no metric columns")
        metric = cands[0]
    if metric not in summary.columns:
        raise DlxError(f"argument `metric` must be one of the summary's metrics {list(hib) or '?'}; got {metric!r}")
    return metric, bool(hib.get(metric, True))


def _pick_time(summary, mode):
    times = [c[len("time_"):-len("_s")] for c in summary.columns if c.startswith("time_") and c.endswith("_s")]
    if mode is None:
        if not times:
            return "nfe", "denoiser evaluations per sample (NFE)"
        mode = "eager" if "eager" in times else times[0]
    if mode == "nfe":
        return "nfe", "denoiser evaluations per sample (NFE)"
    if mode not in times:
        raise DlxError(f"argument `mode` must be one of {times + ['nfe']}; got {mode!r}")
    regime = summary.get(f"regime_{mode}")
    r = f", {regime.dropna().iloc[0]}" if regime is not None and len(regime.dropna()) else ""
    return f"time_{mode}_s", f"predicted wall time alone, s ({mode}{r})"


def pareto_front(xs, ys, higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both lower x and better y, by increasing x."""
    pts = sorted((x, (y if higher_is_better else -y), i) for i, (x, y) in enumerate(zip(xs, ys))
                 if x == x and y == y)
    front, best = [], -math.inf
    for x, y, i in pts:
        if y > best:
            front.append(i)
            best = y
    return front


def speed_quality(summary, metric: str | None = None, mode: str | None = None, ax=None):
    """Quality (mean with its interval as error bars) against predicted standalone time per config,
    with the Pareto front. ``mode``: "eager", "compiled" or "nfe" (x = NFE)."""
    metric, hib = _pick_metric(summary, metric)
    xcol, xlabel = _pick_time(summary, mode)
    fig, ax = _axes(ax)
    x = summary[xcol].to_numpy(float)
    y = summary[metric].to_numpy(float)
    lo = summary.get(f"{metric}_lo")
    hi = summary.get(f"{metric}_hi")
    if lo is not None and hi is not None:
        err = [y - lo.to_numpy(float), hi.to_numpy(float) - y]
        ax.errorbar(x, y, yerr=err, fmt="o", ms=5, capsize=3, color="tab:blue", ecolor="0.6", zorder=3)
    else:
        ax.plot(x, y, "o", color="tab:blue", zorder=3)
    for xi, yi, name in zip(x, y, summary["config"]):
        ax.annotate(str(name), (xi, yi), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto_front(x, y, hib)
    if len(front) > 1:
        ax.step(x[front], y[front], where="post", color="tab:orange", lw=1.2, zorder=2, label="Pareto front")
        ax.legend(fontsize=7, loc="best")
    level = summary.attrs.get("level", 0.95)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} ({'higher' if hib else 'lower'} is better; {level:.0%} CI)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, ax


def quality_vs_cutoff(summary, metric: str | None = None, ax=None):
    """Quality (mean and interval) against the CFG cutoff ratio, for configs that have one."""
    metric, hib = _pick_metric(summary, metric)
    s = summary[summary["cutoff"].notna()].sort_values("cutoff") if "cutoff" in summary.columns else summary.iloc[:0]
    if s.empty:
        raise DlxError("quality_vs_cutoff needs configs with a CFG cutoff ratio (sweep(cutoffs=[...]))")
    fig, ax = _axes(ax)
    x = s["cutoff"].to_numpy(float)
    y = s[metric].to_numpy(float)
    lo, hi = s.get(f"{metric}_lo"), s.get(f"{metric}_hi")
    if lo is not None and hi is not None:
        ax.fill_between(x, lo.to_numpy(float), hi.to_numpy(float), alpha=0.2, color="tab:blue", lw=0)
    ax.plot(x, y, "o-", color="tab:blue")
    ax.set_xlabel("CFG cutoff ratio (share of steps guided)")
    ax.set_ylabel(f"{metric} ({'higher' if hib else 'lower'} is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, ax
