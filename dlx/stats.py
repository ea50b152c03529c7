"""Intervals, in one place: proportions, cluster bootstraps, paired differences.

Every interval dlx prints comes from here, and every one says which it is (``*_ci`` functions
return the method's name beside the bounds):

* a **proportion** (a yes/no metric such as adherence): the Wilson score interval (Wilson 1927;
  recommended over the Wald and exact intervals by Brown, Cai & DasGupta 2001). Where the images
  come in clusters (several seeds of each prompt) the count is shrunk to its effective size
  n / deff, deff the design effect of the clusters (Kish 1965; Korn & Graubard 1998 do the same
  for Clopper–Pearson, Dean & Pagano 2015 compare both): seeds of one prompt that all pass or all
  fail are worth fewer than that many independent images. ``clopper_pearson`` is the exact
  interval, for whoever needs a guaranteed coverage.
* a **mean of a continuous metric**: a percentile bootstrap (Efron & Tibshirani 1993); with more
  than one prompt a two-stage cluster bootstrap (Davison & Hinkley 1997, §3.8): prompts drawn
  with replacement, then seeds with replacement within each drawn prompt. Resampling rows as if
  independent is too narrow when prompts differ (tests/test_stats.py shows a case).
* a **paired difference** (a config against full guidance on the same prompts and seeds):
  continuous metrics the same bootstraps of the per-pair differences; yes/no metrics Newcombe's
  hybrid score interval for paired proportions (Newcombe 1998, method 10), on the effective n
  when pairs cluster by prompt. Unlike a bootstrap, it does not collapse to [0, 0] when both
  configs pass every image: 16 of 16 against 16 of 16 is a difference of 0 within about ±0.19.

Plain numpy and the standard library; nothing here knows about sweeps.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from .errors import DlxError

__all__ = ["z_of", "wilson", "clopper_pearson", "design_effect", "proportion_ci", "bootstrap_ci",
           "cluster_bootstrap_ci", "percentile_bootstrap", "newcombe_paired", "paired_proportion_ci", "mean_ci",
           "paired_diff_ci", "WILSON", "WILSON_CLUSTERED", "BOOTSTRAP", "CLUSTER_BOOTSTRAP", "NEWCOMBE",
           "NEWCOMBE_CLUSTERED"]

WILSON = "Wilson score"
WILSON_CLUSTERED = "Wilson score on the effective n (design effect of prompts)"
BOOTSTRAP = "percentile bootstrap over seeds"
CLUSTER_BOOTSTRAP = "cluster bootstrap over prompts, then seeds"
NEWCOMBE = "Newcombe's paired score interval"
NEWCOMBE_CLUSTERED = "Newcombe's paired score interval on the effective n (design effect of prompts)"

_NAN2 = (math.nan, math.nan)


def _check_level(level) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise DlxError(f"argument `level` must be a confidence level in (0, 1), e.g. 0.95; got {level!r}")
    return float(level)


def _check_n_boot(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DlxError(f"argument `n_boot` must be a positive int; got {n!r}")
    return n


def z_of(level: float = 0.95) -> float:
    """The two-sided standard normal quantile for ``level`` (1.959964 for 0.95)."""
    return NormalDist().inv_cdf((1 + _check_level(level)) / 2)


def wilson(k: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n (k and n may be effective, non-integer counts);
    (nan, nan) for n <= 0."""
    if not n > 0:
        return _NAN2
    z = z_of(level)
    p = min(max(k / n, 0.0), 1.0)
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # at k = 0 or k = n the bound is exactly 0 or 1; say so instead of leaving rounding dust
    return (0.0 if k <= 0 else max(0.0, mid - half)), (1.0 if k >= n else min(1.0, mid + half))


