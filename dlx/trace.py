"""The Trace: a recorded denoising run, one typed record per step.

Each ``Step`` is taken *after* the scheduler step and after the step-end callbacks, as diffusers
hands it to ``callback_on_step_end``: ``latents`` are x_{t-1}. The predictions (``cond``,
``uncond``) and ``x0`` are those of the denoiser evaluation made *during* the step, at
``timestep``/``sigma``. Tensors are kept with a leading batch dimension.

Guidance is per sample: ``Step.guidance_scale``, ``Step.cfg_active`` and ``Step.nfe`` hold one
value per sample, as ``Trace.nfe`` (over the run) does. ``to_frame()`` summarises them per step
and ``to_frame(per_sample=True)`` gives each sample's own.

``Trace.save`` / ``Trace.load`` write and read one ``.safetensors`` file; the format lives in
:mod:`dlx.trace_file`. Pictures of a trace are a view, made by the rendering floor
(``dlx.render.trace_previews(trace)``, ``dlx.render.render_steps``); the timing policy is
:mod:`dlx.timing` (``Trace.timing()``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from . import trace_file
from .errors import DlxError

__all__ = ["Step", "Trace"]


@dataclass
class Step:
    """One denoising step, recorded after the scheduler step (see module docstring).

    ``guidance_scale``, ``cfg_active`` and ``nfe`` hold one value per sample (sample j of the
    batch at position j); ``guided`` says whether any sample was guided.
    """

    #: the fields that hold tensors (batch first); the others are scalars
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("latents", "x0", "cond", "uncond")
    #: the scalars that hold one value per sample
    PER_SAMPLE: ClassVar[tuple[str, ...]] = ("guidance_scale", "cfg_active", "nfe")

    index: int
    timestep: float
    sigma: float
    guidance_scale: list[float]  # per sample: the scale it was guided with (NaN: unknown)
    cfg_active: list[bool]  # per sample: its unconditional pass ran on this step
    nfe: list[float]  # per sample: nominal denoiser evaluations on this step (NaN: not counted)
    step_ms: float = math.nan
    evaluations: int = 0  # sample-rows the denoiser really evaluated (dlx.Share: fewer than nominal)
    ip_adapter_scale: float | None = None
    conditioning: int = 0  # index into Trace.conditioning in force for this step
    latents: torch.Tensor | None = None
    x0: torch.Tensor | None = None
    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None  # NaN rows for samples whose unconditional pass was skipped

    @property
    def guided(self) -> bool:
        """Whether the unconditional pass ran for any sample on this step."""
        return any(self.cfg_active)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.TENSOR_FIELDS if getattr(self, k) is not None}

    def scalars(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.TENSOR_FIELDS}


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
        guided = [s.index for s in self.steps if s.guided]
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
        return [k for k in Step.TENSOR_FIELDS if self.steps and getattr(self.steps[0], k) is not None]

    # -- tables -------------------------------------------------------------------------------
    def to_frame(self, per_sample: bool = False):
        """One row per step (or, with ``per_sample=True``, per step and sample): scalars and
        summary statistics.

        Per step, the per-sample values are summarised: ``cfg_active`` is True when any sample
        was guided, ``nfe`` is the mean over the samples, and ``guidance_scale`` is the scale
        when every sample has the same one, NaN when samples differ (a mean of different scales
        is no scale anything ran at: use ``per_sample=True``). With ``per_sample=True`` each row
        holds its sample's own ``guidance_scale``, ``cfg_active`` and ``nfe``.
        ``cond_uncond_l2`` is ‖cond − uncond‖₂ per sample and ``cond_uncond_cos`` their cosine,
        both NaN where the unconditional pass did not run; per step they are averaged over the
        samples that have them.
        """
        import pandas as pd

        rows = []
        for s in self.steps:
            base = {"step": s.index, "timestep": s.timestep, "sigma": s.sigma}
            stats = _step_stats(s)
            if per_sample:
                b = max([len(s.guidance_scale), len(s.cfg_active), len(s.nfe)]
                        + [len(v) for v in stats.values()])
                for j in range(b):
                    r = dict(base, sample=j,
                             guidance_scale=_at(s.guidance_scale, j, math.nan),
                             cfg_active=bool(_at(s.cfg_active, j, False)),
                             nfe=_at(s.nfe, j, math.nan), step_ms=s.step_ms)
                    if s.ip_adapter_scale is not None:
                        r["ip_adapter_scale"] = s.ip_adapter_scale
                    for k, v in stats.items():
                        r[k] = v[j] if j < len(v) else math.nan
                    rows.append(r)
            else:
                sc = s.guidance_scale
                r = dict(base,
                         guidance_scale=float(sc[0]) if sc and all(v == sc[0] for v in sc) else math.nan,
                         cfg_active=s.guided,
                         nfe=sum(s.nfe) / len(s.nfe) if s.nfe else math.nan,
                         step_ms=s.step_ms)
                if s.ip_adapter_scale is not None:
                    r["ip_adapter_scale"] = s.ip_adapter_scale
                for k, v in stats.items():
                    vals = [x for x in v if not math.isnan(x)]
                    r[k] = sum(vals) / len(vals) if vals else math.nan
                rows.append(r)
        return pd.DataFrame(rows)

    def timing(self) -> dict:
        """Which timing regime the run was in (host- or denoiser-bound): ``dlx.timing.regime(trace)``."""
        from .timing import regime

        return regime(self)

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

    # -- files: the format is dlx.trace_file's ------------------------------------------------
    def save(self, path) -> Path:
        """Write the trace to ``path`` (a ``.safetensors`` file) atomically; return the path.

        Any tensor layout is saved (channels-last, strided views, views of one stacked tensor) and
        loads back bitwise equal. The file is written beside its target and renamed over it, so a
        crash leaves the old file or the new one, never a mix (:func:`dlx.trace_file.write`).
        """
        return trace_file.write(path, self, Step)

    @classmethod
    def load(cls, path) -> "Trace":
        """Read a trace written by ``save``; a damaged or foreign file gives a DlxError naming it
        and saying what is wrong. Files of format 1 are converted (:func:`dlx.trace_file.read`)."""
        steps, conditioning, meta = trace_file.read(path, Step)
        return cls(steps=steps, conditioning=conditioning, meta=meta)


def _at(values, j: int, default):
    return values[j] if j < len(values) else default


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
