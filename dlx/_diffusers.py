"""Every place dlx touches diffusers' internals, gathered in one module.

dlx reads and sets a few attributes diffusers does not document as public. Each one is named
here once, and ``tests/test_diffusers_internals.py`` checks each against the installed
diffusers, failing with the attribute's name when a release moves it. Nothing else in dlx
spells these names.

Why the denoiser's ``forward`` is replaced by an instance attribute rather than through
diffusers' own model-hook registry (``diffusers.hooks.HookRegistry``): the registry also wraps
``forward`` by setting an instance attribute, so it is no sturdier; its ``remove_hook`` leaves
that attribute (and the ``_diffusers_hook`` registry) on the module, so the pipeline would not be
left exactly as found; and Flux's two calls per step are told apart by ``cache_context`` names,
which no registry hook sees. dlx saves what the module's ``__dict__`` held and puts it back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

__all__ = [
    "GUIDANCE_SCALE", "INTERRUPT", "SKIP_LAYER_SCALE", "callback_tensor_inputs", "swap_class",
    "set_guidance_scale", "set_interrupt", "saved_flags", "restore_flags", "cache_context_names",
    "rescale_noise_cfg", "ip_adapter_processors", "is_stochastic", "scheduler_order",
    "replace_forward", "restore_attribute", "skip_layer_scale", "MISSING", "cfg_on", "is_compiled", "flux_true_cfg",
    "pad_batch", "modules_restored",
]

#: the pipeline's guidance scale behind ``pipe.guidance_scale`` (diffusers' cutoff callbacks set it)
GUIDANCE_SCALE = "_guidance_scale"
#: the flag behind ``pipe.interrupt``: every later step is skipped, the partial latents decoded
INTERRUPT = "_interrupt"
#: SD3's skip-layer guidance scale behind the call's ``skip_layer_guidance_scale``
SKIP_LAYER_SCALE = "_skip_layer_guidance_scale"
#: the callback tensor names a pipeline class exposes to ``callback_on_step_end``
CALLBACK_TENSOR_INPUTS = "_callback_tensor_inputs"
#: Flux true CFG: the denoiser's two calls per step run inside ``cache_context(name)``
CACHE_CONTEXT = "cache_context"
COND_CONTEXT, UNCOND_CONTEXT = "cond", "uncond"

MISSING = object()


def callback_tensor_inputs(pipe) -> list[str]:
    return list(getattr(pipe, CALLBACK_TENSOR_INPUTS, []))


def swap_class(pipe, cls) -> None:
    """Give the pipeline instance another class (``attach``'s wrapper of ``__call__``)."""
    object.__setattr__(pipe, "__class__", cls)


def saved_flags(pipe) -> dict:
    """The pipeline's own values of the attributes a run may set (absent ones as ``MISSING``)."""
    return {k: pipe.__dict__.get(k, MISSING) for k in (GUIDANCE_SCALE, INTERRUPT)}


def restore_flags(pipe, saved: dict) -> None:
    """Put back exactly what ``saved_flags`` saw (removing what was absent)."""
    for k, v in saved.items():
        if v is MISSING:
            pipe.__dict__.pop(k, None)
        else:
            pipe.__dict__[k] = v


def cfg_on(pipe) -> bool:
    """Whether the pipeline runs classifier-free guidance now (re-read each step: a callback may
    end it mid-run, as diffusers' cutoff callbacks do)."""
    return bool(getattr(pipe, "do_classifier_free_guidance", False))


def flux_true_cfg(call: dict) -> bool:
    """Whether a Flux call runs true CFG (a second, negative call per step): diffusers' own
    ``do_true_cfg``, read from the call's arguments (it is a local of ``__call__``)."""
    scale = call.get("true_cfg_scale", 1.0)
    neg = call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None
    return isinstance(scale, (int, float)) and scale > 1 and neg


def is_compiled(module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper (``OptimizedModule``)."""
    return type(module).__name__ == "OptimizedModule"


def set_guidance_scale(pipe, value: float) -> None:
    setattr(pipe, GUIDANCE_SCALE, value)


def set_interrupt(pipe, value: bool = True) -> None:
    setattr(pipe, INTERRUPT, value)


def skip_layer_scale(pipe) -> float:
    return float(getattr(pipe, SKIP_LAYER_SCALE))


def replace_forward(module, name: str, value, saved: list) -> None:
    """Set ``module.<name>`` as an instance attribute, remembering what ``__dict__`` held."""
    saved.append((module, name, module.__dict__.get(name, MISSING)))
    object.__setattr__(module, name, value)


def restore_attribute(module, name: str, prev) -> None:
    if prev is MISSING:
        module.__dict__.pop(name, None)
    else:
        object.__setattr__(module, name, prev)


#: the registry diffusers' model hooks (``diffusers.hooks.HookRegistry``) leave on a hooked module
HOOK_REGISTRY = "_diffusers_hook"


@contextlib.contextmanager
def modules_restored(modules, hook_names=()):
    """Every module in ``modules`` left as found after diffusers' hook helpers ran on it (the
    perturbation guiders' layer-skip and smoothed-energy hooks): a hooked module gets ``forward``
    and a ``_diffusers_hook`` registry as instance attributes, which ``remove_hook`` leaves
    behind. Registries that existed before (a user's own hooks) lose only ``hook_names``; every
    other module gets back exactly what its ``__dict__`` held."""
    saved = [(m, m.__dict__.get("forward", MISSING), m.__dict__.get(HOOK_REGISTRY, MISSING)) for m in modules]
    try:
        yield
    finally:
        for m, fwd, reg in saved:
            d = m.__dict__
            if reg is not MISSING:
                for name in hook_names:
                    if name in reg.hooks:
                        reg.remove_hook(name, recurse=False)
            if d.get("forward", MISSING) is not fwd:
                restore_attribute(m, "forward", fwd)
            if d.get(HOOK_REGISTRY, MISSING) is not reg:
                restore_attribute(m, HOOK_REGISTRY, reg)
            if reg is not MISSING and hasattr(reg, "_child_registries_cache"):
                reg._child_registries_cache = None  # its cached list of child registries is stale


def cache_context_names():
    """(cond, uncond) names of Flux's ``cache_context`` blocks."""
    return COND_CONTEXT, UNCOND_CONTEXT


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """diffusers' ``rescale_noise_cfg`` (arXiv 2305.08891), the function the pipelines call."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as f

    return f(noise_cfg, noise_pred_text, guidance_rescale=guidance_rescale)


def ip_adapter_processors(den) -> list:
    """Attention processors carrying an IP-Adapter ``scale`` list (empty without an adapter).

    Walking ``attn_processors`` visits every module (milliseconds on an SD1.5 UNet), so it is
    skipped when the denoiser has no image projection (``encoder_hid_proj``), i.e. no adapter.
    """
    if den is None or getattr(den, "encoder_hid_proj", True) is None or not hasattr(den, "attn_processors"):
        return []
    return [p for p in den.attn_processors.values() if isinstance(getattr(p, "scale", None), list)]


def scheduler_order(scheduler) -> int:
    """Denoiser evaluations per step (2 for Heun and KDPM2: their loop runs 2N − 1 iterations)."""
    return int(getattr(scheduler, "order", 1) or 1)


_STOCHASTIC_WORDS = ("Ancestral", "SDE", "DDPM", "LCM", "TCD", "Consistency")


def is_stochastic(scheduler, call: dict) -> bool:
    """Whether ``scheduler.step`` draws fresh noise (then equal inputs do not stay equal)."""
    name = type(scheduler).__name__
    if any(w in name for w in _STOCHASTIC_WORDS):
        return True
    algo = str(getattr(scheduler.config, "algorithm_type", "") or "")
    if algo.startswith("sde"):
        return True
    eta = call.get("eta")
    return "DDIM" in name and isinstance(eta, (int, float)) and eta > 0


# -- batch padding for compiled denoisers (CUDA graphs: one graph per batch shape) ---------------
def buckets(n: int) -> int:
    """The padded size of a denoiser batch of n: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ..."""
    b = 1
    while True:
        for c in (b, b + b // 2) if b >= 2 else (b,):
            if c >= n:
                return c
        b *= 2


@dataclass
class ShapeLog:
    """The padded batch sizes a denoiser saw (one CUDA graph each)."""

    sizes: set = field(default_factory=set)


def map_batch(obj, n: int, fn):
    """``fn(t)`` for every tensor in ``obj`` (nested in lists, tuples, dicts) whose leading dim is
    ``n``: the one walker over a denoiser call's arguments (the tap's row selection, padding)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.ndim > 0 and obj.shape[0] == n else obj
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(map_batch(o, n, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_batch(v, n, fn) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def pad_batch(den, log: ShapeLog | None = None, enabled: bool = True):
    """Pad every call of the denoiser ``den`` up to ``buckets(n)`` (repeating its last row), so a
    compiled denoiser with CUDA graphs sees few shapes; the extra outputs are dropped. ``log``
    collects the padded sizes seen (one CUDA graph each). Restores the denoiser on exit."""
    if not enabled:
        yield log
        return
    saved: list = []
    inner = den.forward
    log = log if log is not None else ShapeLog()

    def forward(*args, **kwargs):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("sample", kwargs.get("hidden_states"))
        n = x.shape[0]
        m = buckets(n)
        log.sizes.add(m)
        if m == n:
            return inner(*args, **kwargs)
        grow = lambda t: torch.cat([t, t[-1:].expand(m - n, *t.shape[1:])])  # noqa: E731
        out = inner(*map_batch(list(args), n, grow), **map_batch(kwargs, n, grow))
        if isinstance(out, tuple):
            return (out[0][:n].clone(), *out[1:])
        if isinstance(out, torch.Tensor):
            return out[:n].clone()
        out.sample = out.sample[:n].clone()
        return out

    replace_forward(den, "forward", forward, saved)
    try:
        yield log
    finally:
        restore_attribute(*saved.pop())
