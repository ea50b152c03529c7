"""Sweeps: compare guidance configs by quality and honest wall time, in one call.

    res = dlx.sweep(pipe, prompts=[...], seeds=range(8), cutoffs=[0, .2, .4, .6, .8, 1.0],
                    metrics=["psnr", "ssim", "adherence"], out="runs/cutoffs",
                    num_inference_steps=25, guidance_scale=6.0)
    res.frame; res.summary(); res.plot()

Modules: ``spec`` (the grid as data), ``engine`` (batched calls with per-sample plans),
``store`` (SQLite + PNGs, resumable), ``cost`` (measured standalone cost model), ``shard``
(accelerate ranks), ``runner`` (rows into the store), ``result`` (frame, summary, comparison),
``answer`` (the recommendation). ``dlx.sweep`` is the function :func:`sweep`; this package is
``dlx.sweeps`` (``dlx.sweeps.SweepResult(out)`` opens a results folder).
"""

from __future__ import annotations

from ..fingerprint import weights_fingerprint
from .api import SweepWarning, sweep
from .model import load_pipeline
from .result import SweepResult
from .spec import Config, SweepSpec
from .store import REPRODUCIBILITY as _REPRODUCIBILITY

__all__ = ["sweep", "SweepResult", "SweepWarning", "SweepSpec", "Config", "load_pipeline", "weights_fingerprint"]


__doc__ = (__doc__ or "") + "\nReproducibility (also in every store's meta, ``reproducibility``): " + _REPRODUCIBILITY + "\n"
