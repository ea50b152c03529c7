"""Tiny random-weight diffusers pipelines for fast, offline tests of the denoising loop.

Everything here is built from configs: no weights, tokenizer files or configs are fetched from the
Hugging Face hub. Tokenizer files (a byte-level CLIP BPE vocab and a T5 Unigram model) are written
into a temporary directory per call and loaded from there, so nothing is shipped as package data.

Public API:

* :data:`FAMILIES` - the pipeline families :func:`tiny_pipeline` can build.
* :data:`SCHEDULERS` - the scheduler names accepted by ``tiny_pipeline(scheduler=...)``.
* :func:`tiny_pipeline` - build a tiny pipeline of one family.
* :func:`example_inputs` - keyword arguments for a fast, deterministic call of that pipeline.
* :func:`latent_shape` - the shape ``pipe(**example_inputs(...))`` returns with ``output_type="latent"``.
* :func:`add_tiny_ip_adapter` - load a random-weight IP-Adapter into a tiny UNet pipeline.

Heavy libraries (diffusers, transformers, tokenizers, PIL) are imported inside the functions so
``import dlx.testing`` stays cheap.

Over 400 lines, kept as one module on purpose: it holds one idea, a tiny pipeline of each family
built from configs, and its sections are the steps of that build (tokenizer files, components,
schedulers, assembly, the call's inputs, an IP-Adapter for it). Tests patch its builder
(``_build``) and read its tokenizer and UNet settings; split into modules they would have to know
which step lives where.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zlib
from typing import Any

import torch

from dlx import _args
from dlx.errors import DlxError

__all__ = [
    "FAMILIES",
    "SCHEDULERS",
    "tiny_pipeline",
    "example_inputs",
    "latent_shape",
    "add_tiny_ip_adapter",
]

FAMILIES: tuple[str, ...] = (
    "sd",
    "sd-img2img",
    "sd-inpaint",
    "sdxl",
    "sdxl-img2img",
    "sd3",
    "sd-controlnet",
    "flux",
)

SCHEDULERS: tuple[str, ...] = ("ddim", "euler", "dpm++", "flow-euler")

# Families whose denoiser predicts flow velocity; they only work with flow-matching schedulers.
_FLOW_FAMILIES = ("sd3", "flux")
_UNET_SCHEDULERS = ("ddim", "euler", "dpm++")
# Flux passes `sigmas=` to set_timesteps, which only FlowMatchEulerDiscreteScheduler accepts here.
_FLOW_SCHEDULERS = ("flow-euler",)

# Image side in pixels for every family; VAEs downsample by 2, so latents are 16x16.
IMAGE_SIZE = 32
_VAE_SCALE = 2
LATENT_CHANNELS = 4
# Text lengths for the T5 branch (Flux) and the zero T5 stand-in (SD3): short keeps runs fast.
_T5_MAX_SEQUENCE_LENGTH = 32
# img2img runs diffusers' usual partial denoise; example_inputs compensates in num_inference_steps.
_IMG2IMG_STRENGTH = 0.75

# Words the tiny tokenizers know as whole tokens; anything else splits into characters.
_WORDS = (
    "a an the of in on with and at photo painting drawing render portrait landscape "
    "red green blue yellow orange purple black white gray circle square triangle star "
    "cat dog bird fish tree flower house car boat sky sun moon sea mountain city "
    "small large big tiny bright dark blurry sharp detailed simple high low quality "
    "bad good best worst style art"
).split()
_PROMPT_VARIANTS = ("blue", "green", "small", "large", "bright", "dark", "detailed", "simple")

_OUTPUT_TYPES = ("latent", "pil", "pt", "np")

_CLIP_VOCAB_SIZE = 1000  # text encoder embedding rows; the BPE vocab uses fewer ids
_T5_VOCAB_SIZE = 256


# ---------------------------------------------------------------------------------------------
# argument checking
# ---------------------------------------------------------------------------------------------


def _check_family(family: str) -> str:
    """Return ``family`` if known, else raise DlxError naming it and the valid choices."""
    if not isinstance(family, str) or family not in FAMILIES:
        raise DlxError(f"family={family!r} is not a known family; valid choices: {', '.join(FAMILIES)}")
    return family


def _component_seed(seed: int, name: str) -> int:
    """A per-component seed, so adding or reordering components never shifts another's weights."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class _Seeded:
    """Context manager: seed torch's CPU RNG for one component, restoring the caller's RNG after."""

    def __init__(self, seed: int, name: str):
        self._seed = _component_seed(seed, name)
        self._fork = torch.random.fork_rng(devices=[])

    def __enter__(self):
        self._fork.__enter__()
        torch.manual_seed(self._seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


class _QuietDiffusers:
    """Raise diffusers' log level to ERROR for a block, then restore it.

    ModelMixin.to(dtype=...) warns about "modules that should be kept in float32: []" even when
    there are none; that noise would otherwise hit every dtype cast and IP-Adapter load here.
    """

    def __enter__(self):
        from diffusers.utils import logging as dlogging

        self._logging = dlogging
        self._level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()

    def __exit__(self, *exc):
        self._logging.set_verbosity(self._level)
        return False


# ---------------------------------------------------------------------------------------------
# tokenizers, written to a temporary directory and loaded back (fully offline)
# ---------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-unicode table, so the byte-level BPE covers any input text."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A small CLIP BPE: all 256 byte symbols (plain and word-final) plus merges for _WORDS."""
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in _WORDS:
        # CLIP marks the last symbol of a word with </w>; merge left to right into the whole word.
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            if merged not in vocab:
                merges.append(f"{symbols[0]} {symbols[1]}")
                vocab[merged] = len(vocab)
            symbols = [merged] + symbols[2:]
    # Real CLIP puts the special tokens last, too.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) <= _CLIP_VOCAB_SIZE
    return vocab, merges


def _clip_tokenizer():
    """A CLIPTokenizer (model_max_length=77) loaded from vocab.json/merges.txt written locally."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="dlx-clip-tok-") as d:
        with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        # The tokenizer reads everything into memory, so the directory can go afterwards.
        return CLIPTokenizer.from_pretrained(d, model_max_length=77, local_files_only=True)


def _clip_special_ids() -> tuple[int, int]:
    """(bos, eos) ids of the tiny CLIP vocab; the text encoder pools at the first eos."""
    vocab, _ = _clip_vocab_and_merges()
    return vocab["<|startoftext|>"], vocab["<|endoftext|>"]


def _t5_tokenizer():
    """A T5 tokenizer (Unigram, sentencepiece-style) built with `tokenizers` and saved locally."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    # T5's fixed layout: pad=0, eos=1, unk=2.
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]
    for c in string.ascii_letters + string.digits + string.punctuation:
        pieces.append((c, -5.0))
    for w in _WORDS:
        pieces.append(("\u2581" + w, -3.0))
    assert len(pieces) <= _T5_VOCAB_SIZE
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    with tempfile.TemporaryDirectory(prefix="dlx-t5-tok-") as d:
        tok.save(os.path.join(d, "tokenizer.json"))
        # extra_ids=0: the sentinel tokens only matter for span-corruption training.
        return T5TokenizerFast.from_pretrained(d, extra_ids=0, model_max_length=512, local_files_only=True)


