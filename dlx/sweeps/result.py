"""A sweep's results, read back from its folder: frame, summary, paired comparison, recommendation.

``SweepResult(out)`` opens a finished (or partly finished) sweep folder without any model:
``frame`` has one row per (config, prompt, seed); ``summary()`` one per config with each metric's
mean and interval (Wilson for yes/no metrics, a cluster bootstrap over prompts then seeds for
the rest: ``dlx.stats``), NFE and the predicted standalone time with its interval and regime;
``compare()`` the paired difference of every config to full guidance on the same prompts and
seeds; ``recommend()`` the cheapest config that is non-inferior within a margin; ``plot()``
speed against quality.

(Over 400 lines: one object, the results read back; its frame, summary and comparison share the
row filters and interval choices, so they stay together. The recommendation is in ``answer.py``.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import DlxError
from ..metrics import PSNR_CAP
from ..stats import bootstrap_ci, mean_ci, paired_diff_ci
from .answer import DEFAULT_MARGINS, Recommendation, recommend
from .spec import SweepSpec
from .store import DB, Store, image_ok

__all__ = ["SweepResult", "Recommendation", "DEFAULT_MARGINS", "bootstrap_ci"]

#: metrics that are a yes/no per image (their intervals are for proportions)
BINARY_METRICS = ("adherence",)


def _extra_passes(row: dict, steps: int) -> float:
    """Denoiser passes a row's run made beyond one conditional pass per step and one unconditional
    pass per guided step (the record's NFE says so): a perturbation guider's third passes (+1
    each), CFG-Zero*'s zero-init steps (−1 each: no pass at all). 0 for the cutoff controls."""
    nfe, g = row.get("nfe"), row.get("guided_steps")
    if nfe is None or g is None or nfe != nfe or g != g:
        return 0.0
    return float(nfe) - steps - float(g)


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
            self._pairs = store.cost_pairs()
            #: the batch size the predicted standalone times are for (the last sweep call's
            #: ``timing_batch``; costs measured for other batch sizes stay in the store)
            self.timing_batch = store.meta("timing_batch", min((c["batch"] for c in self._costs), default=1))
            self.events = store.events() if events is None else events
            self.metric_info = store.meta("metric_info", {})
        finally:
            store.close()
        self._frame = None
        self._cost_cache: dict = {}
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
        """The cost model per (steps, scale) for ``mode`` ("eager" or "compiled") at
        ``timing_batch``: measured before the rows and refitted with the pairs timed between
        batches (``cost.with_pairs``: ``pairs``, ``sweep_pairs``, ``steady``, ``drift``)."""
        if mode not in self._cost_cache:
            from .cost import with_pairs

            out = {}
            for c in self._costs:
                if c["mode"] != mode or c["batch"] != self.timing_batch:
                    continue
                key = (c["mode"], c["steps"], c["scale"], c["batch"])
                extra = [p for p in self._pairs if (p["mode"], p["steps"], p["scale"], p["batch"]) == key]
                out[(c["steps"], c["scale"])] = with_pairs(c, extra)
            self._cost_cache[mode] = out
        return dict(self._cost_cache[mode])

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
                 "cutoff": c.cutoff if c.cutoff is not None else math.nan,
                 "guidance_scale": spec.guided_scale_of(c), "steps": steps,
                 "prompt": r["prompt"], "seed": r["seed"], "status": r["status"], "error": r["error"],
                 "nfe": r["nfe"], "guided_steps": r["guided_steps"], "evaluations": r["evaluations"]}
            for m in modes:
                cost = costs[m].get((steps, scale))
                ok = cost is not None and r["guided_steps"] is not None and r["guided_steps"] == r["guided_steps"]
                d[f"time_{m}_s"] = (predict_ms(cost, r["guided_steps"], steps, _extra_passes(r, steps)) / 1e3
                                    if ok else math.nan)
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

    # -- what each metric is ---------------------------------------------------------------------------
    def _is_reference_metric(self, name: str) -> bool:
        """Whether ``name`` compares each image with the full-guidance image (PSNR, SSIM, LPIPS)."""
        return bool(self.metric_info.get(name, {}).get("reference", name in ("psnr", "ssim", "lpips")))

    def _is_binary(self, name: str, frame=None) -> bool:
        """Whether ``name`` is a yes/no metric: declared so (``binary`` in its info, or adherence),
        or a per-image metric whose every stored value is 0 or 1."""
        info = self.metric_info.get(name, {})
        if "binary" in info:
            return bool(info["binary"])
        if name in BINARY_METRICS:
            return True
        if self._is_reference_metric(name):
            return False
        f = self.frame if frame is None else frame
        vals = [v for v in f[name].tolist() if v == v]
        return bool(vals) and all(v in (0.0, 1.0) for v in vals)

    def _values(self, name: str, g):
        """A config's values of metric ``name`` (ok rows), PSNR of identical images held at the
        metrics' cap so a mean stays finite (only the reference itself is shown as +inf)."""
        import numpy as np

        v = g[name].to_numpy(dtype=float)
        if name == "psnr":
            v = np.where(np.isposinf(v), PSNR_CAP, v)
        return v

    @staticmethod
    def _identical(name: str, v) -> float:
        """The value of a reference metric for the reference itself: PSNR of identical images is
        +inf; others (SSIM 1, LPIPS 0, a user's) as computed."""
        if name == "psnr":
            return math.inf
        vals = [x for x in v if x == x]
        return float(sum(vals) / len(vals)) if vals else math.nan

    def _check_level(self, level, n_boot=2000):
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
            raise DlxError(f"argument `level` must be a confidence level in (0, 1), e.g. 0.95; got {level!r}")
        if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
            raise DlxError(f"argument `n_boot` must be a positive int; got {n_boot!r}")

    def _shares(self, ok, level: float, n_boot: int) -> dict:
        """Per (config, mode): (share, lo, hi, steady) of the predicted standalone time as a share
        of its full-guidance reference's (``cost.share_ci``: bootstrap over the timed pairs)."""
        from .cost import share_ci

        spec = self.spec
        out = {}
        for m in self.timing_modes:
            costs = self.costs(m)
            for c in spec.configs:
                cost = costs.get((spec.steps_of(c), spec.scale_of(c)))
                g = ok[ok.config == c.name]
                r = ok[ok.config == spec.reference_of(c).name]
                t, tr = g[f"time_{m}_s"].mean(), r[f"time_{m}_s"].mean()
                share = t / tr if len(g) and len(r) and tr == tr and tr > 0 else math.nan
                lo = hi = math.nan
                if cost is not None and share == share:
                    extra = lambda f: float((f.nfe - f.steps - f.guided_steps).mean())  # noqa: E731
                    los, his = share_ci(cost, [g.guided_steps.mean()], float(r.guided_steps.mean()), level=level,
                                        n_boot=n_boot, extra=[extra(g)], reference_extra=extra(r))
                    lo, hi = float(los[0]), float(his[0])
                steady = bool(cost.get("steady", True)) if cost is not None else None
                out[c.name, m] = (share, lo, hi, steady)
        return out

    # -- tables -----------------------------------------------------------------------------------------
    def summary(self, level: float = 0.95, n_boot: int = 2000):
        """One row per config: rows ok/failed, ``is_reference`` (the full-guidance config other
        configs are compared with), NFE, predicted standalone time (``time_<mode>_s``), that time
        as a share of the reference's (``time_<mode>_vs_full``, with its interval
        ``time_<mode>_vs_full_lo``/``_hi``: a bootstrap over the timed pairs), whether the timing
        settled (``timing_steady_<mode>``) and the regime per mode, and for each metric its mean,
        interval (``<metric>_lo``/``_hi``) and count (``<metric>_n``).

        Intervals (``attrs["interval_method"]`` names each metric's): yes/no metrics (adherence)
        Wilson's, on the effective n where seeds cluster in prompts; others a cluster bootstrap
        over prompts then seeds (a plain one over seeds with one prompt). The reference's PSNR,
        SSIM and LPIPS compare it with itself: PSNR is +inf there (identical images), never a
        stand-in number. ``attrs["reference"]``: the reference config per (scale, steps)."""
        import pandas as pd

        self._check_level(level, n_boot)
        f = self.frame
        spec = self.spec
        ok_all = f[f.status == "ok"]
        shares = self._shares(ok_all, level, n_boot)
        binary = {name: self._is_binary(name, f) for name in spec.metrics}
        methods: dict = {name: [] for name in spec.metrics}
        out = []
        for c in spec.configs:
            g = f[f.config == c.name]
            ok = g[g.status == "ok"]
            is_ref = spec.reference_of(c).name == c.name
            d = {"config": c.name, "cutoff": c.cutoff if c.cutoff is not None else math.nan,
                 "guidance_scale": spec.guided_scale_of(c), "steps": spec.steps_of(c), "is_reference": is_ref,
                 "rows": len(g), "failed": int((g.status != "ok").sum()),
                 "nfe": ok.nfe.mean() if len(ok) else math.nan}
            for m in self.timing_modes:
                d[f"time_{m}_s"] = ok[f"time_{m}_s"].mean() if len(ok) else math.nan
                cost = self.costs(m).get((spec.steps_of(c), spec.scale_of(c)))
                # at a scale <= 1 the call has no CFG: no guided step to compare with
                d[f"regime_{m}"] = ("no CFG" if spec.scale_of(c) <= 1 else cost["regime"]) if cost else None
                # the same time as a share of full guidance's (same scale and steps): the host's
                # speed, which moves absolute times by 10-20 % over minutes on shared machines,
                # cancels in it
                share, lo, hi, steady = shares[c.name, m]
                d[f"time_{m}_vs_full"] = share
                d[f"time_{m}_vs_full_lo"], d[f"time_{m}_vs_full_hi"] = lo, hi
                d[f"timing_steady_{m}"] = steady
            for name in spec.metrics:
                v = self._values(name, ok)
                n = int((v == v).sum())
                if is_ref and self._is_reference_metric(name):
                    mean = lo = hi = self._identical(name, v) if n else math.nan
                elif name == "psnr" and n and bool((v[v == v] >= PSNR_CAP).all()):
                    # identical to full guidance on every pair: +inf, as the reference (a config
                    # identical on some pairs only counts those as PSNR_CAP dB in its mean)
                    mean = lo = hi = math.inf
                    methods[name].append("none (identical on every pair)")
                else:
                    mean, lo, hi, how = mean_ci(v, ok.prompt.to_numpy(), binary=binary[name], level=level,
                                                n_boot=n_boot)
                    if n:
                        methods[name].append(how)
                d[name], d[f"{name}_lo"], d[f"{name}_hi"], d[f"{name}_n"] = mean, lo, hi, n
            out.append(d)
        s = pd.DataFrame(out)
        s.attrs["higher_is_better"] = {k: v.get("higher_is_better", True) for k, v in self.metric_info.items()}
        s.attrs["level"] = level
        s.attrs["interval_method"] = {k: " / ".join(dict.fromkeys(v)) or "none (no values)"
                                      for k, v in methods.items()}
        s.attrs["reference"] = {(spec.scale_of(c), spec.steps_of(c)): spec.reference_of(c).name
                                for c in spec.configs}
        s.attrs["time_interval_method"] = "percentile bootstrap over the timed (guided, unguided) pairs"
        return s

    def compare(self, reference: str | None = None, level: float = 0.95, metrics=None, n_boot: int = 2000):
        """Every config against a reference on the same (prompt, seed) pairs: one row per config
        (the reference included, ``is_reference``), with ``reference``, ``n_pairs`` (pairs where
        both rows are ok), ``nfe``, the time share of full guidance with its interval and
        ``timing_steady_<mode>`` per timing mode (as in ``summary``), and per metric
        ``<m>_diff``, ``<m>_diff_lo``, ``<m>_diff_hi``, ``<m>_n``.

        ``reference``: a config name; default each config's full-guidance config of the same
        scale and steps. For a per-image metric (adherence, CLIP, a user's) ``<m>_diff`` is the
        mean paired difference config − reference with its interval: a cluster bootstrap of the
        per-pair differences over prompts then seeds (over seeds with one prompt); for a yes/no
        metric Newcombe's paired score interval (1998, method 10) on the effective n where pairs
        cluster by prompt, because a bootstrap of differences that are all 0 (both configs pass
        every image) gives [0, 0], claiming certainty 16 images cannot give, where Newcombe's
        gives about ±0.19. A metric that already compares with the full-guidance image (PSNR,
        SSIM, LPIPS) is not differenced again: its ``<m>_diff`` columns hold the config's own
        mean and interval (as in ``summary``; the reference's PSNR is +inf).
        ``attrs["method"]`` names each metric's interval, ``attrs["kind"]`` says which of the
        two a metric is ("paired difference" or "against the reference image")."""
        import numpy as np
        import pandas as pd

        self._check_level(level, n_boot)
        spec = self.spec
        names = [c.name for c in spec.configs]
        if reference is not None and reference not in names:
            raise DlxError(f"argument `reference`: {reference!r} is not a config of this sweep; it has {names!r}")
        if metrics is None:
            metrics = list(spec.metrics)
        elif isinstance(metrics, str):
            metrics = [metrics]
        for m in metrics:
            if m not in spec.metrics:
                raise DlxError(f"argument `metrics`: {m!r} is not a metric of this sweep; it has {list(spec.metrics)!r}")
        f = self.frame
        ok = f[f.status == "ok"]
        summ = self.summary(level=level, n_boot=n_boot).set_index("config")
        binary = {m: self._is_binary(m, f) for m in metrics}
        kind = {m: "against the reference image" if self._is_reference_metric(m) else "paired difference"
                for m in metrics}
        methods: dict = {m: [] for m in metrics}
        out = []
        for c in spec.configs:
            ref = reference or spec.reference_of(c).name
            g = ok[ok.config == c.name].set_index(["prompt", "seed"])
            r = ok[ok.config == ref].set_index(["prompt", "seed"])
            common = g.index.intersection(r.index)
            d = {"config": c.name, "is_reference": c.name == ref, "reference": ref, "n_pairs": len(common),
                 "nfe": summ.loc[c.name, "nfe"]}
            for mode in self.timing_modes:
                for col in (f"time_{mode}_vs_full", f"time_{mode}_vs_full_lo", f"time_{mode}_vs_full_hi",
                            f"timing_steady_{mode}"):
                    d[col] = summ.loc[c.name, col]
            for m in metrics:
                if kind[m] == "against the reference image":
                    val, lo, hi, n = (summ.loc[c.name, k] for k in (m, f"{m}_lo", f"{m}_hi", f"{m}_n"))
                    methods[m].append(summ.attrs["interval_method"][m])
                elif c.name == ref:
                    x = self._values(m, g.loc[common]) if len(common) else np.array([])
                    val = lo = hi = 0.0 if (x == x).any() else math.nan
                    n = int((x == x).sum())
                else:
                    x, y = self._values(m, g.loc[common]), self._values(m, r.loc[common])
                    prompts = np.array([p for p, _ in common], dtype=object)
                    val, lo, hi, how = paired_diff_ci(x, y, prompts, binary=binary[m], level=level, n_boot=n_boot)
                    n = int(((x == x) & (y == y)).sum())
                    if n:
                        methods[m].append(how)
                d[f"{m}_diff"], d[f"{m}_diff_lo"], d[f"{m}_diff_hi"], d[f"{m}_n"] = val, lo, hi, n
            out.append(d)
        cmp = pd.DataFrame(out)
        cmp.attrs["method"] = {m: " / ".join(dict.fromkeys(v)) or "none (no pairs)" for m, v in methods.items()}
        cmp.attrs["kind"] = kind
        cmp.attrs["level"] = level
        cmp.attrs["higher_is_better"] = {m: bool(self.metric_info.get(m, {}).get("higher_is_better", True))
                                         for m in metrics}
        cmp.attrs["time_interval_method"] = summ.attrs["time_interval_method"]
        return cmp

    def recommend(self, metric: str | None = None, margin: float | None = None, mode: str | None = None,
                  level: float = 0.95) -> Recommendation:
        """The cheapest config no worse than full guidance (``dlx.sweeps.answer.recommend``)."""
        return recommend(self, metric=metric, margin=margin, mode=mode, level=level)

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

    def provenance(self) -> dict:
        """What made these rows, as the store recorded it: the versions and devices the rows were
        computed with, the model's identity and weights fingerprint, the scheduler of the embedded
        model as shipped, the call, each config's JSON, the measured step costs per timing mode and
        batch, and when the sweep was created and its rows finished."""
        store = Store(self.out)
        try:
            weights, created = store.meta("weights"), store.meta("created_at")
        finally:
            store.close()
        versions = [json.loads(v) for v in sorted({json.dumps(r["versions"], sort_keys=True)
                                                     for r in self._rows if r.get("versions")})]
        finished = sorted(r["finished_at"] for r in self._rows if r.get("finished_at"))
        model = dict(self.spec.model)
        if model.get("name") == "shapes" and "scheduler" not in model:
            from ..zoo import path as zoo_path

            try:
                conf = json.loads((zoo_path("shapes") / "scheduler" / "scheduler_config.json").read_text())
                model["scheduler"] = conf.pop("_class_name", None)
                model["scheduler_config"] = {k: v for k, v in conf.items() if not k.startswith("_")}
            except (OSError, ValueError):  # pragma: no cover - the package's own file
                pass
        return {"versions": versions, "devices": sorted({r["device"] for r in self._rows if r.get("device")}),
                "model": model, "weights_fingerprint": weights, "call": dict(self.spec.call),
                "configs": {c.name: c.to_json() for c in self.spec.configs}, "costs": list(self._costs),
                "timing_batch": self.timing_batch, "created_at": created,
                "rows_finished": [finished[0], finished[-1]] if finished else None}

    def previews(self, row_id: str):
        """Per-step x0 previews of a row, uint8 tensor (steps, 128, 128, 3) (``keep_previews=True``)."""
        from safetensors.torch import load_file

        p = self.out / "previews" / f"{row_id}.safetensors"
        if not p.is_file():
            raise DlxError(f"no previews for row {row_id!r} in {str(self.out)!r}; run the sweep with keep_previews=True")
        return load_file(str(p))["x0"]
