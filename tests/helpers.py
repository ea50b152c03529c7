"""Shared test helpers: build tiny pipelines once per session and run them deterministically."""

from __future__ import annotations

import functools

import torch

from dlx.testing import example_inputs, tiny_pipeline


@functools.lru_cache(maxsize=None)
def pipe_for(family: str, scheduler: str | None = None):
    return tiny_pipeline(family, seed=0, scheduler=scheduler)


def run(pipe, family: str, steps: int = 4, **kw):
    """Run ``pipe`` with the family's example inputs (any keyword overrides them); return latents."""
    return pipe(**example_inputs(family, steps=steps, **kw)).images


def pipeline_state(pipe) -> dict:
    """Everything dlx may touch, to check it is left exactly as found."""
    from dlx.families import family_of

    fam = family_of(pipe)
    den = getattr(pipe, fam.denoiser)
    state = {
        "class": type(pipe),
        "den_dict": {k: den.__dict__.get(k) for k in ("forward", "cache_context")},
        "den_hooks": (len(den._forward_hooks), len(den._forward_pre_hooks)),
        "guidance": pipe.__dict__.get("_guidance_scale"),
        "interrupt": pipe.__dict__.get("_interrupt"),
        "ip": [list(p.scale) for p in den.attn_processors.values() if isinstance(getattr(p, "scale", None), list)],
        # what diffusers' hook helpers set on a module (perturbation guiders): the same objects
        "modules": [(n, m.__dict__.get("forward"), m.__dict__.get("_diffusers_hook"))
                    for n, m in den.named_modules() if n],
    }
    for side in fam.extra_doubled_modules:
        mod = getattr(pipe, side, None)
        if mod is not None:
            state[f"{side}_forward"] = mod.__dict__.get("forward")
    return state


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