# ---------------------------------------------------------------------------------------------
# components
# ---------------------------------------------------------------------------------------------


def _clip_text_config(hidden_size: int = 32, projection_dim: int = 32):
    """Tiny CLIP text config matching diffusers' dummy components, with real special-token ids."""
    from transformers import CLIPTextConfig

    bos, eos = _clip_special_ids()
    return CLIPTextConfig(
        vocab_size=_CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=bos,
        # eos != 2 makes CLIP pool at the first <|endoftext|>, as the real SD text encoders do.
        eos_token_id=eos,
        pad_token_id=eos,
    )


def _clip_text_model(seed: int, name: str, with_projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _Seeded(seed, name):
        return cls(_clip_text_config()).eval()


def _t5_encoder(seed: int, name: str):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=_T5_VOCAB_SIZE,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as Flux uses
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with _Seeded(seed, name):
        return T5EncoderModel(config).eval()


def _vae(seed: int, kind: str):
    """Tiny 2-block AutoencoderKL (downsamples by 2); `kind` picks SD, SDXL, SD3 or Flux scaling."""
    from diffusers import AutoencoderKL

    kwargs: dict[str, Any] = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        sample_size=IMAGE_SIZE,
    )
    # Scaling/shift factors as in the real VAEs, so latent statistics code sees realistic configs.
    if kind == "sd":
        kwargs.update(scaling_factor=0.18215)
    elif kind == "sdxl":
        kwargs.update(scaling_factor=0.13025, force_upcast=False)
    elif kind == "sd3":
        kwargs.update(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    elif kind == "flux":
        kwargs.update(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    with _Seeded(seed, "vae"):
        return AutoencoderKL(**kwargs).eval()


_UNET_COMMON: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,  # as diffusers' own dummy UNets; 2 costs ~50% more time per step
    sample_size=IMAGE_SIZE // _VAE_SCALE,
    out_channels=LATENT_CHANNELS,
    # Cross-attention at the high-resolution level first, as in SD's UNet.
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def _sd_unet(seed: int, in_channels: int = LATENT_CHANNELS):
    from diffusers import UNet2DConditionModel

    with _Seeded(seed, "unet"):
        return UNet2DConditionModel(
            **_UNET_COMMON,
            in_channels=in_channels,
            cross_attention_dim=32,
            attention_head_dim=8,
        ).eval()


def _sdxl_unet(seed: int):
    from diffusers import UNet2DConditionModel

    with _Seeded(seed, "unet"):
        return UNet2DConditionModel(
            **_UNET_COMMON,
            in_channels=LATENT_CHANNELS,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + text_encoder_2 projection 32
            cross_attention_dim=64,  # text_encoder hidden 32 + text_encoder_2 hidden 32
        ).eval()


def _controlnet(seed: int):
    from diffusers import ControlNetModel

    with _Seeded(seed, "controlnet"):
        net = ControlNetModel(
            block_out_channels=_UNET_COMMON["block_out_channels"],
            layers_per_block=_UNET_COMMON["layers_per_block"],
            down_block_types=_UNET_COMMON["down_block_types"],
            in_channels=LATENT_CHANNELS,
            cross_attention_dim=32,
            attention_head_dim=8,
            conditioning_embedding_out_channels=(16, 32),  # one stride-2 step: 32px image -> 16 latent
        )
        # ControlNet zero-initialises its output convs; random ones make the control image matter.
        zero_convs = [net.controlnet_cond_embedding.conv_out, net.controlnet_mid_block, *net.controlnet_down_blocks]
        with torch.no_grad():
            for conv in zero_convs:
                torch.nn.init.normal_(conv.weight, std=0.05)
                torch.nn.init.normal_(conv.bias, std=0.05)
    return net.eval()


def _sd3_transformer(seed: int):
    from diffusers import SD3Transformer2DModel

    with _Seeded(seed, "transformer"):
        return SD3Transformer2DModel(
            sample_size=IMAGE_SIZE // _VAE_SCALE,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=64,  # CLIP-L 32 + CLIP-G 32 concatenated (T5 zeros take this width too)
            pooled_projection_dim=64,  # both CLIP projections 32 + 32
            pos_embed_max_size=32,
        ).eval()


def _flux_transformer(seed: int):
    from diffusers import FluxTransformer2DModel

    with _Seeded(seed, "transformer"):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=LATENT_CHANNELS * 4,  # Flux packs 2x2 latent patches into channels
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5 d_model
            pooled_projection_dim=32,  # CLIP pooled output (hidden size)
            guidance_embeds=True,  # like FLUX.1-dev: guidance_scale is an embedded input
            axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
        ).eval()


# ---------------------------------------------------------------------------------------------
# schedulers
# ---------------------------------------------------------------------------------------------

# SD 1.x/2.x and SDXL training schedule, as in their scheduler_config.json (DDIM keys included so
# switching scheduler class keeps clip_sample/set_alpha_to_one off).
_SD_SCHEDULE: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    clip_sample=False,
    set_alpha_to_one=False,
)


