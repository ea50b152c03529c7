"""Decoders and their choice: which of a family's linear map, a model's own small VAE or a TAESD
renders a model's latents (:func:`decoder_for`), and the VAE decode itself (:func:`vae_to_rgb`).

``decoder="auto"`` (the default everywhere) picks the model's own VAE where the trace or the
pipeline names a model that registered its VAE as small (:mod:`dlx.render.registry`: the zoo
models), else the family's linear map. A VAE decode is one decoder pass (about 20 ms per 64×64
tile on one CPU core for the shapes model, see ``bench/bench_preview.py --model shapes``).
"""

from __future__ import annotations

import torch

from ..errors import DlxError
from ..families import Family
from .maps import _as_images, _map, latent_rgb
from .registry import registered_vae

__all__ = ["vae_to_rgb", "small_vae", "decoder_for"]


def vae_to_rgb(vae, latents: torch.Tensor, *, packed: bool | None = None, height=None, width=None,
               vae_scale_factor=None, chunk: int = 32) -> torch.Tensor:
    """Model-space latents → uint8 (B, H, W, 3) through a VAE's decoder (a TAESD, diffusers
    ``AutoencoderTiny``, or an ``AutoencoderKL`` small enough to run per step).

    The latents go to ``vae.decode`` as a pipeline hands them to its VAE: divided by
    ``config.scaling_factor`` plus ``config.shift_factor`` (madebyollin's TAESD configs have 1 and 0,
    so model-space latents go in unchanged), in the VAE's dtype and on its device, ``chunk`` latents
    per decoder pass. Output is at the decoder's resolution (8× the latent for SD's VAE and TAESD,
    4× for the zoo's shapes model).
    """
    cfg = vae.config
    x, single = _as_images(latents, int(cfg.latent_channels), packed, height, width, vae_scale_factor,
                           f"the VAE ({type(vae).__name__}, latent_channels={cfg.latent_channels})")
    p = next(vae.parameters())
    z = x.to(device=p.device, dtype=p.dtype) / float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
    shift = getattr(cfg, "shift_factor", None)
    if shift:
        z = z + float(shift)
    outs = []
    with torch.no_grad():
        for i in range(0, z.shape[0], chunk):
            img = vae.decode(z[i:i + chunk]).sample  # [-1, 1]
            outs.append(((img + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8).movedim(1, -1))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out[0] if single else out


# --- which decoder -------------------------------------------------------------------------------

_DECODERS = ("auto", "map", "vae")
_SMALL_VAES: dict = {}  # (model name, device, dtype) -> the loaded VAE


def small_vae(model, device=None, dtype=None):
    """The VAE of ``model`` (a ``name_or_path``) if a model registered it as small enough to decode
    every step (:func:`dlx.render.register_vae`), loaded once and cached per device and dtype; else
    ``None``.

    Registered by dlx: the ``dlx.zoo`` models (the shapes model's decoder has 1.7M parameters and
    turns 16×16 latents into 64×64 images in about 20 ms on one CPU core). Any other model's
    previews use its family's linear map unless a VAE or TAESD is passed (``decoder=vae``).
    """
    entry = registered_vae(model)
    if entry is None:
        return None
    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    key = (entry.name, str(device), dtype)
    vae = _SMALL_VAES.get(key)
    if vae is None:
        vae = _SMALL_VAES[key] = entry.load(device, dtype).to(device).eval().requires_grad_(False)
    return vae


def _check_decoder(decoder):
    if isinstance(decoder, str):
        if decoder not in _DECODERS:
            raise DlxError(f"argument `decoder` must be one of {list(_DECODERS)} or a VAE module; got {decoder!r}")
    elif not isinstance(decoder, torch.nn.Module):
        raise DlxError(f"argument `decoder` must be one of {list(_DECODERS)} or a VAE module; got {type(decoder).__name__}")
    else:
        _check_taesd(decoder)


def decoder_for(model=None, *, decoder="auto", factors=None, taesd=None, vae=None, device=None, dtype=None):
    """``(factors, vae)``: what renders a model's latents, exactly one of them not ``None`` unless
    the family's map is meant (``(None, None)``).

    An explicit ``factors`` (map) or ``taesd`` wins. Else ``decoder``: ``"map"`` the family's linear
    map; ``"vae"`` the model's own VAE (``vae``, the pipeline's, or the one :func:`small_vae` knows for
    ``model``), an error where none is known; ``"auto"`` the model's own VAE where it is known to be
    small (a model that registered its VAE: :mod:`dlx.render.registry`), else the family's map; a
    module: that VAE/TAESD.
    """
    _check_decoder(decoder)
    factors, taesd = _split_decoder(factors, taesd)
    _check_taesd(taesd)
    if factors is not None or taesd is not None:
        return factors, taesd
    if isinstance(decoder, torch.nn.Module):
        return None, decoder
    if decoder == "map":
        return None, None
    small = registered_vae(model) is not None
    if small and vae is not None:
        return None, vae
    found = small_vae(model, device, dtype) if small else None
    if found is None and decoder == "vae":
        if vae is not None:
            return None, vae
        raise DlxError(
            f"decoder='vae' needs a VAE this dlx knows for model {model!r}; pass one (`decoder=pipe.vae`)"
        )
    return None, found


# --- rendering with the chosen decoder ---------------------------------------------------------------


def _check_taesd(taesd):
    if taesd is not None and not (hasattr(taesd, "decode") and hasattr(getattr(taesd, "config", None), "latent_channels")):
        raise DlxError(
            f"argument `taesd` (or `decoder`) must be a diffusers VAE (AutoencoderTiny or AutoencoderKL); "
            f"got {type(taesd).__name__}"
        )


def _split_decoder(factors, taesd):
    """A torch module given as ``factors`` is taken as a VAE (``trace_previews(trace, factors=taesd)``)."""
    if isinstance(factors, torch.nn.Module):
        if taesd is not None:
            raise DlxError("pass a TAESD as `taesd=` or as `factors=`, not both")
        return None, factors
    return factors, taesd


def _decoder(fam: Family | None, factors, taesd, what: str):
    """The map (or VAE) that renders latents of ``fam``, its channel count and its name for errors."""
    if taesd is not None:
        c = int(taesd.config.latent_channels)
        return None, c, f"the VAE ({type(taesd).__name__}, latent_channels={c})"
    if factors is None:
        if fam is None:
            raise DlxError(f"{what} has no known family, so pass `factors=` (a map name or LatentRGB)")
        factors = fam.latent_format
    m = latent_rgb(factors)
    where = f"the {m.name!r} latent→RGB map" + (f" (family {fam.name!r}, latent format {fam.latent_format!r})" if fam else "")
    return m, m.channels, where


def _render(x, fam: Family | None, factors, taesd, hw, vsf, what: str) -> torch.Tensor:
    """Latents of one family (batch-first, packed for Flux) → uint8 (B, h, w, 3) on their device
    (a VAE's output is on the VAE's device)."""
    packed = fam.packed if fam is not None else None
    h, w = hw
    if taesd is not None:
        return vae_to_rgb(taesd, x, packed=packed, height=h, width=w, vae_scale_factor=vsf)
    m, channels, where = _decoder(fam, factors, None, what)
    xi, _ = _as_images(x, channels, packed, h, w, vsf, where)
    return _map(xi, m)


def _check_fits(x, fam: Family | None, factors, taesd, hw, vsf, what: str) -> None:
    """What ``_render`` checks, without rendering: the map or VAE fits these latents."""
    _, channels, where = _decoder(fam, factors, taesd, what)
    _as_images(x, channels, fam.packed if fam is not None else None, hw[0], hw[1], vsf, where)
