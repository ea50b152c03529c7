"""Plots of sweep results. Each takes ``ax=None`` (a new figure) and returns ``(fig, ax)``; none
calls ``plt.show()``. They read summary frames (``SweepResult.summary()``) and never compute."""

from __future__ import annotations

import math

from .errors import DlxError

__all__ = ["speed_quality", "quality_vs_cutoff", "pareto_front", "step_curves", "STEP_CURVES", "config_colors"]


def config_colors(names) -> dict:
    """One colour per name, by position in ``names`` (matplotlib's tab10, then tab20b): pass the
    same list (all of a sweep's configs, all traces) to every panel and a config keeps its
    colour across them, whichever subset a panel draws."""
    from matplotlib import colormaps

    cols = list(colormaps["tab10"].colors) + list(colormaps["tab20b"].colors)
    out: dict = {}
    for n in names:
        if n not in out:
            out[n] = cols[len(out) % len(cols)]
    return out


def _finite(summary, metric):
    """Rows whose ``metric`` is finite, and a note on those left out: the reference's PSNR is
    +inf (identical images), which no axis can show."""
    import numpy as np

    y = summary[metric].to_numpy(float)
    keep = np.isfinite(y) | np.isnan(y)
    left = [str(n) for n, k in zip(summary["config"], keep) if not k]
    note = f"not drawn: {', '.join(left)} ({metric} = ∞, identical to the reference)" if left else ""
    return summary[keep], note


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
    named = [x for x in regime.dropna() if x != "no CFG"] if regime is not None else []
    r = f", {named[0]}" if named else ""
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


def speed_quality(summary, metric: str | None = None, mode: str | None = None, ax=None, colors=None):
    """Quality (mean with its interval as error bars) against predicted standalone time per config,
    with the Pareto front. ``mode``: "eager", "compiled" or "nfe" (x = NFE). Time's error bars come
    from the share's interval (``time_<mode>_vs_full_lo``/``_hi``), scaled to seconds; a timing
    that never settled (``timing_steady_<mode>`` False) is said in the x label. A config whose
    value is infinite (the reference's PSNR) is left out and named in the legend. ``colors``:
    config → colour (default ``config_colors`` of the summary's configs)."""
    import numpy as np

    metric, hib = _pick_metric(summary, metric)
    xcol, xlabel = _pick_time(summary, mode)
    colors = colors or config_colors(summary["config"])
    s, note = _finite(summary, metric)
    fig, ax = _axes(ax)
    x = s[xcol].to_numpy(float)
    y = s[metric].to_numpy(float)
    lo, hi = s.get(f"{metric}_lo"), s.get(f"{metric}_hi")
    yerr = (np.abs(np.stack([y - lo.to_numpy(float), hi.to_numpy(float) - y])) if lo is not None and hi is not None
            else None)
    xerr = None
    if xcol.startswith("time_") and f"{xcol[:-2]}_vs_full_lo" in s.columns:
        share = s[f"{xcol[:-2]}_vs_full"].to_numpy(float)
        per = np.divide(x, share, out=np.full_like(x, np.nan), where=share > 0)  # the reference's time
        xerr = np.abs(np.stack([x - s[f"{xcol[:-2]}_vs_full_lo"].to_numpy(float) * per,
                                s[f"{xcol[:-2]}_vs_full_hi"].to_numpy(float) * per - x]))
        steady = s.get(f"timing_steady_{xcol[5:-2]}")
        if steady is not None and (steady == False).any():  # noqa: E712 - a column of True/False/None
            xlabel += " — timing not settled"
    for i, name in enumerate(s["config"]):
        ax.errorbar(x[i:i + 1], y[i:i + 1], yerr=None if yerr is None else yerr[:, i:i + 1],
                    xerr=None if xerr is None else np.nan_to_num(xerr[:, i:i + 1]), fmt="o", ms=5, capsize=3,
                    color=colors.get(name, "tab:blue"), ecolor="0.6", zorder=3)
        # a config name is text, not mathtext: "$\\frac{1}{$" must not crash the plot
        ax.annotate(str(name), (x[i], y[i]), fontsize=7, xytext=(4, 3), textcoords="offset points",
                    parse_math=False)
    front = pareto_front(x, y, hib)
    if len(front) > 1:
        ax.step(x[front], y[front], where="post", color="0.35", lw=1.2, zorder=2, label="Pareto front")
    if note:
        ax.plot([], [], " ", label=note)
    if len(front) > 1 or note:
        ax.legend(fontsize=7, loc="best")
    level = summary.attrs.get("level", 0.95)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} ({'higher' if hib else 'lower'} is better; {level:.0%} CI)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, ax


