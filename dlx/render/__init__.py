"""Rendering: latents → RGB pictures, with no part machinery (import it without attaching anything).

One module per idea:

* :mod:`~dlx.render.maps`: **linear maps** (:class:`LatentRGB`, :data:`LATENT_RGB`,
  :func:`latents_to_rgb`): one linear layer from the latent channels to R, G, B per latent pixel
  (ComfyUI's factors and the diffusers guide's SDXL snippet, bitwise), and Flux unpacking.
* :mod:`~dlx.render.decoders`: **decoders and their choice** (:func:`decoder_for`,
  :func:`vae_to_rgb`, :func:`small_vae`): a TAESD or a VAE small enough to run per step, which
  can read latents no linear map can. ``decoder="auto"`` (the default everywhere) picks the model's
  own VAE where the model registered it (:mod:`~dlx.render.registry`, :func:`register_vae`: the
  ``dlx.zoo`` models do), else the family's map.
* :mod:`~dlx.render.images`: tiles enlarged with sharp edges (:func:`upscale`), :func:`to_pil`,
  :func:`png_bytes` (what a browser shows).
* :mod:`~dlx.render.steps`: a trace's steps as pictures (:func:`render_steps`, :func:`trace_previews`).
* :mod:`~dlx.render.fit`: :func:`fit_latent_rgb`, a least-squares map for any VAE.

Names load on first use, so ``import dlx`` (which lets ``dlx.zoo`` register its models here)
imports no torch.
"""

from __future__ import annotations

import importlib

# public name -> submodule that defines it; the private ones are the checks dlx's parts and views share
_NAMES = {
    "LatentRGB": "maps",
    "LATENT_RGB": "maps",
    "latent_rgb": "maps",
    "latents_to_rgb": "maps",
    "unpack_latents": "maps",
    "vae_to_rgb": "decoders",
    "small_vae": "decoders",
    "decoder_for": "decoders",
    "register_vae": "registry",
    "upscale": "images",
    "to_pil": "images",
    "png_bytes": "images",
    "render_steps": "steps",
    "trace_previews": "steps",
    "fit_latent_rgb": "fit",
    "_check_size": "images",
    "_check_decoder": "decoders",
}

__all__ = [n for n in _NAMES if not n.startswith("_")]


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dlx.render' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
