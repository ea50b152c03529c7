"""Linear latent→RGB maps: one linear layer from the latent channels to R, G, B (plus a bias),
applied per latent pixel, so a 1024² SDXL image previews as 128×128.

The factors come from ComfyUI's ``comfy/latent_formats.py`` (applied as its
``latent_preview.Latent2RGBPreviewer`` does: ``F.linear(x.movedim(1, -1), factors.T, bias)``,
clamp to [−1, 1], map to 0–255) and, for the diffusers "pipeline callbacks" guide, its SDXL
``latents_to_rgb`` snippet (0–255 weights, reproduced bitwise under the name ``"sdxl-guide"``).
:func:`dlx.render.fit_latent_rgb` fits such a map for any VAE. Flux's packed latents are unpacked
here too (:func:`unpack_latents`).

Cost: the map runs where the latents are (one linear/einsum, a clamp and a uint8 cast on the
device, no host sync).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from ..errors import DlxError

__all__ = ["LatentRGB", "LATENT_RGB", "latent_rgb", "latents_to_rgb", "unpack_latents"]

_SCALES = ("unit", "byte")
_SPACES = ("model", "vae")


@dataclass(frozen=True, eq=False)
class LatentRGB:
    """A linear latent→RGB map: ``rgb = latent · factors + bias`` per latent pixel.

    ``factors`` is (C, 3): rows are latent channels, columns R, G, B (ComfyUI's orientation).
    ``scale="unit"``: the result lies in [−1, 1] and maps to 0–255 as ComfyUI's
    ``preview_to_image`` does (``((y + 1) / 2).clamp(0, 1) · 255``, truncated to uint8);
    ``scale="byte"``: the result is already 0–255, clamped and cast with ``.byte()`` as the diffusers
    guide's snippet does. Maps apply to latents in the model's space, as diffusers hands them to
    callbacks: VAE latent × ``scaling_factor`` for SD/SDXL, ``(z − shift_factor) · scaling_factor``
    for SD3/Flux; ``scaling_factor``/``shift_factor`` record that VAE's numbers (used by
    ``latents_to_rgb(..., space="vae")``).
    """

    factors: torch.Tensor
    bias: torch.Tensor | None = None
    name: str = "custom"
    scale: str = "unit"
    scaling_factor: float | None = None
    shift_factor: float | None = None
    source: str = ""
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        f = torch.as_tensor(self.factors, dtype=torch.float32).detach().cpu()
        if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] < 1:
            raise DlxError(
                f"argument `factors` must have shape (latent channels, 3) (rows = channels, columns = "
                f"R, G, B); got shape {tuple(f.shape)}"
            )
        b = self.bias
        if b is not None:
            b = torch.as_tensor(b, dtype=torch.float32).detach().cpu()
            if b.shape != (3,):
                raise DlxError(f"argument `bias` must have shape (3,); got shape {tuple(b.shape)}")
        if self.scale not in _SCALES:
            raise DlxError(f"argument `scale` must be one of {list(_SCALES)}; got {self.scale!r}")
        object.__setattr__(self, "factors", f)
        object.__setattr__(self, "bias", b)

    @property
    def channels(self) -> int:
        return int(self.factors.shape[0])

    def _on(self, device, dtype):
        """Weights and bias on ``device`` in ``dtype``, made once and cached: the guide's snippet
        re-uploads them every step, and a pageable host→device copy waits for the GPU."""
        key = (torch.device(device), dtype)
        hit = self._cache.get(key)
        if hit is None:
            # Same memory layout as each source builds them (a transposed view of a contiguous
            # tensor), so the arithmetic below is theirs operation for operation.
            if self.scale == "byte":  # guide: torch.t(torch.tensor(rgb_rows)) -> (C, 3) view
                w = self.factors.t().contiguous().to(device=device, dtype=dtype).t()
            else:  # ComfyUI: torch.tensor(channel_rows).transpose(0, 1) -> (3, C) view
                w = self.factors.to(device=device, dtype=dtype).t()
            b = None if self.bias is None else self.bias.to(device=device, dtype=dtype)
            hit = self._cache[key] = (w, b)
        return hit

    def __repr__(self):
        return f"LatentRGB({self.name!r}, {self.channels}×3, bias={'yes' if self.bias is not None else 'no'}, scale={self.scale!r})"


def _comfy(name, rows, bias, scaling, shift=None):
    return LatentRGB(
        factors=torch.tensor(rows), bias=None if bias is None else torch.tensor(bias), name=name,
        scaling_factor=scaling, shift_factor=shift,
        source="ComfyUI comfy/latent_formats.py (applied as comfy/latent_preview.py Latent2RGBPreviewer)",
    )


#: The preview maps, keyed by ``Family.latent_format`` (plus ``"sdxl-guide"``). Rows = latent
#: channels, columns = R, G, B. Numbers from ComfyUI ``comfy/latent_formats.py``. Each expects
#: model-space latents, as diffusers hands them to callbacks: ``"sd15"`` VAE z × 0.18215,
#: ``"sdxl"`` and ``"sdxl-guide"`` z × 0.13025, ``"sd3"`` (z − 0.0609) × 1.5305, ``"flux"``
#: (z − 0.1159) × 0.3611 after unpacking diffusers' (B, seq, 64) packing to (B, 16, h, w).
LATENT_RGB: dict[str, LatentRGB] = {
    "sd15": _comfy("sd15", [
        [0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177],
    ], None, 0.18215),
    "sdxl": _comfy("sdxl", [
        [0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188],
    ], [0.1084, -0.0175, -0.0011], 0.13025),
    "sd3": _comfy("sd3", [
        [-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458], [0.0856, 0.0339, 0.0902],
        [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309], [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358],
        [-0.0194, 0.0020, 0.0669], [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
        [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293], [-0.1448, -0.1463, -0.1189],
    ], [0.2394, 0.2135, 0.1925], 1.5305, 0.0609),
    "flux": _comfy("flux", [
        [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
        [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
        [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
        [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499], [-0.1262, -0.0982, -0.0778],
    ], [-0.0329, -0.0718, -0.0851], 0.3611, 0.1159),
    # The diffusers callbacks guide ("Display image after each generation step"): weights given as
    # R, G, B rows over the 4 SDXL channels on a 0–255 scale; stored here transposed (channel rows).
    "sdxl-guide": LatentRGB(
        factors=torch.tensor([(60, -60, 25, -70), (60, -5, 15, -50), (60, 10, -5, -35)], dtype=torch.float32).t(),
        bias=torch.tensor([150.0, 140.0, 130.0]), name="sdxl-guide", scale="byte", scaling_factor=0.13025,
        source="diffusers docs, pipeline callbacks guide, latents_to_rgb (einsum, 0-255 scale)",
    ),
}


def latent_rgb(factors) -> LatentRGB:
    """The map ``factors`` names: a key of :data:`LATENT_RGB`, a :class:`LatentRGB`, a (C, 3)
    tensor/nested list, or a ``(factors, bias)`` pair."""
    if isinstance(factors, LatentRGB):
        return factors
    if isinstance(factors, str):
        if factors not in LATENT_RGB:
            raise DlxError(f"argument `factors` names no known map: {factors!r}; known: {sorted(LATENT_RGB)}")
        return LATENT_RGB[factors]
    if isinstance(factors, tuple) and len(factors) == 2 and not isinstance(factors[0], numbers.Number):
        return LatentRGB(factors=factors[0], bias=factors[1])
    if isinstance(factors, (torch.Tensor, list, tuple)):
        return LatentRGB(factors=factors)
    raise DlxError(
        f"argument `factors` must be a map name ({sorted(LATENT_RGB)}), a LatentRGB, a (C, 3) tensor or a "
        f"(factors, bias) pair; got {type(factors).__name__}"
    )


# --- layout ------------------------------------------------------------------------------------


def unpack_latents(latents: torch.Tensor, height=None, width=None, vae_scale_factor=None) -> torch.Tensor:
    """Flux's packed (B, seq, 4·C) latents as (B, C, h, w), the inverse of diffusers'
    ``FluxPipeline._pack_latents`` (2×2 patches, channel-major).

    ``height``/``width`` are the call's image size in pixels; with ``vae_scale_factor`` the grid is
    ``(height // (2·vsf), width // (2·vsf))`` as ``FluxPipeline._unpack_latents`` computes it,
    without it the factor whose grid has ``seq`` cells is used. With no size the grid must be square.
    """
    if latents.ndim != 3:
        raise DlxError(f"packed latents must be (batch, seq, 4·channels); got shape {tuple(latents.shape)}")
    b, seq, c4 = latents.shape
    if c4 % 4:
        raise DlxError(f"packed latents have {c4} features per token, not a multiple of 4 (2×2 patches)")
    if height is not None and width is not None:
        height, width = int(height), int(width)
        cands = [int(vae_scale_factor)] if vae_scale_factor else [8, 16, 4, 2, 1, 32, 64]
        grid = next(((height // (2 * v), width // (2 * v)) for v in cands
                     if (height // (2 * v)) * (width // (2 * v)) == seq), None)
        if grid is None:
            raise DlxError(
                f"packed latents have {seq} tokens, which no 2×2-patch grid of a {height}×{width} image "
                f"makes (vae_scale_factor {vae_scale_factor or cands})"
            )
        gh, gw = grid
    else:
        r = math.isqrt(seq)
        if r * r != seq:
            raise DlxError(
                f"packed latents have {seq} tokens, not a square number, so their grid is ambiguous: "
                f"pass the call's `height` and `width` (pixels)"
            )
        gh = gw = r
    x = latents.reshape(b, gh, gw, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, 2 * gh, 2 * gw)


def _as_images(latents, channels: int, packed, height, width, vae_scale_factor, what: str):
    """(B, C, h, w) latents and whether the input was a single (C, h, w) latent."""
    if not isinstance(latents, torch.Tensor):
        raise DlxError(f"argument `latents` must be a torch.Tensor; got {type(latents).__name__} {latents!r:.60}")
    if latents.numel() == 0:
        raise DlxError(f"argument `latents` is empty: shape {tuple(latents.shape)}")
    if packed is not None and not isinstance(packed, bool):
        raise DlxError(f"argument `packed` must be True, False or None (guess from the shape); got {packed!r}")
    x = latents.detach()
    if packed is None:  # (C, h, w) as the guide passes latents[0], else Flux's (B, seq, 4·C)
        packed = x.ndim == 3 and x.shape[0] != channels and x.shape[-1] == 4 * channels
    single = False
    if packed:
        x = unpack_latents(x, height, width, vae_scale_factor)
    elif x.ndim == 3:
        x, single = x.unsqueeze(0), True
    if x.ndim != 4:
        raise DlxError(f"latents must be (B, C, h, w), (C, h, w) or packed (B, seq, 4·C); got shape {tuple(latents.shape)}")
    if x.shape[1] != channels:
        raise DlxError(
            f"latents have {x.shape[1]} channels but {what} expects {channels}; pass a map for this VAE "
            f"(`factors=`, e.g. from dlx.fit_latent_rgb) or latents of the right family"
        )
    return x, single


def _map(x: torch.Tensor, m: LatentRGB) -> torch.Tensor:
    """(B, C, h, w) → uint8 (B, h, w, 3), on x's device and in x's dtype, as each source does it."""
    w, b = m._on(x.device, x.dtype)
    if m.scale == "byte":  # diffusers guide, operation for operation
        rgb = torch.einsum("...lxy,lr -> ...rxy", x, w)
        if b is not None:
            rgb = rgb + b.unsqueeze(-1).unsqueeze(-1)
        return rgb.clamp(0, 255).byte().movedim(-3, -1)
    y = torch.nn.functional.linear(x.movedim(-3, -1), w, b)  # ComfyUI Latent2RGBPreviewer
    return ((y + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8)  # ComfyUI preview_to_image


def latents_to_rgb(latents: torch.Tensor, factors, *, packed: bool | None = None, height=None, width=None,
                   vae_scale_factor=None, space: str = "model") -> torch.Tensor:
    """Latents → uint8 RGB at latent resolution, on the latents' device: (B, h, w, 3), or (h, w, 3)
    for a single (C, h, w) latent (as the diffusers guide's ``latents_to_rgb(latents[0])``).

    ``factors``: a map name (``"sd15"``, ``"sdxl"``, ``"sd3"``, ``"flux"``, ``"sdxl-guide"``), a
    :class:`LatentRGB` or a (C, 3) tensor. Latents are in model space as diffusers hands them to
    callbacks (``space="vae"`` takes raw VAE latents z and applies ``(z − shift) · scale`` of the
    map first). Flux's packed (B, seq, 64) latents are unpacked (:func:`unpack_latents`; ``packed``
    is guessed from the shape unless given). Computed in the latents' dtype, as ComfyUI and the
    guide do; ``"sdxl-guide"`` reproduces the guide's snippet bitwise.
    """
    m = latent_rgb(factors)
    if space not in _SPACES:
        raise DlxError(f"argument `space` must be one of {list(_SPACES)}; got {space!r}")
    x, single = _as_images(latents, m.channels, packed, height, width, vae_scale_factor,
                           f"the {m.name!r} latent→RGB map")
    if space == "vae":
        if m.scaling_factor is None:
            raise DlxError(f"map {m.name!r} records no scaling_factor, so space='vae' cannot convert latents")
        x = (x - (m.shift_factor or 0.0)) * m.scaling_factor
    out = _map(x, m)
    return out[0] if single else out
