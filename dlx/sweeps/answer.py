"""The answer a sweep gives: the cheapest config that is no worse than full guidance, and why.

``recommend(res, ...)`` is ``SweepResult.recommend``: it reads the result's paired comparison
(``res.compare``) and time shares, and says which config to pick, or that none qualifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import DlxError

__all__ = ["recommend", "Recommendation", "DEFAULT_MARGINS"]

#: What ``recommend`` asks of a config when no ``margin`` is given. For a metric judged per image
#: (adherence, CLIP score) the margin is the largest loss against full guidance that still counts
#: as "no worse": the paired difference's interval must stay above −margin. For a metric that
#: already compares with the full-guidance image (PSNR, SSIM, LPIPS) there is nothing to
#: subtract, and the margin is a threshold the interval's worse bound must clear.
#:
#: * adherence 0.05: five percentage points of images that follow the caption, a loss a reader
#:   of a paper would notice but one that an ablation may accept; it needs about 75 pairs for
#:   a config that loses nothing to qualify (Wilson's bound at n/n is z²/(n + z²)).
#: * clip 1.0: one point of CLIP score (100·cos, where matching captions score in the
#:   twenties and thirties): a loss small beside the differences between models papers report.
#: * psnr 30 dB: the threshold image coding commonly takes for a close reproduction of its
#:   reference; identical images are +inf.
#: * ssim 0.90: the same idea on structure (1 is identical).
#: * lpips 0.10: a small perceptual distance (0 is identical); lower is better, so the
#:   interval's upper bound must stay under it.
DEFAULT_MARGINS = {"adherence": 0.05, "clip": 1.0, "psnr": 30.0, "ssim": 0.90, "lpips": 0.10}


@dataclass(frozen=True, eq=False)
class Recommendation:
    """What ``SweepResult.recommend`` found: ``config`` (None: none qualifies), the ``metric``,
    ``margin``, timing ``mode`` and ``level`` it was judged by, the config's ``reference``, one
    plain ``sentence`` (also ``str(rec)``) and the ``table`` of candidates (difference or value
    with interval, time share, NFE, ``non_inferior``), cheapest first."""

    config: str | None
    metric: str
    margin: float
    mode: str
    sentence: str
    table: object
    level: float = 0.95
    reference: str | None = None

    def __str__(self):
        return self.sentence

    def _repr_html_(self):
        import html

        return f"<p><b>{html.escape(self.sentence)}</b></p>" + self.table.to_html(index=False, float_format="%.3g")


def recommend(res, metric: str | None = None, margin: float | None = None, mode: str | None = None,
              level: float = 0.95) -> Recommendation:
    """The cheapest config (predicted time share of full guidance in ``mode``, then NFE)
    that is non-inferior to its full-guidance reference on ``metric`` at ``level``, or None
    with a plain sentence saying that none is, and which came closest.

    Non-inferior: for a per-image metric, the paired difference's interval (``compare``)
    stays within ``margin`` on the worse side (lower bound >= −margin where higher is better,
    upper bound <= margin where lower is); for a metric that compares with the reference
    image, the interval's worse bound clears ``margin`` as a threshold (PSNR lower bound >=
    30 dB). Defaults: ``metric`` adherence, else CLIP, else another per-image metric, else
    SSIM, PSNR, LPIPS; ``margin`` from ``DEFAULT_MARGINS`` (adherence 0.05, clip 1.0, psnr 30,
    ssim 0.90, lpips 0.10; why each, in its comment), required for other metrics; ``mode``
    "eager" where timed, else the first timed mode, else "nfe" (order by NFE only).
    Candidates are the configs cheaper than their reference (share below 1, or fewer NFE)."""
    import pandas as pd

    res._check_level(level)
    mets = list(res.spec.metrics)
    if not mets:
        raise DlxError("this sweep has no metrics: recommend needs one to judge the configs by")
    if metric is None:
        per_image = [m for m in mets if not res._is_reference_metric(m)]
        order = ["adherence", "clip"] + per_image + ["ssim", "psnr", "lpips"] + mets
        metric = next(m for m in order if m in mets)
    if metric not in mets:
        raise DlxError(f"argument `metric`: {metric!r} is not a metric of this sweep; it has {mets!r}")
    if margin is None:
        if metric not in DEFAULT_MARGINS:
            raise DlxError(f"argument `margin`: {metric!r} has no default margin; pass one (the largest loss "
                           f"against full guidance that still counts as no worse)")
        margin = DEFAULT_MARGINS[metric]
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise DlxError(f"argument `margin` must be a finite number; got {margin!r}")
    modes = res.timing_modes
    if mode is None:
        mode = "eager" if "eager" in modes else (modes[0] if modes else "nfe")
    if mode not in [*modes, "nfe"]:
        raise DlxError(f"argument `mode` must be one of {[*modes, 'nfe']}; got {mode!r}")
    cmp = res.compare(level=level, metrics=[metric])
    hib = cmp.attrs["higher_is_better"][metric]
    absolute = cmp.attrs["kind"][metric] == "against the reference image"
    if not absolute and margin < 0:
        raise DlxError(f"argument `margin` is a largest acceptable loss, >= 0; got {margin!r}")
    nfe_of = dict(zip(cmp.config, cmp.nfe))
    rows = []
    for r in cmp.itertuples(index=False):
        if r.is_reference:
            continue
        share = getattr(r, f"time_{mode}_vs_full") if mode != "nfe" else math.nan
        ref_nfe = nfe_of.get(r.reference, math.nan)
        cheaper = share < 1 if share == share else r.nfe < ref_nfe
        if not cheaper:
            continue
        val, lo, hi = (getattr(r, f"{metric}_diff{k}") for k in ("", "_lo", "_hi"))
        if absolute:
            ok = (lo >= margin) if hib else (hi <= margin)
        else:
            ok = (lo >= -margin) if hib else (hi <= margin)
        rows.append({"config": r.config, "reference": r.reference, "n_pairs": r.n_pairs, "nfe": r.nfe,
                     "reference_nfe": ref_nfe, "time_share": share,
                     "time_share_lo": getattr(r, f"time_{mode}_vs_full_lo") if mode != "nfe" else math.nan,
                     "time_share_hi": getattr(r, f"time_{mode}_vs_full_hi") if mode != "nfe" else math.nan,
                     "timing_steady": getattr(r, f"timing_steady_{mode}") if mode != "nfe" else None,
                     metric: val, f"{metric}_lo": lo, f"{metric}_hi": hi, "non_inferior": bool(ok)})
    table = pd.DataFrame(rows, columns=["config", "reference", "n_pairs", "nfe", "reference_nfe", "time_share",
                                        "time_share_lo", "time_share_hi", "timing_steady", metric,
                                        f"{metric}_lo", f"{metric}_hi", "non_inferior"])
    if len(table):
        table = table.assign(_s=table.time_share.fillna(math.inf)).sort_values(["_s", "nfe"], kind="stable")
        table = table.drop(columns="_s").reset_index(drop=True)
    table.attrs.update(method=cmp.attrs["method"][metric], kind=cmp.attrs["kind"][metric], level=level)
    picked = table[table.non_inferior]
    method = table.attrs["method"]
    if len(picked):
        p = picked.iloc[0]
        sentence = (f"{p.config} is the cheapest config {_rule(metric, margin, hib, absolute, level, p.reference)}: "
                    f"{_value_text(metric, p, absolute)} over {p.n_pairs} prompt-seed pairs ({method}); "
                    f"it takes {_cost_text(p, mode, level)}.")
        return Recommendation(p.config, metric, float(margin), mode, sentence, table, level, p.reference)
    refs = " or ".join(dict.fromkeys(cmp.reference[cmp.is_reference])) or " or ".join(dict.fromkeys(cmp.reference))
    if not len(table):
        sentence = f"No config is cheaper than full guidance ({refs}): there is nothing to recommend over it."
    else:
        worse = table[f"{metric}_lo"] if hib else -table[f"{metric}_hi"]
        b = table.loc[worse.fillna(-math.inf).idxmax()]  # closest: the best bound on the worse side
        sentence = (f"No config cheaper than full guidance is {_rule(metric, margin, hib, absolute, level, refs)}"
                    f": keep full guidance. Closest: {b.config}, {_value_text(metric, b, absolute)} over "
                    f"{b.n_pairs} prompt-seed pairs ({method}), at {_cost_text(b, mode, level)}; more seeds "
                    f"narrow the interval.")
    return Recommendation(None, metric, float(margin), mode, sentence, table, level, None)


def _rule(metric: str, margin: float, hib: bool, absolute: bool, level: float, ref: str) -> str:
    if absolute:
        return (f"whose {metric} against full guidance ({ref}) stays {'>=' if hib else '<='} {margin:g} at "
                f"{level:.0%} (the interval's {'lower' if hib else 'upper'} bound)")
    return f"non-inferior to full guidance ({ref}) on {metric} within {margin:g} at {level:.0%}"


def _cost_text(r, mode: str, level: float) -> str:
    nfe = f"{r.nfe:.3g} NFE against {r.reference_nfe:.3g}"
    if mode == "nfe" or r.time_share != r.time_share:
        return nfe
    ci = (f", {level:.0%} CI {r.time_share_lo:.2f}-{r.time_share_hi:.2f}" if r.time_share_lo == r.time_share_lo
          else "")
    unsettled = "; timing not settled" if r.timing_steady is False else ""
    return f"{r.time_share:.2f} of full guidance's time ({mode}{ci}{unsettled}) and {nfe}"


def _value_text(metric: str, r, absolute: bool) -> str:
    v, lo, hi = r[metric], r[f"{metric}_lo"], r[f"{metric}_hi"]
    if absolute:
        return f"{metric} {v:.3g} [{lo:.3g}, {hi:.3g}]"
    return f"{metric} difference {v:+.3f} [{lo:+.3f}, {hi:+.3f}]"
