"""Previews: cheap RGB views of the noisy latent x_t and the denoised estimate x0 at every step.

A latent→RGB map is one linear layer from the latent channels to R, G, B (plus a bias), applied
per latent pixel, so a 1024² SDXL image previews as 128×128. The factors come from ComfyUI's
``comfy/latent_formats.py`` (applied as its ``latent_preview.Latent2RGBPreviewer`` does:
``F.linear(x.movedim(1, -1), factors.T, bias)``, clamp to [−1, 1], map to 0–255) and, for the
diffusers "pipeline callbacks" guide, its SDXL ``latents_to_rgb`` snippet (0–255 weights,
reproduced bitwise under the name ``"sdxl-guide"``). :func:`fit_latent_rgb` fits such a map for
any VAE; a TAESD (diffusers ``AutoencoderTiny``) can replace the linear map.

Cost: the map runs where the latents are (one linear/einsum, a clamp and a uint8 cast on the
device: a handful of tiny kernels, no host sync). Nothing is copied to the host until a preview
is shown: :class:`Preview` hands the user's function a :class:`PreviewImage` that holds the
device uint8 tensor and becomes a PIL image on first use (one sync and an H·W·3-byte copy).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from .errors import DlxError
from .families import FAMILIES, Family, denoised_as, family_of, prediction_type
from .session import Part, Run

__all__ = [
    "LatentRGB",
    "LATENT_RGB",
    "latent_rgb",
    "latents_to_rgb",
    "unpack_latents",
    "taesd_to_rgb",
    "to_pil",
    "PreviewImage",
    "Preview",
    "trace_previews",
    "fit_latent_rgb",
]

_KINDS = ("x0", "latent")
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
        raise DlxError(f"latents must be a torch.Tensor; got {type(latents).__name__}")
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


def taesd_to_rgb(taesd, latents: torch.Tensor, *, packed: bool | None = None, height=None, width=None,
                 vae_scale_factor=None) -> torch.Tensor:
    """Model-space latents → uint8 (B, H, W, 3) through a TAESD (diffusers ``AutoencoderTiny``).

    The latents go to ``taesd.decode`` as a pipeline hands them to its VAE: divided by
    ``config.scaling_factor`` plus ``config.shift_factor`` (madebyollin's TAESD configs have 1 and 0,
    so model-space latents go in unchanged). Output is at the decoder's resolution (8× the latent
    for real TAESD weights); costs one small decoder pass on the device.
    """
    cfg = taesd.config
    x, single = _as_images(latents, int(cfg.latent_channels), packed, height, width, vae_scale_factor,
                           f"the TAESD ({type(taesd).__name__}, latent_channels={cfg.latent_channels})")
    p = next(taesd.parameters())
    z = x.to(device=p.device, dtype=p.dtype) / float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
    shift = getattr(cfg, "shift_factor", None)
    if shift:
        z = z + float(shift)
    with torch.no_grad():
        img = taesd.decode(z).sample  # [-1, 1]
    out = ((img + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8).movedim(1, -1)
    return out[0] if single else out


# --- images --------------------------------------------------------------------------------------


def _check_size(size):
    if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1):
        raise DlxError(f"argument `size` must be a positive int (longer side in pixels) or None; got {size!r}")


def to_pil(rgb: torch.Tensor, size: int | None = 128):
    """A uint8 (h, w, 3) tensor (any device) → PIL image whose longer side is ``size``.

    Enlarging uses nearest-neighbour, so each latent stays a block of pixels; shrinking (TAESD
    output) uses box filtering. ``size=None`` keeps the tensor's resolution. Copies to the host.
    """
    from PIL import Image

    _check_size(size)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != torch.uint8:
        raise DlxError(f"to_pil takes a uint8 (h, w, 3) tensor; got {rgb.dtype} {tuple(rgb.shape)}")
    img = Image.fromarray(rgb.detach().cpu().numpy())
    if size is None:
        return img
    w, h = img.size
    W, H = (size, max(1, round(h * size / w))) if w >= h else (max(1, round(w * size / h)), size)
    if (W, H) == (w, h):
        return img
    resample = Image.Resampling.NEAREST if W >= w else Image.Resampling.BOX
    return img.resize((W, H), resample)


class PreviewImage:
    """One step's preview: a uint8 (h, w, 3) tensor on the device of the run, made when first used.

    A live :class:`Preview` keeps, per step, only what the preview needs (a copy of one sample's
    latent, or of its predictions, and the denoiser input) and maps it to RGB when the image is
    first used: ``.tensor`` (the uint8 tensor, on the device), ``.pil()`` (or any PIL attribute:
    ``save``, ``resize``, ``size``, …, and notebook display), which then costs one device sync
    and an h·w·3-byte copy. A ``fn`` that only holds images (a gallery showing some of them
    later) adds a copy or two per step to the run and nothing else.
    """

    __slots__ = ("step", "_tensor", "_make", "_size", "_pil")

    def __init__(self, step: int, tensor: torch.Tensor | None = None, size: int | None = 128, *, make=None):
        if (tensor is None) == (make is None):
            raise DlxError("PreviewImage takes a uint8 tensor or a function that makes one (make=), not both")
        self.step = step
        self._tensor = tensor
        self._make = make
        self._size = size
        self._pil = None

    @property
    def tensor(self) -> torch.Tensor:
        """The uint8 (h, w, 3) preview at latent resolution, on the run's device (made on first use)."""
        if self._tensor is None:
            self._tensor = self._make()
            self._make = None  # drop the step's copies
        return self._tensor

    @property
    def rendered(self) -> bool:
        return self._tensor is not None

    @property
    def converted(self) -> bool:
        return self._pil is not None

    def pil(self):
        if self._pil is None:
            self._pil = to_pil(self.tensor, self._size)
        return self._pil

    def __getattr__(self, name):
        if name.startswith("__") or name in PreviewImage.__slots__:
            raise AttributeError(name)
        return getattr(self.pil(), name)

    def __array__(self, dtype=None, copy=None):
        import numpy as np

        return np.asarray(self.pil(), dtype=dtype)

    def _repr_png_(self):
        return self.pil()._repr_png_()

    def __repr__(self):
        if self._tensor is None:
            return f"PreviewImage(step={self.step}, size={self._size}, not rendered yet)"
        t = self._tensor
        state = "converted" if self._pil is not None else "on device, not converted"
        return f"PreviewImage(step={self.step}, {tuple(t.shape)} uint8 on {t.device}, size={self._size}, {state})"


