"""Each diffusers internal dlx touches (all named in dlx/_diffusers.py) checked against the
installed diffusers: when a release moves one, the failure names it."""

import importlib
import inspect

import pytest
import torch

from dlx import _diffusers as D
from dlx.families import FAMILIES

from .helpers import pipe_for


def _cls(name):
    return getattr(importlib.import_module("diffusers"), name)


ALL_PIPELINES = sorted({c for f in FAMILIES.values() for c in f.pipelines})


@pytest.mark.parametrize("name", ALL_PIPELINES)
def test_pipeline_properties_read_the_attributes_dlx_sets(name):
    cls = _cls(name)
    for prop, attr in (("guidance_scale", D.GUIDANCE_SCALE), ("interrupt", D.INTERRUPT)):
        src = inspect.getsource(getattr(cls, prop).fget)
        assert f"self.{attr}" in src, f"{name}.{prop} no longer reads `{attr}` (dlx._diffusers)"
    assert isinstance(getattr(cls, D.CALLBACK_TENSOR_INPUTS, None), list), \
        f"{name} has no `{D.CALLBACK_TENSOR_INPUTS}` list (dlx._diffusers)"


@pytest.mark.parametrize("name", ALL_PIPELINES)
def test_the_tensors_that_leave_cfg_are_exposed_and_popped_back(name):
    fam = next(f for f in FAMILIES.values() if name in f.pipelines)
    cls = _cls(name)
    exposed = getattr(cls, D.CALLBACK_TENSOR_INPUTS)
    src = inspect.getsource(cls.__call__)
    switches = bool(fam.cfg_switch) and all(n in exposed for n in fam.cfg_switch)
    # Only these classes leave CFG for an unguided tail; the others keep the tap on every step
    # (SD3 img2img exposes no pooled embeddings, ControlNet img2img/inpaint call theirs control_image).
    assert switches == (name not in ("StableDiffusion3Img2ImgPipeline", "FluxPipeline",
                                     "StableDiffusionControlNetImg2ImgPipeline",
                                     "StableDiffusionControlNetInpaintPipeline")), name
    if switches:
        for n in fam.cfg_switch + fam.cfg_switch_also:
            if n in exposed:
                assert f'callback_outputs.pop("{n}"' in src, f"{name} no longer pops `{n}` back from its callback"


def test_flux_cache_context_names_and_true_cfg():
    src = inspect.getsource(_cls("FluxPipeline").__call__)
    cond, uncond = D.cache_context_names()
    assert f'cache_context("{cond}")' in src and f'cache_context("{uncond}")' in src, \
        "FluxPipeline no longer calls its transformer inside cache_context('cond'/'uncond')"
    assert hasattr(pipe_for("flux").transformer, D.CACHE_CONTEXT)


def test_sd3_skip_layer_guidance_scale_attribute():
    src = inspect.getsource(_cls("StableDiffusion3Pipeline").__call__)
    assert f"self.{D.SKIP_LAYER_SCALE}" in src, f"StableDiffusion3Pipeline no longer sets `{D.SKIP_LAYER_SCALE}`"
    assert "skip_layers=skip_guidance_layers" in src


def test_rescale_noise_cfg_is_where_dlx_imports_it():
    g = torch.randn(2, 4, 8, 8)
    c = torch.randn(2, 4, 8, 8)
    out = D.rescale_noise_cfg(g, c, 0.7)
    assert out.shape == g.shape and not torch.equal(out, g)


def test_ip_adapter_and_scheduler_attributes():
    unet = pipe_for("sd").unet
    assert hasattr(unet, "encoder_hid_proj"), "UNet2DConditionModel has no `encoder_hid_proj`"
    assert D.ip_adapter_processors(unet) == []
    from dlx.testing import add_tiny_ip_adapter, tiny_pipeline

    ip = add_tiny_ip_adapter(tiny_pipeline("sd", seed=0), seed=0)
    assert D.ip_adapter_processors(ip.unet), "no attention processor with an IP-Adapter `scale` list"
    from diffusers import DDIMScheduler, HeunDiscreteScheduler

    assert D.scheduler_order(HeunDiscreteScheduler()) == 2 and D.scheduler_order(DDIMScheduler()) == 1


def test_stochastic_schedulers_are_recognised():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    assert D.is_stochastic(EulerAncestralDiscreteScheduler(), {})
    assert D.is_stochastic(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), {})
    assert D.is_stochastic(DDIMScheduler(), {"eta": 0.3}) and not D.is_stochastic(DDIMScheduler(), {"eta": 0.0})
    assert not D.is_stochastic(DPMSolverMultistepScheduler(), {})


def test_the_forward_is_replaced_and_restored_exactly():
    unet = pipe_for("sd").unet
    saved = []
    D.replace_forward(unet, "forward", lambda *a, **k: None, saved)
    assert "forward" in unet.__dict__
    D.restore_attribute(*saved.pop())
    assert "forward" not in unet.__dict__


def test_cfg_on_reads_the_pipelines_own_flag():
    # dlx reads do_classifier_free_guidance through D.cfg_on only: it must follow the pipeline's
    # scale (diffusers: guidance_scale > 1) as a callback changes it
    pipe = pipe_for("sd")
    D.set_guidance_scale(pipe, 5.0)
    assert D.cfg_on(pipe) is True
    D.set_guidance_scale(pipe, 1.0)
    assert D.cfg_on(pipe) is False


def test_compiled_denoisers_are_recognised_without_compiling():
    import torch

    pipe = pipe_for("sd")
    assert not D.is_compiled(pipe.unet)
    assert D.is_compiled(torch.compile(pipe.unet))  # a wrapper only: nothing is compiled until called


def test_pad_batch_pads_to_buckets_and_restores_the_forward():
    import torch

    pipe = pipe_for("sd")
    den = pipe.unet
    before = den.__dict__.get("forward")
    log = D.ShapeLog()
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor(10)
    e = torch.randn(3, 77, den.config.cross_attention_dim)
    plain = den(x, t, encoder_hidden_states=e).sample
    with D.pad_batch(den, log):
        padded = den(x, t, encoder_hidden_states=e).sample
    assert log.sizes == {3} and padded.shape == plain.shape
    x5, e5 = torch.randn(5, 4, 8, 8), torch.randn(5, 77, den.config.cross_attention_dim)
    with D.pad_batch(den, log):
        out5 = den(x5, t, encoder_hidden_states=e5).sample
    assert log.sizes == {3, 6} and out5.shape[0] == 5
    assert (out5 - den(x5, t, encoder_hidden_states=e5).sample).abs().max() < 1e-4
    assert den.__dict__.get("forward") is before
