"""Timing policy: what a trace's per-step times say about where the run spends its time.

Kept beside the timing, not in the data type: ``Trace`` holds the times, this module judges them.
``Trace.timing()`` is a documented shortcut to :func:`regime`.
"""

from __future__ import annotations

import math
import statistics

from .errors import DlxError

__all__ = ["regime", "HOST_BOUND_BELOW"]

#: an unguided step that saves less than this share of a guided step's time: host-bound
HOST_BOUND_BELOW = 0.10


def regime(trace) -> dict:
    """Which timing regime the run was in, from its per-step times.

    Compares the median time of guided steps (unconditional pass ran) with that of unguided
    ones (the first step is left out: it carries warm-up). ``saving`` is the share of a
    guided step's time an unguided step saves. Below 10 % the loop is bound by the host
    (Python and kernel launches, as eager diffusers on a fast GPU): cutting CFG saves little
    wall time. Above, the denoiser dominates (CPU, or a compiled GPU pipeline) and a cutoff
    saves about ``saving`` per unguided step. ``regime`` is "unknown" without both kinds.

    Returns a dict: ``timer`` (how the steps were timed), ``guided_ms``, ``unguided_ms``
    (medians, NaN without such steps), ``saving`` and ``regime`` ("host-bound",
    "denoiser-bound" or "unknown").
    """
    # Read, not imported: this module stands on the ground floor, below the trace it judges.
    if not (isinstance(getattr(trace, "steps", None), list) and isinstance(getattr(trace, "meta", None), dict)):
        raise DlxError(f"argument `trace` must be a dlx Trace; got {type(trace).__name__}: {trace!r:.80}")
    steps = trace.steps[1:]
    g = [s.step_ms for s in steps if s.guided and s.step_ms == s.step_ms]  # NaN: not timed
    u = [s.step_ms for s in steps if not s.guided and s.step_ms == s.step_ms]
    out = {
        "timer": trace.meta.get("timing"),
        "guided_ms": statistics.median(g) if g else math.nan,
        "unguided_ms": statistics.median(u) if u else math.nan,
        "saving": math.nan,
        "regime": "unknown",
    }
    if g and u and out["guided_ms"] > 0:
        out["saving"] = 1.0 - out["unguided_ms"] / out["guided_ms"]
        out["regime"] = "host-bound" if out["saving"] < HOST_BOUND_BELOW else "denoiser-bound"
    return out