# --- shared rendering -----------------------------------------------------------------------------


def _check_taesd(taesd):
    if taesd is not None and not (hasattr(taesd, "decode") and hasattr(getattr(taesd, "config", None), "latent_channels")):
        raise DlxError(f"argument `taesd` must be a diffusers AutoencoderTiny; got {type(taesd).__name__}")


def _split_decoder(factors, taesd):
    """A torch module given as ``factors`` is taken as a TAESD (``trace.previews(factors=taesd)``)."""
    if isinstance(factors, torch.nn.Module):
        if taesd is not None:
            raise DlxError("pass a TAESD as `taesd=` or as `factors=`, not both")
        return None, factors
    return factors, taesd


def _decoder(fam: Family | None, factors, taesd, what: str):
    """The map (or TAESD) that renders latents of ``fam``, its channel count and its name for errors."""
    if taesd is not None:
        c = int(taesd.config.latent_channels)
        return None, c, f"the TAESD ({type(taesd).__name__}, latent_channels={c})"
    if factors is None:
        if fam is None:
            raise DlxError(f"{what} has no known family, so pass `factors=` (a map name or LatentRGB)")
        factors = fam.latent_format
    m = latent_rgb(factors)
    where = f"the {m.name!r} latent→RGB map" + (f" (family {fam.name!r}, latent format {fam.latent_format!r})" if fam else "")
    return m, m.channels, where


def _render(x, fam: Family | None, factors, taesd, hw, vsf, what: str) -> torch.Tensor:
    """Latents of one family (batch-first, packed for Flux) → uint8 (B, h, w, 3) on their device."""
    packed = fam.packed if fam is not None else None
    h, w = hw
    if taesd is not None:
        return taesd_to_rgb(taesd, x, packed=packed, height=h, width=w, vae_scale_factor=vsf)
    m, channels, where = _decoder(fam, factors, None, what)
    xi, _ = _as_images(x, channels, packed, h, w, vsf, where)
    return _map(xi, m)


def _check_fits(x, fam: Family | None, factors, taesd, hw, vsf, what: str) -> None:
    """What ``_render`` checks, without rendering: the map or TAESD fits these latents."""
    _, channels, where = _decoder(fam, factors, taesd, what)
    _as_images(x, channels, fam.packed if fam is not None else None, hw[0], hw[1], vsf, where)


def _check_sample(sample, batch: int):
    if isinstance(sample, bool) or not isinstance(sample, numbers.Integral) or not 0 <= sample < batch:
        raise DlxError(f"argument `sample` must be an int in [0, {batch}); got {sample!r}")