def _default_scheduler(family: str):
    """The scheduler the real checkpoints of each family ship with (SD: DDIM configured like SD)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    if family == "flux":
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    if family.startswith("sdxl"):
        return EulerDiscreteScheduler.from_config(_SD_SCHEDULE)
    return DDIMScheduler.from_config(_SD_SCHEDULE)


def _make_scheduler(family: str, name: str, config):
    """Build scheduler `name` from `config` (the pipeline's scheduler config)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    if name not in SCHEDULERS:
        raise DlxError(f"scheduler={name!r} is not a known scheduler; valid choices: {', '.join(SCHEDULERS)}")
    valid = _FLOW_SCHEDULERS if family in _FLOW_FAMILIES else _UNET_SCHEDULERS
    if name not in valid:
        raise DlxError(
            f"scheduler={name!r} does not fit family {family!r}; valid choices for it: {', '.join(valid)}"
        )
    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    return FlowMatchEulerDiscreteScheduler.from_config(config)


# ---------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------


def _build(family: str, seed: int):
    """Construct the pipeline of `family` on CPU in float32."""
    import diffusers

    sd_extras = dict(safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    if family in ("sd", "sd-img2img", "sd-inpaint", "sd-controlnet"):
        components = dict(
            vae=_vae(seed, "sd"),
            text_encoder=_clip_text_model(seed, "text_encoder"),
            tokenizer=_clip_tokenizer(),
            # Real inpaint UNets take noisy latents 4 + mask 1 + masked-image latents 4 = 9 channels.
            unet=_sd_unet(seed, in_channels=9 if family == "sd-inpaint" else LATENT_CHANNELS),
            scheduler=_default_scheduler(family),
            **sd_extras,
        )
        cls = {
            "sd": diffusers.StableDiffusionPipeline,
            "sd-img2img": diffusers.StableDiffusionImg2ImgPipeline,
            "sd-inpaint": diffusers.StableDiffusionInpaintPipeline,
            "sd-controlnet": diffusers.StableDiffusionControlNetPipeline,
        }[family]
        if family == "sd-controlnet":
            components["controlnet"] = _controlnet(seed)
        return cls(**components)
    if family in ("sdxl", "sdxl-img2img"):
        components = dict(
            vae=_vae(seed, "sdxl"),
            text_encoder=_clip_text_model(seed, "text_encoder"),
            tokenizer=_clip_tokenizer(),
            text_encoder_2=_clip_text_model(seed, "text_encoder_2", with_projection=True),
            tokenizer_2=_clip_tokenizer(),
            unet=_sdxl_unet(seed),
            scheduler=_default_scheduler(family),
            image_encoder=None,
            feature_extractor=None,
            add_watermarker=False,  # the watermark would need the invisible-watermark package
        )
        if family == "sdxl":
            return diffusers.StableDiffusionXLPipeline(**components)
        return diffusers.StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=False)
    if family == "sd3":
        return diffusers.StableDiffusion3Pipeline(
            transformer=_sd3_transformer(seed),
            vae=_vae(seed, "sd3"),
            text_encoder=_clip_text_model(seed, "text_encoder", with_projection=True),
            tokenizer=_clip_tokenizer(),
            text_encoder_2=_clip_text_model(seed, "text_encoder_2", with_projection=True),
            tokenizer_2=_clip_tokenizer(),
            text_encoder_3=None,
            tokenizer_3=None,
            scheduler=_default_scheduler(family),
        )
    assert family == "flux"
    return diffusers.FluxPipeline(
        transformer=_flux_transformer(seed),
        vae=_vae(seed, "flux"),
        text_encoder=_clip_text_model(seed, "text_encoder"),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_encoder(seed, "text_encoder_2"),
        tokenizer_2=_t5_tokenizer(),
        scheduler=_default_scheduler(family),
        image_encoder=None,
        feature_extractor=None,
    )


def tiny_pipeline(
    family: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    scheduler: Any = None,
):
    """Build a tiny random-weight diffusers pipeline of ``family``, offline and deterministically.

    Args:
        family: one of :data:`FAMILIES`.
        seed: weights depend only on this; each component is seeded on its own (from the seed and
            the component's name), so the same seed gives bitwise identical weights. The caller's
            global torch RNG state is left untouched.
        dtype: floating torch dtype of all models, or its name (``"float16"``).
        device: device to move the pipeline to (a ``torch.device`` or its name).
        scheduler: ``None`` for the family's default (SD families: ``DDIMScheduler`` configured like
            SD 1.5; SDXL families: ``EulerDiscreteScheduler`` configured like SDXL; SD3/Flux:
            ``FlowMatchEulerDiscreteScheduler`` like their checkpoints), a name from
            :data:`SCHEDULERS` built from the pipeline's scheduler config (``"ddim"``, ``"euler"``
            and ``"dpm++"`` for the UNet families, ``"flow-euler"`` for SD3/Flux), or a diffusers
            scheduler instance used as is.

    Returns:
        The pipeline, with the progress bar disabled. Images are 32x32 pixels and latents
        4x16x16 (see :func:`latent_shape`); all pipeline features work (CFG, negative prompts,
        ``num_images_per_prompt``, callbacks).

    Raises:
        DlxError: unknown ``family`` or ``scheduler`` name, or a scheduler name unfit for the family.
    """
    _check_family(family)
    seed = _args.integer("seed", seed)
    dtype = _args.float_dtype("dtype", dtype)
    device = _args.device("device", device)
    sched_obj = None
    if scheduler is not None and not isinstance(scheduler, str):
        from diffusers import SchedulerMixin

        if not isinstance(scheduler, SchedulerMixin):
            raise DlxError(
                f"scheduler={scheduler!r} is neither a name ({', '.join(SCHEDULERS)}) nor a diffusers scheduler"
            )
        sched_obj = scheduler
    elif isinstance(scheduler, str):
        # Validate the name before the (slower) model construction.
        _make_scheduler(family, scheduler, _default_scheduler(family).config)

    pipe = _build(family, seed)
    if isinstance(scheduler, str):
        pipe.scheduler = _make_scheduler(family, scheduler, pipe.scheduler.config)
    elif sched_obj is not None:
        pipe.scheduler = sched_obj
    # Models are built on CPU in float32; move only when asked (diffusers warns on every dtype cast).
    if dtype != torch.float32:
        with _QuietDiffusers():
            pipe = pipe.to(dtype=dtype)
    if device.type != "cpu":
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def latent_shape(family: str, batch: int = 1) -> tuple[int, ...]:
    """Shape of ``pipe(**example_inputs(family, ...)).images`` with ``output_type="latent"``.

    ``batch`` is the number of images (prompts x num_images_per_prompt). Flux returns its packed
    latents: (batch, tokens, 4 * channels) with one token per 2x2 latent patch.
    """
    _check_family(family)
    _args.integer("batch", batch, minimum=1)
    side = IMAGE_SIZE // _VAE_SCALE
    if family == "flux":
        return (batch, (side // 2) * (side // 2), LATENT_CHANNELS * 4)
    return (batch, LATENT_CHANNELS, side, side)


def _prompts(prompt: str, batch: int) -> str | list[str]:
    """``prompt`` itself for batch 1, else ``batch`` distinct prompts starting with it."""
    if batch < 1:
        raise DlxError(f"batch={batch!r} must be at least 1")
    if batch == 1:
        return prompt
    out = [prompt]
    for i in range(1, batch):
        variant = _PROMPT_VARIANTS[(i - 1) % len(_PROMPT_VARIANTS)]
        lap = (i - 1) // len(_PROMPT_VARIANTS)
        out.append(f"{prompt}, {variant}" + (f" {lap + 1}" if lap else ""))
    return out


def _image(seed: int, name: str, mode: str = "RGB"):
    """A small deterministic PIL image: seeded smooth noise, so VAE encodings differ per seed."""
    from PIL import Image

    g = torch.Generator().manual_seed(_component_seed(seed, name))
    channels = 1 if mode == "L" else 3
    coarse = torch.rand(1, channels, 4, 4, generator=g)
    # Upsampled coarse noise looks like blobs rather than static, closer to an actual picture.
    img = torch.nn.functional.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    arr = (img[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    if mode == "L":
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(arr, mode="RGB")


def _mask(seed: int):
    """Inpaint mask: white (repaint) on a seeded rectangle covering about a quarter of the image."""
    from PIL import Image

    g = torch.Generator().manual_seed(_component_seed(seed, "mask"))
    half = IMAGE_SIZE // 2
    x0, y0 = (int(v) for v in torch.randint(0, IMAGE_SIZE - half + 1, (2,), generator=g))
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    mask.paste(255, (x0, y0, x0 + half, y0 + half))
    return mask


def _img2img_steps(steps: int, strength: float) -> int:
    """Smallest num_inference_steps for which diffusers' img2img runs exactly `steps` steps."""
    n = max(steps, math.ceil(steps / strength) - 1)
    while min(int(n * strength), n) < steps:
        n += 1
    return n


def example_inputs(
    family: str,
    *,
    prompt: str = "a red circle",
    batch: int = 1,
    num_images_per_prompt: int = 1,
    steps: int = 4,
    seed: int = 0,
    guidance_scale: float = 5.0,
    output_type: str = "latent",
    ip_adapter_image: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments for a fast, deterministic call ``pipe(**example_inputs(family))``.

    Args:
        family: one of :data:`FAMILIES`.
        prompt: the prompt (or a list, passed through); with ``batch > 1`` the first of ``batch``
            distinct prompts.
        batch: number of prompts.
        num_images_per_prompt: passed through.
        steps: number of denoising steps actually run. For img2img families (whose diffusers
            pipelines run only ``int(num_inference_steps * strength)`` steps) ``strength`` is 0.75
            and ``num_inference_steps`` is raised so exactly ``steps`` steps run.
        seed: seeds the fresh ``torch.Generator`` passed as ``generator`` and the input images.
        guidance_scale: classifier-free guidance strength. For Flux it becomes ``true_cfg_scale``
            (with a ``negative_prompt``, so real CFG runs when it is above 1) and the distilled
            guidance embedding gets ``guidance_scale=3.5`` as FLUX.1-dev uses.
        output_type: passed through; ``"latent"`` skips the VAE decode.
        ip_adapter_image: add ``ip_adapter_image=`` (a seeded PIL image) for a pipeline prepared
            with :func:`add_tiny_ip_adapter`.
        **overrides: any further pipeline keywords; they replace the generated ones.

    Returns:
        A dict of keyword arguments (``height``/``width`` are 32, the tiny pipelines' native size).
    """
    _check_family(family)
    if not (isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                         and all(isinstance(p, str) for p in prompt))):
        raise DlxError(f"argument `prompt` must be a str or a non-empty list of str; got {prompt!r}")
    _args.integer("batch", batch, minimum=1)
    _args.integer("num_images_per_prompt", num_images_per_prompt, minimum=1)
    _args.integer("steps", steps, minimum=1)
    _args.integer("seed", seed)
    _args.finite("guidance_scale", guidance_scale, minimum=0)
    if not isinstance(output_type, str) or output_type not in _OUTPUT_TYPES:
        raise DlxError(f"argument `output_type` must be one of {list(_OUTPUT_TYPES)}; got {output_type!r}")
    if not isinstance(ip_adapter_image, bool):
        raise DlxError(f"argument `ip_adapter_image` must be a bool; got {ip_adapter_image!r}")
    kwargs: dict[str, Any] = dict(
        prompt=_prompts(prompt, batch),
        num_images_per_prompt=num_images_per_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(int(seed)),
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        output_type=output_type,
    )
    if family in ("sd-img2img", "sdxl-img2img"):
        kwargs["image"] = _image(seed, "image")
        kwargs["strength"] = _IMG2IMG_STRENGTH
        kwargs["num_inference_steps"] = _img2img_steps(steps, _IMG2IMG_STRENGTH)
        # img2img pipelines take their size from the image.
        del kwargs["height"], kwargs["width"]
    elif family == "sd-inpaint":
        kwargs["image"] = _image(seed, "image")
        kwargs["mask_image"] = _mask(seed)
    elif family == "sd-controlnet":
        kwargs["image"] = _image(seed, "control_image")
    elif family == "sd3":
        kwargs["max_sequence_length"] = _T5_MAX_SEQUENCE_LENGTH
    elif family == "flux":
        kwargs["max_sequence_length"] = _T5_MAX_SEQUENCE_LENGTH
        kwargs["guidance_scale"] = 3.5
        kwargs["true_cfg_scale"] = guidance_scale
        if guidance_scale > 1:
            # Flux runs true CFG only when a negative prompt is given; match the prompt batch.
            kwargs["negative_prompt"] = "blurry" if batch == 1 else ["blurry"] * batch
    if ip_adapter_image:
        kwargs["ip_adapter_image"] = _image(seed, "ip_adapter_image")
    kwargs.update(overrides)
    return kwargs


# ---------------------------------------------------------------------------------------------
# IP-Adapter
# ---------------------------------------------------------------------------------------------


def _ip_adapter_state_dict(unet, image_embed_dim: int, num_tokens: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """Random IP-Adapter weights in the original checkpoint layout, as diffusers' own tests make.

    ``ip_adapter`` holds to_k_ip/to_v_ip for every cross-attention processor (odd keys 1, 3, ...),
    ``image_proj`` an ImageProjection from the image embedding to ``num_tokens`` text-width tokens.
    """
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection

    cross_dim = unet.config.cross_attention_dim
    blocks = list(unet.config.block_out_channels)
    ip_layers: dict[str, torch.Tensor] = {}
    key_id = 1
    for name in unet.attn_processors.keys():
        if name.endswith("attn1.processor"):
            continue  # self-attention gets no image tokens
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(blocks))[int(name[len("up_blocks.")])]
        else:
            hidden = blocks[int(name[len("down_blocks.")])]
        sd = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=cross_dim, scale=1.0).state_dict()
        ip_layers[f"{key_id}.to_k_ip.weight"] = sd["to_k_ip.0.weight"]
        ip_layers[f"{key_id}.to_v_ip.weight"] = sd["to_v_ip.0.weight"]
        key_id += 2
    proj = ImageProjection(
        cross_attention_dim=cross_dim, image_embed_dim=image_embed_dim, num_image_text_embeds=num_tokens
    ).state_dict()
    image_proj = {
        "proj.weight": proj["image_embeds.weight"],
        "proj.bias": proj["image_embeds.bias"],
        "norm.weight": proj["norm.weight"],
        "norm.bias": proj["norm.bias"],
    }
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


def add_tiny_ip_adapter(pipe, seed: int = 0):
    """Load a random-weight IP-Adapter (plain, ImageProjection kind) into a tiny UNet pipeline.

    Registers a tiny ``CLIPVisionModelWithProjection`` image encoder (32px images, 32-d embeds)
    and a matching ``CLIPImageProcessor`` on the pipeline, then calls ``pipe.load_ip_adapter`` with
    an in-memory state dict, so nothing is read from disk or the hub. Made for ``"sd"``; the other
    UNet families (img2img, inpaint, controlnet, SDXL) take it too. Use
    ``example_inputs(..., ip_adapter_image=True)`` to pass ``ip_adapter_image=``, and
    ``pipe.set_ip_adapter_scale`` to weigh it.

    Returns:
        ``pipe``, modified in place.

    Raises:
        DlxError: the pipeline has no UNet with IP-Adapter support (SD3, Flux).
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    seed = _args.integer("seed", seed)
    if getattr(pipe, "unet", None) is None or not hasattr(pipe, "load_ip_adapter") or not hasattr(pipe, "image_encoder"):
        raise DlxError(
            f"pipe={type(pipe).__name__} is not a UNet pipeline with IP-Adapter support; "
            "valid choices: a tiny_pipeline of sd, sd-img2img, sd-inpaint, sd-controlnet, sdxl, sdxl-img2img"
        )
    embed_dim = 32
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        projection_dim=embed_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=4,
        num_channels=3,
    )
    with _Seeded(seed, "image_encoder"):
        encoder = CLIPVisionModelWithProjection(config).eval()
    encoder = encoder.to(device=pipe.device, dtype=pipe.unet.dtype)
    processor = CLIPImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE)
    # Registering both first stops load_ip_adapter from trying to fetch an encoder.
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    with _Seeded(seed, "ip_adapter"):
        state_dict = _ip_adapter_state_dict(pipe.unet, image_embed_dim=embed_dim)
    # load_ip_adapter puts the new layers on the UNet's device and dtype itself.
    with _QuietDiffusers():
        pipe.load_ip_adapter(state_dict, subfolder="", weight_name="", image_encoder_folder=None)
    return pipe
