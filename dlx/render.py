"""Rendering: latents → RGB previews, with no part machinery (import it without attaching anything).

Two kinds of decoder turn latents of one family into uint8 RGB:

* a **linear map** (:class:`LatentRGB`): one linear layer from the latent channels to R, G, B (plus a
  bias), applied per latent pixel, so a 1024² SDXL image previews as 128×128. The factors come from
  ComfyUI's ``comfy/latent_formats.py`` (applied as its ``latent_preview.Latent2RGBPreviewer`` does:
  ``F.linear(x.movedim(1, -1), factors.T, bias)``, clamp to [−1, 1], map to 0–255) and, for the
  diffusers "pipeline callbacks" guide, its SDXL ``latents_to_rgb`` snippet (0–255 weights,
  reproduced bitwise under the name ``"sdxl-guide"``). :func:`fit_latent_rgb` fits such a map for
  any VAE.
* a **VAE decoder** (:func:`vae_to_rgb`): a TAESD (diffusers ``AutoencoderTiny``) or a VAE small
  enough to run per step (the embedded ``dlx.zoo`` models: 16×16 → 64×64 in milliseconds), which
  can read latents no linear map can.

``decoder="auto"`` (the default everywhere) picks the model's own VAE where the trace or the
pipeline says which model it is and that model's VAE is known to be small (:func:`small_vae`: the
zoo models), else the family's linear map. Tiles are enlarged with :func:`upscale`, which keeps
edges sharp (whole-pixel nearest-neighbour blocks); :func:`png_bytes` gives what a browser shows.

Cost: the map runs where the latents are (one linear/einsum, a clamp and a uint8 cast on the
device, no host sync); a VAE decode is one decoder pass (about 20 ms per 64×64 tile on one CPU
core for the shapes model, see ``bench/bench_preview.py --model shapes``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import PurePath

import torch

from ._io import png_bytes as _png_bytes
from .errors import DlxError
from .families import FAMILIES, Family

__all__ = [
    "LatentRGB",
    "LATENT_RGB",
    "latent_rgb",
    "latents_to_rgb",
    "unpack_latents",
    "vae_to_rgb",
    "taesd_to_rgb",
    "small_vae",
    "decoder_for",
    "upscale",
    "to_pil",
    "png_bytes",
    "render_steps",
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


def taesd_to_rgb(taesd, latents: torch.Tensor, *, packed: bool | None = None, height=None, width=None,
                 vae_scale_factor=None) -> torch.Tensor:
    """:func:`vae_to_rgb` with a TAESD (diffusers ``AutoencoderTiny``): the name the preview API had first."""
    return vae_to_rgb(taesd, latents, packed=packed, height=height, width=width, vae_scale_factor=vae_scale_factor)


# --- which decoder -------------------------------------------------------------------------------

_DECODERS = ("auto", "map", "vae")
_SMALL_VAES: dict = {}


def _zoo_name(model) -> str | None:
    """The ``dlx.zoo`` model a pipeline's ``name_or_path`` (recorded as ``trace.meta["model"]``)
    points at: a folder ``.../zoo/<name>`` (the shipped one, on any machine) with a zoo name."""
    if not isinstance(model, (str, PurePath)) or not str(model):
        return None
    from .zoo import MODELS

    p = PurePath(str(model).replace("\\", "/"))
    return p.name if p.name in MODELS and p.parent.name == "zoo" else None


def small_vae(model, device=None, dtype=None):
    """The VAE of ``model`` (a ``name_or_path``) if it is known to be small enough to decode every
    step, loaded once from the shipped files and cached per device and dtype; else ``None``.

    Known small: the ``dlx.zoo`` models (the shapes model's decoder has 1.7M parameters and turns
    16×16 latents into 64×64 images in about 20 ms on one CPU core). Any other model's previews
    use its family's linear map unless a VAE or TAESD is passed (``decoder=vae``).
    """
    name = _zoo_name(model)
    if name is None:
        return None
    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    key = (name, str(device), dtype)
    vae = _SMALL_VAES.get(key)
    if vae is None:
        from diffusers import AutoencoderKL

        from .zoo import path

        vae = AutoencoderKL.from_pretrained(str(path(name) / "vae"), dtype=dtype, local_files_only=True)
        vae = _SMALL_VAES[key] = vae.to(device).eval().requires_grad_(False)
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
    small (``model`` names a ``dlx.zoo`` model), else the family's map; a module: that VAE/TAESD.
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
    small = _zoo_name(model) is not None
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


# --- images --------------------------------------------------------------------------------------


def _check_size(size):
    if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1):
        raise DlxError(f"argument `size` must be a positive int (longer side in pixels) or None; got {size!r}")


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


# --- shared rendering -----------------------------------------------------------------------------


def _check_taesd(taesd):
    if taesd is not None and not (hasattr(taesd, "decode") and hasattr(getattr(taesd, "config", None), "latent_channels")):
        raise DlxError(
            f"argument `taesd` (or `decoder`) must be a diffusers VAE (AutoencoderTiny or AutoencoderKL); "
            f"got {type(taesd).__name__}"
        )


def _split_decoder(factors, taesd):
    """A torch module given as ``factors`` is taken as a VAE (``trace.previews(factors=taesd)``)."""
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