def trace_previews(trace, kind: str = "x0", size: int | None = 128, sample: int = 0, factors=None, taesd=None):
    """PIL previews of every recorded step of ``trace`` (one per step), for ``sample`` of the batch.

    ``kind="x0"``: the denoised estimate (what ComfyUI and AUTOMATIC1111 show); ``"latent"``: x_t
    after the step. ``factors`` defaults to the family's map (``Family.latent_format``); a TAESD
    (``AutoencoderTiny``) may be passed as ``taesd=`` or as ``factors=``. All steps are mapped in one
    batched call on the tensors' device and copied to the host once.
    """
    if kind not in _KINDS:
        raise DlxError(f"argument `kind` must be one of {list(_KINDS)}; got {kind!r}")
    _check_size(size)
    factors, taesd = _split_decoder(factors, taesd)
    _check_taesd(taesd)
    name = "x0" if kind == "x0" else "latents"
    if not trace.steps:
        return []
    vals = [getattr(s, name) for s in trace.steps]
    if any(v is None for v in vals):
        raise DlxError(f"kind={kind!r} needs {name!r} recorded on every step; this trace recorded {trace.fields()}")
    _check_sample(sample, vals[0].shape[0])
    fam = FAMILIES.get(trace.meta.get("family"))
    call = trace.meta.get("call") or {}
    x = torch.stack([v[sample] for v in vals])  # steps become the batch
    rgb = _render(x, fam, factors, taesd, (call.get("height"), call.get("width")), None,
                  f"trace of {trace.meta.get('pipeline', '?')}").cpu()
    return [to_pil(r, size) for r in rgb]


