"""A trace's steps as pictures: :func:`render_steps` (uint8 tensors, one batched decode) and
:func:`trace_previews` (PIL images). The trace is read, never imported: rendering stands above the
data floor and asks only for ``trace.steps`` and ``trace.meta``."""

from __future__ import annotations

import numbers

import torch

from ..errors import DlxError
from ..families import FAMILIES
from .decoders import _render, decoder_for
from .images import _check_size, to_pil

__all__ = ["render_steps", "trace_previews"]

_KINDS = ("x0", "latent")


def _check_sample(sample, batch: int):
    if isinstance(sample, bool) or not isinstance(sample, numbers.Integral) or not 0 <= sample < batch:
        raise DlxError(f"argument `sample` must be an int in [0, {batch}); got {sample!r}")


def _trace_field(trace, kind: str):
    if kind not in _KINDS:
        raise DlxError(f"argument `kind` must be one of {list(_KINDS)}; got {kind!r}")
    name = "x0" if kind == "x0" else "latents"
    vals = [getattr(s, name) for s in trace.steps]
    if any(v is None for v in vals):
        raise DlxError(f"kind={kind!r} needs {name!r} recorded on every step; this trace recorded {trace.fields()}")
    return vals


def render_steps(trace, kind: str = "x0", samples=None, *, steps=None, decoder="auto", factors=None,
                 taesd=None) -> torch.Tensor:
    """uint8 RGB of ``trace``'s ``kind`` ("x0" or "latent") at the decoder's resolution: a CPU tensor
    (steps, samples, H, W, 3) for the recorded ``steps`` (indices into ``trace.steps``, default all)
    and ``samples`` of the batch (default all). One batched map (or chunked VAE decode) on the
    tensors' device and one copy to the host. ``decoder``/``factors``/``taesd`` as in
    :func:`decoder_for`; the model is ``trace.meta["model"]``.
    """
    vals = _trace_field(trace, kind)
    factors, taesd = decoder_for(trace.meta.get("model"), decoder=decoder, factors=factors, taesd=taesd,
                                 device=vals[0].device if vals else None)
    if not vals:
        return torch.zeros(0, 0, 0, 0, 3, dtype=torch.uint8)
    batch = vals[0].shape[0]
    samples = list(range(batch)) if samples is None else list(samples)
    for s in samples:
        _check_sample(s, batch)
    idx = list(range(len(vals))) if steps is None else list(steps)
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not -len(vals) <= i < len(vals):
            raise DlxError(f"argument `steps` holds {i!r}, not an index into the trace's {len(vals)} steps")
    fam = FAMILIES.get(trace.meta.get("family"))
    call = trace.meta.get("call") or {}
    x = torch.stack([vals[i][samples] for i in idx])  # (steps, samples, ...)
    flat = x.reshape(len(idx) * len(samples), *x.shape[2:])
    rgb = _render(flat, fam, factors, taesd, (call.get("height"), call.get("width")), None,
                  f"trace of {trace.meta.get('pipeline', '?')}").cpu()
    return rgb.reshape(len(idx), len(samples), *rgb.shape[1:])


def trace_previews(trace, kind: str = "x0", size: int | None = 128, sample: int = 0, factors=None, taesd=None,
                   decoder="auto"):
    """PIL previews of every recorded step of ``trace`` (one per step), for ``sample`` of the batch.

    ``kind="x0"``: the denoised estimate (what ComfyUI and AUTOMATIC1111 show); ``"latent"``: x_t
    after the step. ``decoder="auto"``: the model's own VAE where it is known to be small (the
    ``dlx.zoo`` models), else the family's map (``Family.latent_format``); ``"map"`` forces the map.
    ``factors`` names another map; a VAE or TAESD (``AutoencoderTiny``) may be passed as
    ``decoder=``, ``taesd=`` or ``factors=``. Enlarged to ``size`` by :func:`upscale` (sharp blocks).
    """
    if kind not in _KINDS:
        raise DlxError(f"argument `kind` must be one of {list(_KINDS)}; got {kind!r}")
    _check_size(size)
    if not trace.steps:
        decoder_for(None, decoder=decoder, factors=factors, taesd=taesd)  # still check the arguments
        return []
    _check_sample(sample, _trace_field(trace, kind)[0].shape[0])
    rgb = render_steps(trace, kind, [sample], decoder=decoder, factors=factors, taesd=taesd)
    return [to_pil(r[0], size) for r in rgb]
