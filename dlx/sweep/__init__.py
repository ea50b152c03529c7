"""Sweeps: compare guidance configs by quality and honest wall time, in one call.

    res = dlx.sweep(pipe, prompts=[...], seeds=range(8), cutoffs=[0, .2, .4, .6, .8, 1.0],
                    metrics=["psnr", "ssim", "adherence"], out="runs/cutoffs",
                    num_inference_steps=25, guidance_scale=6.0)
    res.frame; res.summary(); res.plot()

Modules: ``spec`` (the grid as data), ``engine`` (batched calls with per-sample plans),
``store`` (SQLite + PNGs, resumable), ``cost`` (measured standalone cost model), ``shard``
(accelerate ranks), ``result`` (frame, summary, plot). ``dlx.sweep`` is this module, and calling
it runs :func:`sweep`.
"""

from __future__ import annotations

import sys
import types

from ..fingerprint import weights_fingerprint
from .api import SweepWarning, sweep
from .model import load_pipeline
from .result import SweepResult
from .spec import Config, SweepSpec

__all__ = ["sweep", "SweepResult", "SweepWarning", "SweepSpec", "Config", "load_pipeline", "weights_fingerprint"]


class _CallableModule(types.ModuleType):
    """``dlx.sweep(...)`` runs a sweep while ``dlx.sweep.SweepResult`` etc. stay reachable: the
    package module itself is callable (importing a submodule rebinds ``dlx.sweep`` to it)."""

    def __call__(self, *args, **kwargs):
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

from .store import REPRODUCIBILITY as _REPRODUCIBILITY  # noqa: E402

__doc__ = (__doc__ or "") + "\nReproducibility (also in every store's meta, ``reproducibility``): " + _REPRODUCIBILITY + "\n"
