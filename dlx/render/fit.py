"""Fitting a linear latent→RGB map for any VAE from a handful of images (:func:`fit_latent_rgb`)."""

from __future__ import annotations

import math
import numbers

import torch

from ..errors import DlxError
from .maps import LatentRGB

__all__ = ["fit_latent_rgb"]


def _image_tensors(images):
    """Images as a list of float (1, 3, H, W) tensors in [0, 1]."""
    if isinstance(images, torch.Tensor):
        t = images.unsqueeze(0) if images.ndim == 3 else images
        if t.ndim != 4 or t.shape[1] != 3:
            raise DlxError(f"argument `images` as a tensor must be (N, 3, H, W) in [0, 1]; got shape {tuple(images.shape)}")
        return [t[i:i + 1].float() for i in range(t.shape[0])]
    if not isinstance(images, (list, tuple)) or not images:
        raise DlxError(f"argument `images` must be a non-empty list of PIL images or an (N, 3, H, W) tensor; got {type(images).__name__}")
    out = []
    for im in images:
        if isinstance(im, torch.Tensor):
            out.extend(_image_tensors(im))
            continue
        import numpy as np

        a = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise DlxError(f"argument `images` holds an image of shape {a.shape}; expected RGB (H, W, 3)")
        t = torch.from_numpy(np.array(a)).permute(2, 0, 1).unsqueeze(0).float()
        out.append(t / 255.0 if a.dtype == np.uint8 else t)
    return out


def fit_latent_rgb(vae, images, *, scaling_factor: float | None = None, shift_factor: float | None = None,
                   name: str = "fitted") -> LatentRGB:
    """Least-squares latent→RGB factors and bias for any VAE, from a handful of images.

    Each image (PIL, or float in [0, 1]) is encoded (the posterior mean for ``AutoencoderKL``,
    ``latents`` for ``AutoencoderTiny``) and taken to model space, ``(z − shift) · scale`` with the
    VAE config's factors unless given, so the map applies to latents as callbacks see them. The
    image, scaled to [−1, 1] and area-downsampled to the latent grid, is the target; one
    ``torch.linalg.lstsq`` (float64) over all latent pixels gives factors and bias (ComfyUI's
    convention and orientation). ``source`` reports the fit's RMS error in [−1, 1] units.
    """
    if not isinstance(vae, torch.nn.Module) or not callable(getattr(vae, "encode", None)):
        raise DlxError(f"argument `vae` must be a VAE with an encode() method (AutoencoderKL, AutoencoderTiny); "
                       f"got {type(vae).__name__} {vae!r:.60}")
    for name, v in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
            raise DlxError(f"argument `{name}` must be a finite number or None; got {v!r}")
    if scaling_factor is not None and scaling_factor == 0:
        raise DlxError(f"argument `scaling_factor` must not be zero; got {scaling_factor!r}")
    tensors = _image_tensors(images)
    if any(not bool(torch.isfinite(t).all()) for t in tensors):
        raise DlxError("argument `images` holds NaN or infinite values")
    params = list(vae.parameters()) if hasattr(vae, "parameters") else []
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else torch.float32
    cfg = getattr(vae, "config", None)
    sf = float(scaling_factor if scaling_factor is not None else getattr(cfg, "scaling_factor", None) or 1.0)
    shift = float(shift_factor if shift_factor is not None else getattr(cfg, "shift_factor", None) or 0.0)
    xs, ys = [], []
    with torch.no_grad():
        for img in tensors:
            pix = img * 2.0 - 1.0
            enc = vae.encode(pix.to(device=device, dtype=dtype))
            z = enc.latent_dist.mean if hasattr(enc, "latent_dist") else getattr(enc, "latents", None)
            if z is None:
                z = enc[0]
            z = (z.float().cpu() - shift) * sf
            target = torch.nn.functional.interpolate(pix, size=tuple(z.shape[-2:]), mode="area")
            xs.append(z.movedim(1, -1).reshape(-1, z.shape[1]))
            ys.append(target.movedim(1, -1).reshape(-1, 3))
    X = torch.cat(xs).double()
    Y = torch.cat(ys).double()
    c = X.shape[1]
    if X.shape[0] < c + 1:
        raise DlxError(f"fit_latent_rgb needs at least {c + 1} latent pixels for {c} channels; the images gave {X.shape[0]}")
    A = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)
    sol = torch.linalg.lstsq(A, Y, driver="gelsd").solution  # (C + 1, 3); gelsd copes with rank deficiency
    rmse = float((A @ sol - Y).pow(2).mean().sqrt())
    return LatentRGB(
        factors=sol[:c].float(), bias=sol[c].float(), name=name, scaling_factor=sf, shift_factor=shift,
        source=f"fit_latent_rgb: least squares on {len(xs)} images, {X.shape[0]} latent pixels, rms error {rmse:.4f}",
    )
