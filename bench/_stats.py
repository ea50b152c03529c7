"""Statistics shared by the bench/ scripts (run as ``python bench/<script>.py``, so this folder is
on ``sys.path``): the interval is dlx's own (``dlx.stats``), so benchmarks and sweeps agree."""

from __future__ import annotations

from dlx.stats import bootstrap_ci as _bootstrap_ci


def bootstrap_ci(xs, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the median of xs (resampling rounds):
    ``dlx.stats.bootstrap_ci(stat="median")``."""
    return _bootstrap_ci(xs, n=n, seed=seed, stat="median")