def _binom_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper–Pearson 1934) interval of k/n successes: bounds where a binomial tail
    equals (1 − level)/2, found by bisection; (nan, nan) for n = 0."""
    a = (1 - _check_level(level)) / 2
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n or not 0 <= k <= n:
        raise DlxError(f"arguments `k`, `n` must be whole counts with 0 <= k <= n; got {k!r}, {n!r}")
    k, n = int(k), int(n)
    if n == 0:
        return _NAN2

    def solve(f, target):  # f increasing in p on [0, 1]
        lo, hi = 0.0, 1.0
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: _binom_tail(k, n, p), a)
    upper = 1.0 if k == n else solve(lambda p: _binom_tail(k + 1, n, p), 1 - a)  # P(X <= k) = a
    return lower, upper


def _clean(values, clusters=None):
    import numpy as np

    v = np.asarray(values, dtype=float).reshape(-1)
    if clusters is None:
        return v[~np.isnan(v)], None
    c = np.asarray(clusters, dtype=object).reshape(-1)
    if len(c) != len(v):
        raise DlxError(f"argument `clusters` has {len(c)} labels for {len(v)} values")
    keep = ~np.isnan(v)
    return v[keep], c[keep]


def _groups(v, c):
    """The values split by cluster label, in order of first appearance."""
    order: dict = {}
    for i, lab in enumerate(c):
        order.setdefault(lab, []).append(i)
    return [v[idx] for idx in order.values()]


def design_effect(values, clusters) -> float:
    """Variance of the mean with clusters (the between-cluster ratio estimator, C/(C−1)·Σ(y_c −
    ȳ·m_c)²/n²) over its variance if the n values were independent; at least 1, and 1 where it
    cannot be estimated (fewer than two clusters, or no spread at all)."""

    v, c = _clean(values, clusters)
    groups = _groups(v, c) if c is not None else []
    n = len(v)
    if len(groups) < 2 or n < 2:
        return 1.0
    mean = v.mean()
    var_iid = v.var() / n  # for 0/1 values: p(1 − p)/n, as Korn & Graubard
    if not var_iid > 0:
        return 1.0
    C = len(groups)
    var_c = C / (C - 1) * sum(float((g.sum() - mean * len(g)) ** 2) for g in groups) / n ** 2
    return max(1.0, float(var_c / var_iid))


def proportion_ci(values, clusters=None, level: float = 0.95) -> tuple[float, float, str]:
    """(lo, hi, method) of the share of ones among 0/1 ``values`` (NaNs left out): Wilson, on the
    effective n = n / ``design_effect`` where ``clusters`` (e.g. each value's prompt) has more than
    one label."""
    v, c = _clean(values, clusters)
    if len(v) and not all(x in (0.0, 1.0) for x in v.tolist()):
        raise DlxError("argument `values`: a proportion's values must be 0 or 1")
    n, k = len(v), float(v.sum()) if len(v) else 0.0
    clustered = c is not None and len(set(c.tolist())) > 1
    if not clustered or n == 0:
        return (*wilson(k, n, level), WILSON)
    deff = design_effect(v, c)
    n_eff = n / deff
    return (*wilson(k / n * n_eff, n_eff, level), WILSON_CLUSTERED)


def _percentile(stats, level):
    import numpy as np

    a = (1 - level) / 2
    return np.quantile(stats, a, axis=0), np.quantile(stats, 1 - a, axis=0)


def bootstrap_ci(values, n: int = 2000, seed: int = 0, level: float = 0.95, stat: str = "mean") -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (or ``stat="median"``) of ``values``, resampled
    with replacement as if independent; NaNs are left out, fewer than two values give (nan, nan),
    and values all alike give that value twice."""
    import numpy as np

    level, n = _check_level(level), _check_n_boot(n)
    if stat not in ("mean", "median"):
        raise DlxError(f"argument `stat` must be 'mean' or 'median'; got {stat!r}")
    v, _ = _clean(values)
    if len(v) < 2:  # no spread can be estimated from one value
        return _NAN2
    if np.all(v == v[0]):
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    draws = v[rng.integers(0, len(v), size=(n, len(v)))]
    s = draws.mean(axis=1) if stat == "mean" else np.median(draws, axis=1)
    lo, hi = _percentile(s, level)
    return float(lo), float(hi)


def cluster_bootstrap_ci(values, clusters, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Two-stage percentile bootstrap of the mean: clusters (prompts) drawn with replacement,
    then values (seeds) with replacement within each drawn cluster; the statistic is the mean of
    all values drawn. One cluster only: the plain ``bootstrap_ci``. NaNs are left out."""
    import numpy as np

    level, n = _check_level(level), _check_n_boot(n)
    v, c = _clean(values, clusters)
    groups = _groups(v, c)
    if len(groups) < 2:
        return bootstrap_ci(v, n=n, seed=seed, level=level)
    if np.all(v == v[0]):
        return float(v[0]), float(v[0])
    C = len(groups)
    sizes = np.array([len(g) for g in groups])
    width = int(sizes.max())
    padded = np.zeros((C, width))
    for i, g in enumerate(groups):
        padded[i, :len(g)] = g
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, C, size=(n, C))                       # stage 1: prompts
    m = sizes[pick]                                               # (n, C) sizes of the drawn prompts
    within = (rng.random((n, C, width)) * m[..., None]).astype(int)  # stage 2: seeds in each
    mask = np.arange(width)[None, None, :] < m[..., None]
    drawn = padded[pick[..., None], within] * mask
    means = drawn.sum(axis=(1, 2)) / m.sum(axis=1)
    lo, hi = _percentile(means, level)
    return float(lo), float(hi)


def percentile_bootstrap(n_items: int, statistic, n: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile interval of ``statistic(idx)`` over ``n`` resamples of ``n_items`` items:
    ``idx`` is an int array (n, n_items) of drawn item indices, ``statistic`` returns one value
    per resample (shape (n,)) or several ((n, k)); returns (lo, hi) of that shape (nan where
    fewer than two items)."""
    import numpy as np

    level, n = _check_level(level), _check_n_boot(n)
    if n_items < 2:
        out = np.asarray(statistic(np.zeros((1, max(n_items, 1)), dtype=int)), dtype=float)[0]
        nan = np.full_like(out, np.nan)
        return nan, nan.copy()
    rng = np.random.default_rng(seed)
    s = np.asarray(statistic(rng.integers(0, n_items, size=(n, n_items))), dtype=float)
    return _percentile(s, level)


def newcombe_paired(a: float, b: float, c: float, d: float, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's (1998, method 10) interval of p1 − p2 for paired 0/1 outcomes: ``a`` pairs with
    both 1, ``b`` first 1 second 0, ``c`` first 0 second 1, ``d`` both 0 (counts may be effective,
    non-integer). Wilson intervals of both margins, combined with the pairs' phi correlation."""
    n = a + b + c + d
    if not n > 0:
        return _NAN2
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, level)
    l2, u2 = wilson(a + c, n, level)
    prod = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(prod) if prod > 0 else 0.0
    dl = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    du = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    theta = p1 - p2
    return max(-1.0, theta - math.sqrt(max(dl, 0.0))), min(1.0, theta + math.sqrt(max(du, 0.0)))


def paired_proportion_ci(x, y, clusters=None, level: float = 0.95) -> tuple[float, float, str]:
    """(lo, hi, method) of mean(x) − mean(y) for paired 0/1 outcomes (pairs with a NaN left out):
    ``newcombe_paired`` on the pairs' 2×2 table, shrunk by the design effect of the per-pair
    differences where ``clusters`` has more than one label."""
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise DlxError(f"arguments `x`, `y` must pair up; got {x.shape} and {y.shape} values")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if not all(v in (0.0, 1.0) for v in np.concatenate([x, y]).tolist()):
        raise DlxError("arguments `x`, `y`: a proportion's values must be 0 or 1")
    a, b = float(((x == 1) & (y == 1)).sum()), float(((x == 1) & (y == 0)).sum())
    c, d = float(((x == 0) & (y == 1)).sum()), float(((x == 0) & (y == 0)).sum())
    cl = None if clusters is None else np.asarray(clusters, dtype=object).reshape(-1)[keep]
    if cl is None or len(set(cl.tolist())) < 2:
        return (*newcombe_paired(a, b, c, d, level), NEWCOMBE)
    deff = design_effect(x - y, cl)
    return (*newcombe_paired(a / deff, b / deff, c / deff, d / deff, level), NEWCOMBE_CLUSTERED)


def mean_ci(values, clusters=None, *, binary: bool = False, level: float = 0.95, n_boot: int = 2000,
            seed: int = 0) -> tuple[float, float, float, str]:
    """(mean, lo, hi, method) of ``values`` (NaNs left out; none: all NaN): ``proportion_ci`` for
    a binary metric, else ``cluster_bootstrap_ci`` when ``clusters`` has more than one label, else
    ``bootstrap_ci``."""
    v, c = _clean(values, clusters)
    mean = float(v.mean()) if len(v) else math.nan
    if binary:
        lo, hi, method = proportion_ci(v, c, level)
        return mean, lo, hi, method
    if c is not None and len(set(c.tolist())) > 1:
        return (mean, *cluster_bootstrap_ci(v, c, n=n_boot, seed=seed, level=level), CLUSTER_BOOTSTRAP)
    return (mean, *bootstrap_ci(v, n=n_boot, seed=seed, level=level), BOOTSTRAP)


def paired_diff_ci(x, y, clusters=None, *, binary: bool = False, level: float = 0.95, n_boot: int = 2000,
                   seed: int = 0) -> tuple[float, float, float, str]:
    """(mean difference, lo, hi, method) of x − y over pairs (same prompt and seed; a pair with a
    NaN is left out): ``paired_proportion_ci`` for a binary metric, else ``mean_ci`` of the
    per-pair differences (the cluster bootstrap when pairs span several prompts)."""
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise DlxError(f"arguments `x`, `y` must pair up; got {x.shape} and {y.shape} values")
    if binary:
        keep = ~(np.isnan(x) | np.isnan(y))
        diff = float((x[keep] - y[keep]).mean()) if keep.any() else math.nan
        lo, hi, method = paired_proportion_ci(x, y, clusters, level)
        return diff, lo, hi, method
    return mean_ci(x - y, clusters, level=level, n_boot=n_boot, seed=seed)