def quality_vs_cutoff(summary, metric: str | None = None, ax=None):
    """Quality (mean and interval) against the CFG cutoff ratio, for configs that have one; a
    config whose value is infinite (the reference's PSNR) is left out and named in the legend."""
    metric, hib = _pick_metric(summary, metric)
    s = summary[summary["cutoff"].notna()].sort_values("cutoff") if "cutoff" in summary.columns else summary.iloc[:0]
    if s.empty:
        raise DlxError("quality_vs_cutoff needs configs with a CFG cutoff ratio (sweep(cutoffs=[...]))")
    s, note = _finite(s, metric)
    fig, ax = _axes(ax)
    x = s["cutoff"].to_numpy(float)
    y = s[metric].to_numpy(float)
    lo, hi = s.get(f"{metric}_lo"), s.get(f"{metric}_hi")
    if lo is not None and hi is not None:
        ax.fill_between(x, lo.to_numpy(float), hi.to_numpy(float), alpha=0.2, color="tab:blue", lw=0)
    ax.plot(x, y, "o-", color="tab:blue")
    if note:
        ax.plot([], [], " ", label=note)
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("CFG cutoff ratio (share of steps guided)")
    ax.set_ylabel(f"{metric} ({'higher' if hib else 'lower'} is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, ax


# --- per-step curves of traces (the "gallery" helper's part) ----------------------------------------

#: What :func:`step_curves` can draw: a column of ``Trace.to_frame()``, or ``"divergence"`` from a
#: reference trace (``Trace.compare``).
STEP_CURVES = {
    "cond_uncond_cos": "cos(cond, uncond)",
    "cond_uncond_l2": "‖cond − uncond‖₂",
    "latent_std": "std of the latents x_t",
    "x0_std": "std of the x0 estimate",
    "divergence": "RMS difference from the reference",
    "step_ms": "step time, ms",
}


def _named_traces(traces) -> dict:
    from .trace import Trace

    if isinstance(traces, Trace):
        return {"trace": traces}
    if isinstance(traces, dict):
        items = traces
    elif isinstance(traces, (list, tuple)):
        items = {f"trace {i}": t for i, t in enumerate(traces)}
    else:
        raise DlxError(f"argument `traces` must be a Trace, a list or a dict of Traces; got {type(traces).__name__}")
    if not items:
        raise DlxError("argument `traces` is empty")
    for k, t in items.items():
        if not isinstance(t, Trace):
            raise DlxError(f"argument `traces`: entry {k!r} is a {type(t).__name__}, not a Trace")
    return {str(k): t for k, t in items.items()}


def step_curves(traces, what: str = "cond_uncond_cos", *, reference=None, field: str = "latents",
                sample: int | None = None, ax=None, colors=None):
    """Per-step curves of one or several traces on one axis: ``what`` is a key of
    :data:`STEP_CURVES` (values from ``Trace.to_frame()``; ``"divergence"``: ``field``'s RMS
    difference from ``reference``, a label or a Trace, default the first, by ``Trace.compare``).

    ``traces``: a Trace, a list, or a dict label → Trace (the legend's labels). ``sample``: one
    sample's values (``to_frame(per_sample=True)``) instead of the batch mean. Steps where a value
    was not recorded (no unconditional pass after a cutoff) leave a gap. Each trace keeps its
    colour whichever curves a panel draws: ``colors`` (label → colour), default
    ``config_colors`` of all the traces' labels. Returns ``(fig, ax)``.
    """
    if what not in STEP_CURVES:
        raise DlxError(f"argument `what` must be one of {list(STEP_CURVES)}; got {what!r}")
    named = _named_traces(traces)
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 0):
        raise DlxError(f"argument `sample` must be a non-negative int or None; got {sample!r}")
    series = {}
    if what == "divergence":
        if field not in ("latents", "x0", "cond"):
            raise DlxError(f"argument `field` must be 'latents', 'x0' or 'cond'; got {field!r}")
        if reference is None:
            ref_name = next(iter(named))
        elif isinstance(reference, str):
            if reference not in named:
                raise DlxError(f"argument `reference` names no trace: {reference!r}; have {list(named)}")
            ref_name = reference
        else:
            ref_name = None
        ref = named[ref_name] if ref_name is not None else reference
        for k, t in named.items():
            if k == ref_name:
                continue
            d = t.compare(ref)
            col = f"{field}_rmse"
            if col not in d.columns:
                raise DlxError(f"argument `field`: {field!r} was not recorded by both traces")
            series[k] = (d["step"].to_numpy(), d[col].to_numpy(float))
        if not series:
            raise DlxError("divergence needs at least one trace besides the reference")
        ylabel = f"RMS({field} − {field} of {ref_name or 'reference'})"
    else:
        for k, t in named.items():
            f = t.to_frame(per_sample=sample is not None)
            if sample is not None:
                f = f[f["sample"] == sample]
                if f.empty:
                    raise DlxError(f"argument `sample` {sample} is not in trace {k!r}")
            if what not in f.columns:
                continue
            series[k] = (f["step"].to_numpy(), f[what].to_numpy(float))
        if not series:
            raise DlxError(f"{what!r} was not recorded by any of the traces (record cond/uncond, latents or x0)")
        ylabel = STEP_CURVES[what]
    from matplotlib.ticker import MaxNLocator

    colors = {**config_colors(named), **(colors or {})}
    fig, ax = _axes(ax)
    for k, (x, y) in series.items():
        ax.plot(x + 1, y, "o-", ms=3, lw=1.3, label=k, color=colors[k])  # steps counted from 1, as the galleries label them
    ax.set_xlabel("step (1 = first)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1 or what == "divergence":
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig, ax
