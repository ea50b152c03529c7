"""A sweep's results, read back from its folder: the frame, the summary with 95% CIs, the plot.

``SweepResult(out)`` opens a finished (or partly finished) sweep folder without any model:
``frame`` has one row per (config, prompt, seed), ``summary()`` one per config with each
metric's mean and 95% bootstrap interval across prompts × seeds, NFE and the predicted
standalone wall time with its timing regime; ``plot()`` draws speed against quality.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import DlxError
from .spec import SweepSpec
from .store import DB, Store, image_ok

__all__ = ["SweepResult", "bootstrap_ci"]


def bootstrap_ci(values, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling the values with replacement); NaNs
    are left out, and fewer than two values give (nan, nan)."""
    import numpy as np

    v = np.asarray([x for x in values if x == x], dtype=float)
    if len(v) < 2:  # no spread can be estimated from one value
        return math.nan, math.nan
    if np.all(v == v[0]):
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


class SweepResult:
    """Results of a sweep stored in ``out`` (see ``dlx.sweep``)."""

    def __init__(self, out, *, events: list | None = None):
        self.out = Path(out)
        if not (self.out / DB).is_file():
            raise DlxError(f"argument `out`: no sweep database in {str(self.out)!r}")
        store = Store(self.out, readonly=True)  # an archive or a read-only share opens too
        try:
            self.spec: SweepSpec = store.spec()
            if self.spec is None:
                raise DlxError(f"{str(store.path)!r} holds no sweep (the sweep that made it stopped before storing "
                               f"its spec); rerun the sweep with this `out`")
            self._rows = store.rows()
            self._costs = store.costs()
            #: the batch size the predicted standalone times are for (the last sweep call's
            #: ``timing_batch``; costs measured for other batch sizes stay in the store)
            self.timing_batch = store.meta("timing_batch", min((c["batch"] for c in self._costs), default=1))
            self.events = store.events() if events is None else events
            self.metric_info = store.meta("metric_info", {})
        finally:
            store.close()
        self._frame = None
        # ok rows whose PNG is gone or damaged: no image in the frame, a clear error from images()
        # (a rerun of the sweep computes them again)
        self.missing_images = sorted(str(self.out / r["image"]) for r in self._rows
                                     if r["status"] == "ok" and r["image"] and not image_ok(self.out / r["image"]))
        if self.missing_images:
            import warnings

            warnings.warn(f"{len(self.missing_images)} image(s) of {str(self.out)!r} are missing or damaged "
                          f"(first: {self.missing_images[0]}); rerun the sweep with this `out` to compute them again",
                          stacklevel=2)

    def __repr__(self):
        n = len(self.spec.rows())
        ok = sum(r["status"] == "ok" for r in self._rows)
        return f"SweepResult({str(self.out)!r}, {ok}/{n} rows ok, {len(self.spec.configs)} configs)"

    @property
    def metrics(self) -> list[str]:
        return list(self.spec.metrics)

    @property
    def complete(self) -> bool:
        return len(self._rows) >= len(self.spec.rows())

    def costs(self, mode: str = "eager") -> dict:
        """The measured cost model per (steps, scale) for ``mode`` ("eager" or "compiled") at
        ``timing_batch``."""
        return {(c["steps"], c["scale"]): c for c in self._costs
                if c["mode"] == mode and c["batch"] == self.timing_batch}

    @property
    def timing_modes(self) -> list[str]:
        return sorted({c["mode"] for c in self._costs if c["batch"] == self.timing_batch},
                      key=lambda m: (m != "eager", m))

    @property
    def frame(self):
        """One row per (config, prompt, seed): config, its JSON, cutoff, prompt, seed, status, error,
        NFE, guided steps, evaluations, predicted standalone time per timing mode, metrics, image."""
        if self._frame is None:
            self._frame = self._make_frame()
        return self._frame.copy()

    def _make_frame(self):
        import pandas as pd

        from .cost import predict_ms

        spec = self.spec
        cfgs = {c.name: c for c in spec.configs}
        order = {r["row_id"]: i for i, r in enumerate(spec.rows())}
        modes = self.timing_modes
        costs = {m: self.costs(m) for m in modes}
        out = []
        for r in sorted(self._rows, key=lambda r: order.get(r["row_id"], 1 << 30)):
            c = cfgs.get(r["config"])
            if c is None:
                continue
            steps, scale = spec.steps_of(c), spec.scale_of(c)
            d = {"row_id": r["row_id"], "config": r["config"], "config_json": json.dumps(c.to_json(), sort_keys=True),
                 "cutoff": c.cutoff if c.cutoff is not None else math.nan, "guidance_scale": scale, "steps": steps,
                 "prompt": r["prompt"], "seed": r["seed"], "status": r["status"], "error": r["error"],
                 "nfe": r["nfe"], "guided_steps": r["guided_steps"], "evaluations": r["evaluations"]}
            for m in modes:
                cost = costs[m].get((steps, scale))
                ok = cost is not None and r["guided_steps"] is not None and r["guided_steps"] == r["guided_steps"]
                d[f"time_{m}_s"] = predict_ms(cost, r["guided_steps"], steps) / 1e3 if ok else math.nan
            for name in spec.metrics:
                v = r["metrics"].get(name)
                d[name] = math.nan if v is None else v
            d["image"] = str(self.out / r["image"]) if r["image"] else None
            if d["image"] in self.missing_images:
                d["image"] = None
            d["batch"] = r["batch"]
            d["device"] = r["device"]
            out.append(d)
        cols = ["row_id", "config", "config_json", "cutoff", "guidance_scale", "steps", "prompt", "seed", "status",
                "error", "nfe", "guided_steps", "evaluations", *[f"time_{m}_s" for m in modes], *spec.metrics,
                "image", "batch", "device"]
        return pd.DataFrame(out, columns=cols)

    def summary(self, level: float = 0.95, n_boot: int = 2000):
        """One row per config: rows ok/failed, NFE, predicted standalone time (``time_<mode>_s``),
        that time as a share of the full-guidance config's (``time_<mode>_vs_full``) and the
        timing regime per mode, and for each metric its mean and bootstrap interval (``<metric>_lo``/``_hi``)
        across prompts × seeds."""
        import pandas as pd

        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
            raise DlxError(f"argument `level` must be a confidence level in (0, 1), e.g. 0.95; got {level!r}")
        if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
            raise DlxError(f"argument `n_boot` must be a positive int; got {n_boot!r}")
        f = self.frame
        spec = self.spec
        out = []
        for c in spec.configs:
            g = f[f.config == c.name]
            ok = g[g.status == "ok"]
            d = {"config": c.name, "cutoff": c.cutoff if c.cutoff is not None else math.nan,
                 "guidance_scale": spec.scale_of(c), "steps": spec.steps_of(c), "rows": len(g),
                 "failed": int((g.status != "ok").sum()), "nfe": ok.nfe.mean() if len(ok) else math.nan}
            for m in self.timing_modes:
                d[f"time_{m}_s"] = ok[f"time_{m}_s"].mean() if len(ok) else math.nan
                cost = self.costs(m).get((spec.steps_of(c), spec.scale_of(c)))
                # at a scale <= 1 the call has no CFG: no guided step to compare with
                d[f"regime_{m}"] = ("no CFG" if spec.scale_of(c) <= 1 else cost["regime"]) if cost else None
                # the same time as a share of full guidance's (same scale and steps): the host's
                # speed, which moves absolute times by 10-20 % over minutes on shared machines,
                # cancels in it
                ref = f[(f.config == spec.reference_of(c).name) & (f.status == "ok")]
                full = ref[f"time_{m}_s"].mean() if len(ref) else math.nan
                d[f"time_{m}_vs_full"] = d[f"time_{m}_s"] / full if full == full and full > 0 else math.nan
            for name in spec.metrics:
                vals = [v for v in ok[name].tolist() if v == v]
                d[name] = float(sum(vals) / len(vals)) if vals else math.nan  # no value: NaN, never 0
                d[f"{name}_lo"], d[f"{name}_hi"] = bootstrap_ci(vals, n=n_boot, level=level)
            out.append(d)
        s = pd.DataFrame(out)
        s.attrs["higher_is_better"] = {k: v.get("higher_is_better", True) for k, v in self.metric_info.items()}
        s.attrs["level"] = level
        return s

    def plot(self, ax=None, *, metric: str | None = None, mode: str | None = None):
        """Speed against quality (``dlx.plots.speed_quality``): returns (fig, ax)."""
        from ..plots import speed_quality

        f = self.frame
        if not (f.status == "ok").any():  # nothing to draw: say why instead of an empty figure
            first = f.error.dropna().iloc[0] if f.error.notna().any() else "no row has run yet"
            raise DlxError(f"this sweep has no finished row to plot ({len(f)} failed); first error: {first}")
        return speed_quality(self.summary(), metric=metric, mode=mode, ax=ax)

    def images(self, config: str | None = None, prompt: str | None = None, seed: int | None = None) -> list:
        """PIL images of the rows that match (all given filters), in frame order."""
        from PIL import Image

        f = self.frame
        for arg, v, have in (("config", config, [c.name for c in self.spec.configs]),
                             ("prompt", prompt, list(self.spec.prompts)), ("seed", seed, list(self.spec.seeds))):
            if v is not None and v not in have:
                raise DlxError(f"argument `{arg}`: {v!r} is not in this sweep; it has {have!r}")
        if config is not None:
            f = f[f.config == config]
        if prompt is not None:
            f = f[f.prompt == prompt]
        if seed is not None:
            f = f[f.seed == seed]
        lost = [str(self.out / r["image"]) for r in self._rows if r["row_id"] in set(f.row_id)
                and r["image"] and str(self.out / r["image"]) in self.missing_images]
        if lost:
            raise DlxError(f"image {lost[0]!r} of this sweep is missing or damaged ({len(lost)} of the rows asked "
                           f"for); rerun the sweep with out={str(self.out)!r} to compute it again")
        out = []
        for p in f.image.tolist():
            if isinstance(p, str):  # NaN: a failed row
                with Image.open(p) as im:
                    out.append(im.convert("RGB"))
        return out

    def previews(self, row_id: str):
        """Per-step x0 previews of a row, uint8 tensor (steps, 128, 128, 3) (``keep_previews=True``)."""
        from safetensors.torch import load_file

        p = self.out / "previews" / f"{row_id}.safetensors"
        if not p.is_file():
            raise DlxError(f"no previews for row {row_id!r} in {str(self.out)!r}; run the sweep with keep_previews=True")
        return load_file(str(p))["x0"]
