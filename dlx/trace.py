"""The Trace: a recorded denoising run, one typed record per step.

Each ``Step`` is taken *after* the scheduler step and after the step-end callbacks, as diffusers
hands it to ``callback_on_step_end``: ``latents`` are x_{t-1}. The predictions (``cond``,
``uncond``) and ``x0`` are those of the denoiser evaluation made *during* the step, at
``timestep``/``sigma``. Tensors are kept with a leading batch dimension.

Files are a single ``.safetensors``: tensors under ``steps.<i>.<field>`` and ``cond.<j>.<name>``,
metadata as JSON in the header (``dlx.trace``), written atomically.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import DlxError

__all__ = ["Step", "Trace", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_TENSOR_FIELDS = ("latents", "x0", "cond", "uncond", "cfg_mask", "scale")


@dataclass
class Step:
    """One denoising step, recorded after the scheduler step (see module docstring)."""

    index: int
    timestep: float
    sigma: float
    guidance_scale: float  # mean over the samples; per sample: ``scale`` (and to_frame(per_sample=True))
    cfg_active: bool  # the unconditional pass ran for at least one sample; per sample: ``cfg_mask``
    nfe: float  # nominal denoiser evaluations per sample on this step, mean over the samples
    step_ms: float = math.nan
    evaluations: int = 0  # sample-rows the denoiser really evaluated (dlx.Share: fewer than nominal)
    ip_adapter_scale: float | None = None
    conditioning: int = 0  # index into Trace.conditioning in force for this step
    latents: torch.Tensor | None = None
    x0: torch.Tensor | None = None
    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None  # NaN rows for samples whose unconditional pass was skipped
    cfg_mask: torch.Tensor | None = None  # bool per sample: guided this step
    scale: torch.Tensor | None = None  # guidance scale per sample

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in _TENSOR_FIELDS if getattr(self, k) is not None}

    def scalars(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in _TENSOR_FIELDS}


@dataclass
class Trace:
    """A recorded run: ``steps`` (one ``Step`` each), ``conditioning`` (tensors stored once and
    again only when they change), ``meta`` (pipeline, scheduler, prompt, seed, versions, ...)."""

    steps: list[Step] = field(default_factory=list)
    conditioning: list[dict[str, torch.Tensor]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i):
        return self.steps[i]

    def __iter__(self):
        return iter(self.steps)

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"Trace({len(self.steps)} steps, {m.get('pipeline', '?')}, batch {m.get('batch', '?')}, "
            f"stop_reason={m.get('stop_reason')!r}, nfe/sample={m.get('nfe')})"
        )

    @property
    def stop_reason(self) -> str | None:
        return self.meta.get("stop_reason")

    @property
    def last_guided_step(self) -> int | None:
        """Index of the last step on which any sample's unconditional pass ran (None: none did)."""
        guided = [s.index for s in self.steps if s.cfg_active]
        return guided[-1] if guided else None

    @property
    def nfe(self) -> list[float] | None:
        """Denoiser evaluations per sample over the run."""
        return self.meta.get("nfe")

    def stack(self, name: str) -> torch.Tensor:
        """Tensor ``name`` of every step stacked: (steps, batch, ...)."""
        vals = [getattr(s, name) for s in self.steps]
        if any(v is None for v in vals):
            raise DlxError(f"field {name!r} was not recorded on every step (recorded: {self.fields()})")
        return torch.stack(vals)

    def fields(self) -> list[str]:
        return [k for k in _TENSOR_FIELDS if self.steps and getattr(self.steps[0], k) is not None]

    # -- tables -------------------------------------------------------------------------------
    def to_frame(self, per_sample: bool = False):
        """One row per step (or per step and sample): scalars and summary statistics.

        With ``per_sample=True`` ``guidance_scale``, ``cfg_active`` and ``nfe`` are the sample's own;
        per step they summarise the batch (mean scale, any sample guided, mean NFE).
        ``cond_uncond_l2`` is ‖cond − uncond‖₂ per sample and ``cond_uncond_cos`` their cosine,
        both NaN where the unconditional pass did not run; with ``per_sample=False`` they are
        averaged over the samples that have them.
        """
        import pandas as pd

        rows = []
        for s in self.steps:
            base = {
                "step": s.index, "timestep": s.timestep, "sigma": s.sigma,
                "guidance_scale": s.guidance_scale, "cfg_active": s.cfg_active, "nfe": s.nfe,
                "step_ms": s.step_ms,
            }
            if s.ip_adapter_scale is not None:
                base["ip_adapter_scale"] = s.ip_adapter_scale
            stats = _step_stats(s)
            if per_sample:
                b = len(next(iter(stats.values()))) if stats else 1
                for j in range(b):
                    r = dict(base, sample=j)
                    for k, v in stats.items():
                        r[k] = v[j]
                    if s.cfg_mask is not None and j < len(s.cfg_mask):
                        r["cfg_active"] = bool(s.cfg_mask[j])
                        # a sample's unconditional row is the only evaluation that differs
                        # between samples: its NFE is the step's mean, moved by its own mask
                        m = s.cfg_mask.tolist()
                        r["nfe"] = s.nfe - sum(m) / len(m) + m[j]
                    if s.scale is not None and j < len(s.scale):
                        r["guidance_scale"] = float(s.scale[j])
                    rows.append(r)
            else:
                r = dict(base)
                for k, v in stats.items():
                    vals = [x for x in v if not math.isnan(x)]
                    r[k] = sum(vals) / len(vals) if vals else math.nan
                rows.append(r)
        return pd.DataFrame(rows)

    def timing(self) -> dict:
        """Which timing regime the run was in, from its per-step times.

        Compares the median time of guided steps (unconditional pass ran) with that of unguided
        ones (the first step is left out: it carries warm-up). ``saving`` is the share of a
        guided step's time an unguided step saves. Below 10 % the loop is bound by the host
        (Python and kernel launches, as eager diffusers on a fast GPU): cutting CFG saves little
        wall time. Above, the denoiser dominates (CPU, or a compiled GPU pipeline) and a cutoff
        saves about ``saving`` per unguided step. ``regime`` is "unknown" without both kinds.
        """
        import statistics

        g = [s.step_ms for s in self.steps[1:] if s.cfg_active and s.step_ms == s.step_ms]
        u = [s.step_ms for s in self.steps[1:] if not s.cfg_active and s.step_ms == s.step_ms]
        out = {
            "timer": self.meta.get("timing"),
            "guided_ms": statistics.median(g) if g else math.nan,
            "unguided_ms": statistics.median(u) if u else math.nan,
            "saving": math.nan,
            "regime": "unknown",
        }
        if g and u:
            out["saving"] = 1.0 - out["unguided_ms"] / out["guided_ms"]
            out["regime"] = "host-bound" if out["saving"] < 0.10 else "denoiser-bound"
        return out

    def compare(self, other: "Trace"):
        """Per-step divergence between two traces of the same shape, as a DataFrame.

        Columns per recorded tensor field ``f``: ``f_rmse``, ``f_max_abs`` and ``f_cos`` (cosine of
        the flattened tensors), for the steps both traces have.
        """
        import pandas as pd

        if not isinstance(other, Trace):
            raise DlxError(f"compare() takes a Trace; got {type(other).__name__}")
        names = [f for f in ("latents", "x0", "cond") if f in self.fields() and f in other.fields()]
        rows = []
        for a, b in zip(self.steps, other.steps):
            r = {"step": a.index, "timestep_a": a.timestep, "timestep_b": b.timestep}
            for f in names:
                x, y = getattr(a, f).double(), getattr(b, f).double()
                if x.shape != y.shape:
                    raise DlxError(f"step {a.index}: {f} shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
                d = x - y
                r[f"{f}_rmse"] = float(d.pow(2).mean().sqrt())
                r[f"{f}_max_abs"] = float(d.abs().max())
                r[f"{f}_cos"] = float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0))
            rows.append(r)
        return pd.DataFrame(rows)

    # -- previews (a view of the trace; logic in dlx.preview) ---------------------------------
    def previews(self, kind: str = "x0", size: int = 128, sample: int = 0, factors=None, taesd=None):
        """PIL previews of every step: ``kind="x0"`` (denoised estimate) or ``"latent"`` (x_t);
        ``factors`` overrides the family's latent→RGB map, ``taesd`` decodes with an AutoencoderTiny."""
        from . import preview

        return preview.trace_previews(self, kind=kind, size=size, sample=sample, factors=factors, taesd=taesd)

    # -- files --------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the trace to ``path`` (a ``.safetensors`` file) atomically; return the path."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {}
        for s in self.steps:
            for k, v in s.tensors().items():
                # clone: steps may be views of one stacked tensor; safetensors refuses shared storage
                tensors[f"steps.{s.index}.{k}"] = v.detach().cpu().clone()
        for j, c in enumerate(self.conditioning):
            for k, v in c.items():
                tensors[f"cond.{j}.{k}"] = v.detach().cpu().clone()
        header = {
            "format_version": FORMAT_VERSION,
            "meta": self.meta,
            "steps": [s.scalars() for s in self.steps],
            "conditioning": [sorted(c) for c in self.conditioning],
        }
        text = json.dumps(header, default=_json_default, allow_nan=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"dlx.trace": text})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path) -> "Trace":
        """Read a trace written by ``save``; a damaged or foreign file gives a DlxError naming it."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DlxError(f"trace file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for damaged headers/data
            raise DlxError(
                f"{str(path)!r} is not a readable dlx trace (truncated or corrupt safetensors file: {e})"
            ) from None
        if "dlx.trace" not in meta:
            raise DlxError(f"{str(path)!r} is a safetensors file but not a dlx trace (no 'dlx.trace' metadata)")
        try:
            header = json.loads(meta["dlx.trace"])
        except json.JSONDecodeError as e:
            raise DlxError(f"{str(path)!r}: the trace metadata is not valid JSON ({e})") from None
        version = header.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise DlxError(
                f"{str(path)!r} was written with trace format version {version}, newer than this dlx "
                f"reads ({FORMAT_VERSION}); upgrade dlx"
            )
        steps = []
        for sc in header["steps"]:
            s = Step(**sc)
            for k in _TENSOR_FIELDS:
                setattr(s, k, tensors.get(f"steps.{s.index}.{k}"))
            steps.append(s)
        conditioning = [{k: tensors[f"cond.{j}.{k}"] for k in names} for j, names in enumerate(header["conditioning"])]
        return cls(steps=steps, conditioning=conditioning, meta=header["meta"])


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def _step_stats(s: Step) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    if s.latents is not None and s.latents.ndim > 1:
        out["latent_std"] = s.latents.float().flatten(1).std(dim=1).tolist()
    if s.x0 is not None:
        out["x0_std"] = s.x0.float().flatten(1).std(dim=1).tolist()
    if s.cond is not None and s.uncond is not None:
        c = s.cond.double().flatten(1)
        u = s.uncond.double().flatten(1)
        out["cond_uncond_l2"] = (c - u).norm(dim=1).tolist()
        out["cond_uncond_cos"] = torch.nn.functional.cosine_similarity(c, u, dim=1).tolist()
    elif s.cond is not None:
        b = s.cond.shape[0]
        out["cond_uncond_l2"] = [math.nan] * b
        out["cond_uncond_cos"] = [math.nan] * b
    return out
