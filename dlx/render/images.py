"""Images: tiles enlarged with sharp edges (:func:`upscale`), PIL images of uint8 RGB tensors and
the PNG bytes a browser shows (:func:`png_bytes`, encoded by ``dlx._io.png_bytes``)."""

from __future__ import annotations

import math

import torch

from .._io import png_bytes as _png_bytes
from .. import _args
from ..errors import DlxError

__all__ = ["upscale", "to_pil", "png_bytes"]


def _check_size(size):
    _args.image_size("size", size)


def upscale(img, size: int | None):
    """A PIL image resized so its longer side is ``size``, keeping edges sharp.

    Enlarging repeats each pixel into a whole k×k block (nearest-neighbour at the smallest integer
    factor k that reaches ``size``) and, where k·side overshoots, box-filters down to ``size``: every
    edge stays within one pixel of sharp, with no bilinear blur and no uneven blocks. Shrinking
    box-filters. ``size=None`` returns the image as it is.
    """
    from PIL import Image

    _check_size(size)
    if size is None:
        return img
    w, h = img.size
    W, H = (size, max(1, round(h * size / w))) if w >= h else (max(1, round(w * size / h)), size)
    if (W, H) == (w, h):
        return img
    if W > w or H > h:
        k = max(math.ceil(W / w), math.ceil(H / h))
        img = img.resize((w * k, h * k), Image.Resampling.NEAREST)
        if img.size == (W, H):
            return img
    return img.resize((W, H), Image.Resampling.BOX)


def to_pil(rgb: torch.Tensor, size: int | None = 128):
    """A uint8 (h, w, 3) tensor (any device) → PIL image whose longer side is ``size`` (:func:`upscale`:
    each pixel stays a sharp block). ``size=None`` keeps the tensor's resolution. Copies to the host."""
    from PIL import Image

    _check_size(size)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != torch.uint8:
        raise DlxError(f"to_pil takes a uint8 (h, w, 3) tensor; got {rgb.dtype} {tuple(rgb.shape)}")
    return upscale(Image.fromarray(rgb.detach().cpu().numpy()), size)


def png_bytes(image, size: int | None = None) -> bytes:
    """PNG file bytes of a PIL image or a uint8 (h, w, 3) tensor, enlarged by :func:`upscale` to
    ``size`` first (what ``ipywidgets.Image`` and an HTML ``<img>`` show, pixel for pixel)."""
    if isinstance(image, torch.Tensor):
        image = to_pil(image, size)
    else:
        image = upscale(image, size)
    return _png_bytes(image)