class Preview(Part):
    """Live previews: after each step, ``fn(step, image)`` gets a :class:`PreviewImage`.

    ``kind="x0"`` previews the denoised estimate (needs the denoiser's prediction: attach with
    ``dlx.attach(pipe, Preview(fn))`` or ``dlx.record(pipe, Preview(fn))``); ``kind="latent"``
    previews x_t and also works as a plain ``callback_on_step_end``. ``every=n`` previews every
    n-th step and the last. ``factors``/``taesd`` as in :func:`trace_previews`.

    Cost per previewed step: one or two small copies on the device (our sample's latent, or its
    predictions), no host sync. The x0 estimate and the map to RGB run on the device when the
    image is first used (the run's first preview checks at once that the map fits the latents);
    a ``fn`` that shows every image as it comes pays that, one sync and a small copy per step, as
    the guide's snippet does. An observer: it never changes the run.
    """

    observer = True

    def __init__(self, fn, kind: str = "x0", *, size: int | None = 128, sample: int = 0, factors=None,
                 taesd=None, every: int = 1):
        if not callable(fn):
            raise DlxError(f"argument `fn` must be callable as fn(step, image); got {fn!r}")
        if kind not in _KINDS:
            raise DlxError(f"argument `kind` must be one of {list(_KINDS)}; got {kind!r}")
        _check_size(size)
        if isinstance(sample, bool) or not isinstance(sample, numbers.Integral) or sample < 0:
            raise DlxError(f"argument `sample` must be a non-negative int; got {sample!r}")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise DlxError(f"argument `every` must be a positive int; got {every!r}")
        factors, taesd = _split_decoder(factors, taesd)
        _check_taesd(taesd)
        if factors is not None:
            factors = latent_rgb(factors)  # fail now on a bad name, not mid-run
        self.fn = fn
        self.kind = kind
        self.size = size
        self.sample = int(sample)
        self.factors = factors
        self.taesd = taesd
        self.every = int(every)
        self.wants_calls = kind == "x0"
        self.tensor_inputs = ["latents"] if kind == "latent" else []
        self.report: dict = {}
        self._pending: dict[int, torch.Tensor] = {}
        self._checked = False

    def __repr__(self):
        return f"Preview(kind={self.kind!r}, size={self.size}, sample={self.sample}, every={self.every})"

    def _due(self, step: int, num_steps) -> bool:
        return step % self.every == 0 or (num_steps is not None and step == num_steps - 1)

    @staticmethod
    def _layout(pipe, call_kwargs):
        # Flux unpacking uses the call's size; without one the grid must be square (Flux's default size is).
        hw = (call_kwargs.get("height"), call_kwargs.get("width"))
        vsf = getattr(pipe, "vae_scale_factor", None) if hw[0] is not None else None
        return hw, vsf

    def _emit(self, step, make):
        self.report["previews"] = self.report.get("previews", 0) + 1
        self.fn(int(step), PreviewImage(int(step), size=self.size, make=make))

    def _later(self, like, fam, what, hw, vsf, compute=None):
        """A function that maps our sample's latents to RGB when called: ``compute()`` (x0 from the
        step's kept tensors) or else ``like`` itself. ``like`` has the layout of the latents to
        render: the run's first preview checks that the map fits it."""
        factors, taesd = self.factors, self.taesd
        if not self._checked:
            _check_fits(like, fam, factors, taesd, hw, vsf, what)
            self._checked = True

        def make():
            return _render(like if compute is None else compute(), fam, factors, taesd, hw, vsf, what)[0]
        return make

    def _latent_later(self, lat, fam, what, hw, vsf):
        """``_later`` for x_t: a copy of our sample of the step's latents (the pipeline replaces them)."""
        _check_sample(self.sample, lat.shape[0])
        return self._later(lat[self.sample:self.sample + 1].clone(), fam, what, hw, vsf)

    # -- attached --------------------------------------------------------------------------------
    def on_run_start(self, run: Run):
        self._pending = {}
        self.report = {"kind": self.kind, "previews": 0}
        self._x0_kind = None
        self._checked = False

    def on_loop_start(self, run: Run):
        self._hw, self._vsf = self._layout(run.pipe, run.call_kwargs)
        self._what = type(run.pipe).__name__
        if self.kind == "x0":
            self._x0_kind = prediction_type(run.family, run.pipe.scheduler)

    def on_denoiser(self, run: Run, call):
        step = call.step
        if step in self._pending or not self._due(step, run.num_steps):
            return  # extra evaluations (Heun, skip-layer guidance): the first one is the step's
        i = self.sample
        if i >= call.x_in.shape[0]:
            _check_sample(i, call.x_in.shape[0])
        s = slice(i, i + 1)
        # Copies of the predictions our sample's x0 needs, now: a CUDA graph overwrites its
        # outputs on the next replay. The denoiser input is the pipeline's own tensor, which no
        # pipeline changes after the call: kept as it is, and checked when the image is made.
        # The arithmetic waits until the image is used.
        x = call.x_in[s]
        version = x._version
        kind, sigma = self._x0_kind, run.sigma(step)
        if call.lerp_guided:  # the pipeline's own CFG: guided = lerp(uncond, cond, scale)
            pair = call.pair
            if pair is not None and pair.shape[0] == 2:  # batch 1: both halves in one copy
                u, c = pair.clone().chunk(2)
            else:
                u, c = call.uncond[s].clone(), call.cond[s].clone()
            w, g = call.scale, None
        else:
            g = c = call.guided[s].clone()
            u = w = None

        def x0():
            if x._version != version:
                raise DlxError(
                    f"the denoiser input of step {step} was changed in place after the step, so its x0 "
                    f"preview cannot be made; make previews as they come (fn calling image.pil()) or "
                    f"use kind='latent'"
                )
            return denoised_as(kind, x, torch.lerp(u, c, w) if g is None else g, sigma)
        self._pending[step] = self._later(c, run.family, self._what, self._hw, self._vsf, compute=x0)

    def on_step_end(self, run: Run, step, timestep, callback_kwargs):
        if self.kind == "x0":
            make = self._pending.pop(step, None)
        elif self._due(step, run.num_steps):
            make = self._latent_later(callback_kwargs["latents"], run.family, self._what, self._hw, self._vsf)
        else:
            make = None
        if make is not None:
            self._emit(step, make)
        return callback_kwargs

    def on_run_end(self, run: Run, error):
        self._pending = {}

    # -- plain callback_on_step_end --------------------------------------------------------------
    def __call__(self, pipe, step, timestep, callback_kwargs):
        run = Run.current(pipe)
        if run is not None and self in run.parts:
            return self.on_step_end(run, step, timestep, callback_kwargs)
        if self.kind == "x0":
            raise DlxError(
                "Preview(kind='x0') needs the denoiser's prediction, which callbacks do not see: attach it "
                "(`with dlx.attach(pipe, Preview(fn)): pipe(...)`) or use kind='latent' as a plain callback"
            )
        if "latents" not in callback_kwargs:
            raise DlxError("Preview(kind='latent') reads `latents`: pass callback_on_step_end_tensor_inputs=['latents']")
        if step == 0:
            self.report = {"kind": self.kind, "previews": 0}
            self._checked = False
        if self._due(step, getattr(pipe, "num_timesteps", None)):
            # Not attached: the call's height/width are unknown, so Flux latents must form a square grid.
            self._emit(step, self._latent_later(callback_kwargs["latents"], family_of(pipe), type(pipe).__name__,
                                                (None, None), None))
        return callback_kwargs


# --- fitting -------------------------------------------------------------------------------------


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
    params = list(vae.parameters()) if hasattr(vae, "parameters") else []
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else torch.float32
    cfg = getattr(vae, "config", None)
    sf = float(scaling_factor if scaling_factor is not None else getattr(cfg, "scaling_factor", None) or 1.0)
    shift = float(shift_factor if shift_factor is not None else getattr(cfg, "shift_factor", None) or 0.0)
    xs, ys = [], []
    with torch.no_grad():
        for img in _image_tensors(images):
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
