"""One table of what dlx knows about each diffusers pipeline family.

Everything family-specific lives here: which module is the denoiser, how classifier-free
guidance (CFG) lays out its batch, which callback tensors are CFG-doubled, the latent layout
and which latent→RGB preview factors apply. Other modules look things up here instead of
branching on pipeline classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import DlxError

__all__ = ["Family", "FAMILIES", "family_of", "scale_changes_inputs", "guider_support"]

#: the call's defaults where a spec gives none (``StableDiffusionPipeline.__call__``'s); a sweep fills
#: in the pipeline's own where they differ (SDXL 5.0, SD3 7.0 and 28 steps): one place for both
CALL_DEFAULTS = {"guidance_scale": 7.5, "num_inference_steps": 50}


@dataclass(frozen=True)
class Family:
    """Facts about one family of pipelines, and what dlx can do with it.

    CFG layouts (``cfg``):
      * ``"batch"``: the pipeline doubles the batch, negative (unconditional) rows first, then
        positive: split with ``chunk(2)``, never ``[-1:]`` (which keeps one row and breaks batch > 1).
      * ``"calls"``: the pipeline calls the denoiser twice per step, ``cache_context("cond")`` then
        ``cache_context("uncond")`` (Flux true CFG, driven by locals, so no callback can cut it).

    Capabilities, checked when a block is attached or a call starts (never mid-run):
      * ``scale_schedules``: a part may set per-step or per-sample guidance scales.
      * ``share``: ``dlx.Share`` may evaluate equal samples once.
      * ``cfg_switch``: callback tensors (CFG-doubled) that must be halved with ``chunk(2)[1]``,
        together with guidance scale 0, to take the pipeline out of CFG for an unguided tail
        (diffusers' cutoff callbacks do the same); every one must be exposed to callbacks.
        ``cfg_switch_also``: more doubled tensors halved when the pipeline exposes them
        (inpainting masks, a ControlNet image). Empty ``cfg_switch``: never switched.
      * ``scale_only_combines``: the call's ``guidance_scale`` acts only in the CFG combination
        u + s·(c − u) (and in turning CFG on when > 1), so samples of one call may each have
        their own scale and equal a call at that scale (``dlx.sweep`` then runs rows of several
        scales in one call). False where it also changes the denoiser's inputs: Flux's
        distilled ``guidance`` embedding. Per pipeline, ``scale_changes_inputs`` also says so for
        a UNet with a guidance embedding (``time_cond_proj_dim``: LCM's ``w``) and for SD3's
        skip-layer guidance (its term is added to every sample once CFG is on).
        ``guidance_rescale > 0`` does not: ``rescale_noise_cfg`` takes a sample's combined and
        conditional predictions only, and the tap applies it per sample.
      * ``perturbation_guiders``: the ``diffusers.guiders`` that need an extra perturbed forward
        pass (``PERTURBATION_GUIDERS``) and that dlx runs on the family; ``guider_support`` says
        why one does not. The combination-rule guiders (``dlx.guiders.COMBINATION``: CFG, APG,
        APG-Mix, CFG-Zero*, TCFG, FDG, MAMBO-G) run on every family, through the tap.
    """

    name: str
    pipelines: tuple[str, ...]
    denoiser: str  # attribute of the pipeline: "unet" or "transformer"
    cfg: str  # "batch" or "calls"
    conditioning: tuple[str, ...]  # callback tensors that condition the denoiser (recorded)
    latent_format: str  # key of the preview factors in dlx.preview
    prediction: str = "scheduler"  # "flow" for flow matching, else read from the scheduler config
    packed: bool = False  # latents handed to callbacks as (B, seq, C·4) patches (Flux)
    extra_doubled_modules: tuple[str, ...] = ()  # other modules fed the doubled batch (ControlNet)
    timestep_scale: float = 1.0  # denoiser timestep argument × this = scheduler timestep
    scale_schedules: bool = True
    share: bool = True
    cfg_switch: tuple[str, ...] = ()
    cfg_switch_also: tuple[str, ...] = ()
    scale_only_combines: bool = True
    perturbation_guiders: tuple[str, ...] = ()  # run by the tap's third, perturbed pass


#: the perturbation guiders the tap runs on a UNet (layers named by ``fqn``, e.g.
#: ``mid_block.attentions.0.transformer_blocks``: diffusers' ``"auto"`` finds transformers' blocks only)
_UNET_PERTURBATION = ("PerturbedAttentionGuidance", "SkipLayerGuidance", "SmoothedEnergyGuidance", "AutoGuidance")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            name="sd",
            pipelines=(
                "StableDiffusionPipeline",
                "StableDiffusionImg2ImgPipeline",
                "StableDiffusionInpaintPipeline",
            ),
            denoiser="unet",
            cfg="batch",
            conditioning=("prompt_embeds",),
            latent_format="sd15",
            cfg_switch=("prompt_embeds",),
            cfg_switch_also=("mask", "masked_image_latents"),
            perturbation_guiders=_UNET_PERTURBATION,
        ),
        Family(
            name="sd-controlnet",
            pipelines=(
                "StableDiffusionControlNetPipeline",
                "StableDiffusionControlNetImg2ImgPipeline",
                "StableDiffusionControlNetInpaintPipeline",
            ),
            denoiser="unet",
            cfg="batch",
            conditioning=("prompt_embeds",),
            latent_format="sd15",
            extra_doubled_modules=("controlnet",),
            cfg_switch=("prompt_embeds", "image"),
            cfg_switch_also=("mask", "masked_image_latents"),
        ),
        Family(
            name="sdxl",
            pipelines=(
                "StableDiffusionXLPipeline",
                "StableDiffusionXLImg2ImgPipeline",
                "StableDiffusionXLInpaintPipeline",
            ),
            denoiser="unet",
            cfg="batch",
            conditioning=("prompt_embeds", "add_text_embeds", "add_time_ids"),
            latent_format="sdxl",
            cfg_switch=("prompt_embeds", "add_text_embeds", "add_time_ids"),
            cfg_switch_also=("mask", "masked_image_latents"),
            perturbation_guiders=_UNET_PERTURBATION,
        ),
        Family(
            name="sd3",
            pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
            denoiser="transformer",
            cfg="batch",
            conditioning=("prompt_embeds", "pooled_prompt_embeds"),
            latent_format="sd3",
            prediction="flow",
            cfg_switch=("prompt_embeds", "pooled_prompt_embeds"),  # SD3 img2img exposes no pooled: tap only
            perturbation_guiders=("SkipLayerGuidance", "SmoothedEnergyGuidance", "AutoGuidance"),
        ),
        Family(
            name="flux",
            pipelines=("FluxPipeline",),
            denoiser="transformer",
            cfg="calls",
            conditioning=("prompt_embeds",),
            latent_format="flux",
            prediction="flow",
            packed=True,
            timestep_scale=1000.0,  # Flux passes timestep / 1000 to its transformer
            scale_schedules=False,  # the pipeline applies true_cfg_scale itself, from a local
            scale_only_combines=False,  # guidance_scale is the distilled `guidance` embedding's input
            share=False,  # two calls per step: not supported
            perturbation_guiders=("SkipLayerGuidance", "AutoGuidance"),
        ),
    ]
}

_BY_CLASS = {cls: fam for fam in FAMILIES.values() for cls in fam.pipelines}


def family_of(pipe) -> Family:
    """The family of a pipeline instance (or class), matched on its class or any base class."""
    cls = pipe if isinstance(pipe, type) else type(pipe)
    for klass in cls.__mro__:
        fam = _BY_CLASS.get(klass.__name__)
        if fam is not None:
            return fam
    supported = ", ".join(f"{f.name} ({', '.join(f.pipelines)})" for f in FAMILIES.values())
    import inspect

    call = getattr(cls, "__call__", None)
    try:
        takes_callback = "callback_on_step_end" in inspect.signature(call).parameters
    except (TypeError, ValueError):
        takes_callback = False
    if not takes_callback or not hasattr(cls, "_callback_tensor_inputs"):
        raise DlxError(
            f"{cls.__name__} has no `callback_on_step_end`, so dlx cannot observe or steer its denoising "
            f"loop. Supported families: {supported}"
        )
    raise DlxError(f"pipeline class {cls.__name__} is not supported by dlx. Supported families: {supported}")


def scale_changes_inputs(pipe, call: dict) -> str | None:
    """Why the call's ``guidance_scale`` does more than weigh the CFG combination on this
    pipeline and call (so samples of one call cannot each have their own scale), or None."""
    fam = family_of(pipe)
    if not fam.scale_only_combines:
        return f"on {fam.name} pipelines guidance_scale also feeds the denoiser (a guidance embedding)"
    den = getattr(pipe, fam.denoiser, None)
    if getattr(getattr(den, "config", None), "time_cond_proj_dim", None) is not None:
        return ("the denoiser embeds guidance_scale (time_cond_proj_dim: an LCM-style w embedding) and the "
                "pipeline then runs without CFG")
    if call.get("skip_guidance_layers") is not None:
        return "skip-layer guidance adds its term to every sample whenever the call runs CFG"
    return None


#: diffusers.guiders that need an extra forward pass with modified attention or layers, and why
#: dlx does not run them on a family whose ``perturbation_guiders`` lacks them
PERTURBATION_GUIDERS = {
    "PerturbedAttentionGuidance": "a third, attention-perturbed pass per step (PAG, arXiv 2403.17377)",
    "SmoothedEnergyGuidance": "a third pass with blurred attention queries (SEG, arXiv 2408.00760)",
    "SkipLayerGuidance": "a third pass with transformer layers skipped (skip-layer guidance)",
    "AutoGuidance": "its unconditional pass through a weaker model (AutoGuidance, arXiv 2406.02507)",
}
#: why a perturbation guider does not run, per (family, guider) or per family
_WHY_NOT = {
    ("sd3", "PerturbedAttentionGuidance"): "diffusers 0.42.1's attention-score hooks do not know SD3's joint "
                                           "attention processor (JointAttnProcessor2_0 is not registered)",
    "sd-controlnet": "the ControlNet's residuals are computed for the rows of the CFG batch only, so the "
                     "perturbed pass would have none",
    ("flux", "PerturbedAttentionGuidance"): "diffusers 0.42.1's attention hooks fail on Flux's attention "
                                            "(FluxAttention has no is_cross_attention)",
    ("flux", "SmoothedEnergyGuidance"): "diffusers 0.42.1's attention hooks fail on Flux's attention "
                                        "(FluxAttention has no is_cross_attention)",
}
#: what works instead, per (family, guider)
_INSTEAD = {
    ("sd3", "PerturbedAttentionGuidance"): " SkipLayerGuidance, SmoothedEnergyGuidance and AutoGuidance run on SD3.",
    ("flux", "PerturbedAttentionGuidance"): " SkipLayerGuidance and AutoGuidance run on Flux.",
    ("flux", "SmoothedEnergyGuidance"): " SkipLayerGuidance and AutoGuidance run on Flux.",
    ("sd-controlnet", "PerturbedAttentionGuidance"): " diffusers' StableDiffusionControlNetPAGPipeline runs PAG itself.",
}


def guider_support(family: Family, name: str) -> str | None:
    """None when a ``dlx.Guider`` of the diffusers guider class ``name`` runs on ``family``, else
    why not (an error message naming the guider and the family)."""
    need = PERTURBATION_GUIDERS.get(name)
    if need is None or name in family.perturbation_guiders:
        return None
    why = _WHY_NOT.get((family.name, name)) or _WHY_NOT.get(name) or _WHY_NOT.get(family.name) or \
        "dlx's tap does not run its pass on this family"
    return (f"{name} is not supported on {family.name} pipelines: it needs {need}, and {why}."
            f"{_INSTEAD.get((family.name, name), '')}")


def check_tensor_inputs(pipe, names) -> list[str]:
    """Validate callback tensor names against what the pipeline exposes; return them as a list."""
    from ._diffusers import callback_tensor_inputs

    exposed = callback_tensor_inputs(pipe)
    missing = [n for n in names if n not in exposed]
    if missing:
        raise DlxError(
            f"{type(pipe).__name__} does not expose {missing} to callbacks; it exposes {exposed}"
        )
    return list(names)


# --- noise levels -------------------------------------------------------------------------------


def _vp_sigmas(scheduler) -> torch.Tensor | None:
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        return None
    ac = ac.double()
    return ((1 - ac) / ac).sqrt()


def sigmas_at(family: Family, scheduler, timesteps) -> list[float]:
    """Noise level σ of each scheduler timestep: VP σ = √((1−ᾱ)/ᾱ) (interpolated in log σ for
    fractional t, as the Karras-sigma schedulers do) or, for flow matching, σ = t / T."""
    ts = [float(t) for t in timesteps]
    if family.prediction == "flow":
        T = float(scheduler.config.num_train_timesteps)
        return [t / T for t in ts]
    sig = _vp_sigmas(scheduler)
    if sig is None:
        return [math.nan] * len(ts)
    log_sig = sig.log()
    n = sig.numel()
    spans = []
    for t in ts:
        lo = min(max(int(math.floor(t)), 0), n - 1)
        spans.append((lo, min(lo + 1, n - 1), t - lo))
    # the table entries needed, read in one gather each (indexing a tensor per timestep costs
    # microseconds each: milliseconds for a 50-step run)
    idx = sorted({i for lo, hi, _ in spans for i in (lo, hi)})
    sig_at = dict(zip(idx, sig[idx].tolist()))
    log_at = dict(zip(idx, log_sig[idx].tolist()))
    return [sig_at[lo] if w <= 0 or hi == lo else math.exp((1 - w) * log_at[lo] + w * log_at[hi])
            for lo, hi, w in spans]


def sigma_at(family: Family, scheduler, t) -> float:
    """Noise level σ of one scheduler timestep (see ``sigmas_at``)."""
    return sigmas_at(family, scheduler, [t])[0]


def prediction_type(family: Family, scheduler) -> str:
    if family.prediction == "flow":
        return "flow"
    return getattr(scheduler.config, "prediction_type", "epsilon")


def denoised_as(kind: str, x_in: torch.Tensor, pred: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0, the denoised estimate, from the denoiser's input ``x_in`` and its output ``pred``, for
    the scheduler's ``prediction_type`` ``kind`` (look it up once per run with ``prediction_type``).

    For ε- and v-prediction the denoiser input is in variance-preserving form
    (x = √ᾱ·x0 + √(1−ᾱ)·ε, also after Euler's ``scale_model_input``); for flow matching
    x = (1−σ)·x0 + σ·noise and x0 = x − σ·v. ``sigma`` is the step's noise level (``sigmas_at``).
    """
    # float32 arithmetic (x ≈ s·ε at high noise: half precision would cancel badly), in as few
    # kernels as possible: this runs on every recorded step
    x = x_in.float()
    p = pred.float()
    if x.ndim == p.ndim and x.shape[1] != p.shape[1]:
        x = x[:, : p.shape[1]]  # inpaint UNets also take mask and masked-image channels
    if kind == "flow":
        return torch.sub(x, p, alpha=sigma)
    a, s = _vp_coefficients(sigma)
    if kind == "epsilon":
        return torch.sub(x, p, alpha=s).div_(a)
    if kind == "v_prediction":
        return torch.sub(x * a, p, alpha=s)
    if kind == "sample":
        return p.clone() if p is pred else p  # never hand out the denoiser's own buffer
    raise DlxError(f"scheduler prediction_type {kind!r} is not supported for x0")


def _vp_coefficients(sigma: float) -> tuple[float, float]:
    """√ᾱ and √(1−ᾱ) of noise level σ (ᾱ = 1 / (1 + σ²): 0 at σ = ∞, zero terminal SNR)."""
    alpha_bar = 1.0 / (1.0 + sigma * sigma)
    return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)


#: prediction types ``denoised_steps`` computes (``"sample"`` needs no arithmetic)
BATCHED_X0 = ("epsilon", "v_prediction", "flow")


def denoised_steps(kind: str, x_in: torch.Tensor, pred: torch.Tensor, sigmas) -> torch.Tensor:
    """``denoised_as`` of many steps at once, in a few kernels instead of two or three per step.

    ``x_in`` and ``pred`` are stacked along a new leading step dimension, ``sigmas`` gives one σ
    per step. The result is bitwise that of ``denoised_as`` step by step (tests check it on CPU;
    checked on an H200 with PyTorch 2.11): per element the same float32 operations, rounded the
    same way. ``sub(x, p, alpha=s)`` is a fused multiply-add (x − s·p rounded once, on CPU and
    CUDA alike), reproduced by ``_fused_sub``; ``div_(a)`` is a true division by float32 a on CPU
    and, on CUDA, a multiplication by 1/a rounded to float32.
    """
    if kind not in BATCHED_X0:
        raise DlxError(f"denoised_steps does not handle prediction_type {kind!r}")
    x = x_in.float()
    p = pred.float()
    if x.ndim == p.ndim and x.shape[2] != p.shape[2]:
        x = x[:, :, : p.shape[2]]  # inpaint UNets also take mask and masked-image channels
    shape = (len(sigmas),) + (1,) * (p.ndim - 1)

    def column(vals):  # per-step float32 scalars, broadcast over the rest (as a scalar operand is)
        col = torch.tensor(vals, dtype=torch.float32).view(shape)
        if p.device.type == "cuda":  # page-locked and non-blocking: no wait for the run to finish
            return col.pin_memory().to(p.device, non_blocking=True)
        return col.to(p.device)

    if kind == "flow":
        return _fused_sub(x, p, column([float(s) for s in sigmas]))
    coef = [_vp_coefficients(float(s)) for s in sigmas]
    s = column([c[1] for c in coef])
    if kind == "v_prediction":
        return _fused_sub(x * column([c[0] for c in coef]), p, s)
    out = _fused_sub(x, p, s)
    if out.device.type == "cuda":
        return out.mul_(column([1.0 / c[0] if c[0] != 0 else math.inf for c in coef]))
    return out.div_(column([c[0] for c in coef]))


def _fused_sub(x: torch.Tensor, p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float32 x − s·p rounded once, as ``sub(x, p, alpha=s)`` (a fused multiply-add) does, for a
    tensor ``s``. On CPU ``addcmul`` is compiled into the same FMA (tests check it; one kernel);
    elsewhere, as on CUDA where it rounds s·p first, ``_fused_sub_exact``."""
    if x.device.type == "cpu":
        return torch.addcmul(x, p, s, value=-1)
    return _fused_sub_exact(x, p, s)


def _fused_sub_exact(x: torch.Tensor, p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x − s·p of float32 tensors, correctly rounded to float32 on any device.

    In float64 the product s·p is exact and the difference is rounded once more; TwoSum gives
    that rounding's exact error, and moving an even result one step towards the exact value
    (round to odd) makes the final rounding to float32 the correctly rounded one.
    """
    xd = x.double()
    sp = s.double() * p.double()  # exact: 24 + 24 significant bits
    d = xd - sp
    bb = d - xd
    err = (xd - (d - bb)) + (-sp - bb)  # TwoSum: d + err == x − s·p exactly
    bits = d.view(torch.int64)
    fix = (err != 0) & ((bits & 1) == 0) & torch.isfinite(d)
    step = torch.where((err > 0) == (d > 0), 1, -1)  # towards the exact value (bit order follows |d|)
    return torch.where(fix, bits + step, bits).view(torch.float64).float()
