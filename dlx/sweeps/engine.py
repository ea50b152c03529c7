"""Running the rows of a sweep: many rows per pipeline call, each sample with its own plan.

Rows that share the call's step count go into one pipeline call, whatever their guidance
scales, where the pipeline allows it (below). Each sample gets the noise of its own seed (one
CPU ``torch.Generator`` per sample, as a standalone run with
``generator=torch.Generator().manual_seed(seed)`` draws it) and follows its own config's
controls: the call is attached with ``per_sample`` (each row's fresh control instances, asked
with the run as that sample alone sees it) and the tap computes only the rows the plans need.
Each row's NFE and guided steps are read from the run's one record (``recorder.Ledger``). Rows of the same prompt, seed and scale
go into the same call (their reference row, full guidance at that scale, first), so the tap can
evaluate the guided prefix they share once (``dlx.Share``, where available); rows of different
scales are never shared (their keys hold the scale).

Scales in one call: the call runs at the largest of its rows' scales (so CFG is on when any row
is guided) and every sample runs at its own row's scale (``attach(..., scales=)``); a row at a
scale <= 1 is unguided at every step, as a standalone call at that scale runs without CFG
(NFE = steps), and a scale-setting control (``GuidanceSchedule``) reads its own row's scale as
the call's (``RunInfo.sample``).
That equals one call per scale only where the call's ``guidance_scale`` acts in the CFG
combination alone (``Family.scale_only_combines``: SD 1.5/2, SDXL, SD3, their img2img, inpaint
and ControlNet pipelines, the embedded model; ``guidance_rescale`` included, the tap rescales
each sample). Where it also changes the denoiser's inputs (Flux's distilled guidance
embedding, LCM's ``w`` embedding, SD3 skip-layer guidance: ``families.scale_changes_inputs``)
the sweep keeps one call per scale. (A config that sets scales at a scale <= 1, which a
standalone run refuses, is refused when the grid is built.)

A CUDA out-of-memory error halves the batch and retries (the events table records it); a row
that still fails, or decodes to NaN, is stored as failed with its error and the sweep goes on.
Under ``torch.compile`` with CUDA graphs every new batch shape is a new graph: the runner pads
the denoiser's batch up to a few sizes (``dlx._diffusers.pad_batch``) and counts the shapes.
"""

from __future__ import annotations

import time

import torch

from ..errors import DlxError
from ..families import family_of, scale_changes_inputs
from ..recorder import Ledger
from ..session import attach
from ..share import Share

__all__ = ["plan_batches", "run_batch", "mixes_scales", "default_max_batch"]


# -- batch planning ---------------------------------------------------------------------------------
def default_max_batch(device: torch.device) -> int:
    """Rows per pipeline call: all of a cutoff study on a GPU, fewer on a CPU (memory and cache)."""
    return 256 if device.type == "cuda" else 96


def plan_batches(units: list[list[dict]], max_batch: int) -> list[list[dict]]:
    """Pack units (the rows of one prompt and seed) into batches of at most ``max_batch`` rows,
    keeping a unit in one batch when it fits (so its rows can share their guided prefix)."""
    batches, cur = [], []
    for unit in units:
        for i in range(0, len(unit), max_batch):
            piece = unit[i:i + max_batch]
            if cur and len(cur) + len(piece) > max_batch:
                batches.append(cur)
                cur = []
            cur = cur + piece
    if cur:
        batches.append(cur)
    return batches


# -- one call ------------------------------------------------------------------------------------
def _sync(device):
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def mixes_scales(pipe, call: dict) -> bool:
    """Whether rows of different guidance scales may share a call of ``pipe`` with ``call``'s
    arguments (see the module docstring)."""
    return scale_changes_inputs(pipe, call) is None


def run_batch(pipe, spec, rows: list[dict], *, share: bool = True, extra_parts=()) -> dict:
    """One pipeline call for ``rows`` (same steps; scales may differ where ``mixes_scales``):
    images (B, 3, H, W) float in [0, 1] on the pipeline's device (metrics run there; only uint8
    pixels travel to the host), per-sample NFE and guided steps, evaluations actually computed,
    wall time, and the scale (one float, or the sorted distinct scales of a mixed call) and the
    ``call_scale`` the pipeline was called with."""

    cfgs = {c.name: c for c in spec.configs}
    row_cfgs = [cfgs[r["config"]] for r in rows]
    steps_all = {spec.steps_of(c) for c in row_cfgs}
    if len(steps_all) != 1:
        raise DlxError(f"one pipeline call runs one step count; these rows have {sorted(steps_all)}")
    steps = steps_all.pop()
    scales = [spec.scale_of(c) for c in row_cfgs]
    mixed = len(set(scales)) > 1
    if mixed and not mixes_scales(pipe, spec.call):
        raise DlxError(f"rows of scales {sorted(set(scales))} cannot share one call of {type(pipe).__name__}: "
                       f"{scale_changes_inputs(pipe, spec.call)}")
    # the call's scale turns CFG on when any row is guided; every sample gets its own row's scale
    call_scale = max(scales)
    ledger = Ledger()  # the run's one record: each row's NFE and guided steps are read from it
    parts = [ledger]
    if share and len(rows) > 1 and family_of(pipe).share:  # Flux's two calls per step: no sharing
        # the scale is part of the key: rows of different scales differ from the first step
        parts.append(Share([(r["prompt"], r["seed"], s) for r, s in zip(rows, scales)]))
    parts += list(extra_parts)
    kwargs = dict(spec.call)
    kwargs.update(num_inference_steps=steps, guidance_scale=call_scale)
    dev = _device_of(pipe)
    _sync(dev)
    t0 = time.perf_counter()
    with attach(pipe, *parts, per_sample=[c.parts() for c in row_cfgs], scales=scales if mixed else None):
        out = pipe(prompt=[r["prompt"] for r in rows],
                   generator=[torch.Generator().manual_seed(int(r["seed"])) for r in rows],
                   output_type="pt", **kwargs)
    images = out.images if not isinstance(out, tuple) else out[0]
    images = images.detach().float()
    _sync(dev)
    call_ms = (time.perf_counter() - t0) * 1e3
    rec = ledger.record
    return {"images": images, "nfe": list(rec.nfe), "guided": list(rec.guided_steps),
            "evaluations": float(rec.evaluations), "call_ms": call_ms, "steps": steps,
            "scale": sorted(set(scales)) if mixed else call_scale, "call_scale": call_scale,
            "step_ms": list(rec.step_ms)}


def _device_of(pipe) -> torch.device:
    den = getattr(pipe, family_of(pipe).denoiser)
    try:
        return next(den.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    return (img * 255).round().clamp(0, 255).to(torch.uint8)
