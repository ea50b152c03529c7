"""Statistics shared by the bench/ scripts (run as ``python bench/<script>.py``, so this folder is
on ``sys.path``)."""

from __future__ import annotations

import random
import statistics


def bootstrap_ci(xs, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median of xs (resampling rounds)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]
