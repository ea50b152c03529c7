"""Tests for dlx.testing: tiny offline pipelines, their example inputs and the IP-Adapter helper."""

import socket
import subprocess
import sys

import pytest
import torch

import dlx.testing as T
from dlx.errors import DlxError

FAMILIES = T.FAMILIES


@pytest.fixture(autouse=True, scope="module")
def no_network():
    """Fail any socket connection made while these tests run, and record the attempt."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"dlx tests are offline; connection to {address!r} refused")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        yield attempts


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run this module single-threaded, restoring the setting after.

    The tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's
    spinning worker threads made them 4-10x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_CACHE = {}


def cached(family):
    """One seed-0 pipeline per family, shared by tests that do not modify it."""
    if family not in _CACHE:
        _CACHE[family] = T.tiny_pipeline(family)
    return _CACHE[family]


def run(pipe, family, **kw):
    with torch.no_grad():
        return pipe(**T.example_inputs(family, **kw)).images


def weights(pipe):
    """All module weights of a pipeline, keyed by component and parameter name."""
    out = {}
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            for k, v in comp.state_dict().items():
                out[f"{name}.{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# construction and basic runs
# ---------------------------------------------------------------------------------------------


def test_families_listed():
    assert FAMILIES == ("sd", "sd-img2img", "sd-inpaint", "sdxl", "sdxl-img2img", "sd3", "sd-controlnet", "flux")


def test_import_is_light():
    code = "import sys, dlx.testing; bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


EXPECTED = {
    "sd": ("StableDiffusionPipeline", "UNet2DConditionModel", "DDIMScheduler"),
    "sd-img2img": ("StableDiffusionImg2ImgPipeline", "UNet2DConditionModel", "DDIMScheduler"),
    "sd-inpaint": ("StableDiffusionInpaintPipeline", "UNet2DConditionModel", "DDIMScheduler"),
    "sdxl": ("StableDiffusionXLPipeline", "UNet2DConditionModel", "EulerDiscreteScheduler"),
    "sdxl-img2img": ("StableDiffusionXLImg2ImgPipeline", "UNet2DConditionModel", "EulerDiscreteScheduler"),
    "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel", "FlowMatchEulerDiscreteScheduler"),
    "sd-controlnet": ("StableDiffusionControlNetPipeline", "UNet2DConditionModel", "DDIMScheduler"),
    "flux": ("FluxPipeline", "FluxTransformer2DModel", "FlowMatchEulerDiscreteScheduler"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_offline_and_runs(family, no_network):
    pipe = cached(family)
    cls, denoiser, sched = EXPECTED[family]
    assert type(pipe).__name__ == cls
    den = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    assert type(den).__name__ == denoiser
    assert type(pipe.scheduler).__name__ == sched
    assert pipe.tokenizer.model_max_length == 77
    assert getattr(pipe, "safety_checker", None) is None
    assert pipe._progress_bar_config == {"disable": True}
    out = run(pipe, family, steps=2)
    assert tuple(out.shape) == T.latent_shape(family, 1)
    assert torch.isfinite(out).all()
    assert out.std() > 0
    assert no_network == []


def test_family_specific_parts():
    assert cached("sd-inpaint").unet.config.in_channels == 9
    assert type(cached("sd-controlnet").controlnet).__name__ == "ControlNetModel"
    sd3 = cached("sd3")
    assert sd3.text_encoder_3 is None and sd3.tokenizer_3 is None
    flux = cached("flux")
    assert type(flux.text_encoder_2).__name__ == "T5EncoderModel"
    assert flux.transformer.config.guidance_embeds
    sdxl = cached("sdxl")
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_two_prompts_two_images_each(family):
    pipe = cached(family)
    out = run(pipe, family, steps=2, batch=2, num_images_per_prompt=2)
    assert tuple(out.shape) == T.latent_shape(family, 4)
    # Images of one prompt differ by noise; images of different prompts differ by prompt.
    assert not torch.equal(out[0], out[1])
    assert not torch.equal(out[0], out[2])


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_means_denoising_steps(family):
    calls = []

    def count(pipe, i, t, kwargs):
        calls.append(int(i))
        return kwargs

    run(cached(family), family, steps=3, callback_on_step_end=count)
    assert calls == [0, 1, 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_is_classifier_free(family):
    """guidance_scale 1 (no CFG) and 5 must give different results: CFG really runs."""
    pipe = cached(family)
    assert not torch.equal(run(pipe, family, steps=2, guidance_scale=1.0), run(pipe, family, steps=2))


def test_flux_inputs_run_true_cfg():
    kw = T.example_inputs("flux", guidance_scale=4.0, batch=2)
    assert kw["true_cfg_scale"] == 4.0
    assert kw["negative_prompt"] == ["blurry", "blurry"]
    assert "negative_prompt" not in T.example_inputs("flux", guidance_scale=1.0)
    pipe = cached("flux")
    base = run(pipe, "flux", steps=2)
    other = run(pipe, "flux", steps=2, negative_prompt="a dog")
    assert not torch.equal(base, other)


def test_negative_prompt_matters_sd():
    pipe = cached("sd")
    assert not torch.equal(run(pipe, "sd", steps=2), run(pipe, "sd", steps=2, negative_prompt="a blue square"))


@pytest.mark.parametrize("family", ["sd-img2img", "sdxl-img2img", "sd-inpaint", "sd-controlnet"])
def test_input_images_matter(family):
    pipe = cached(family)
    a = run(pipe, family, steps=2)
    other = T.example_inputs(family, seed=1)
    b = run(pipe, family, steps=2, image=other["image"])
    assert not torch.equal(a, b)


def test_inpaint_mask_matters():
    pipe = cached("sd-inpaint")
    a = run(pipe, "sd-inpaint", steps=2)
    b = run(pipe, "sd-inpaint", steps=2, mask_image=T.example_inputs("sd-inpaint", seed=3)["mask_image"])
    assert not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights_and_outputs(family):
    a, b = cached(family), T.tiny_pipeline(family, seed=0)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 0
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert torch.equal(run(a, family, steps=2), run(b, family, steps=2))


@pytest.mark.parametrize("family", FAMILIES)
def test_different_seed_different_weights(family):
    a, b = cached(family), T.tiny_pipeline(family, seed=1)
    for name, comp in a.components.items():
        if isinstance(comp, torch.nn.Module):
            other = getattr(b, name)
            # Every component is re-seeded, so each one must differ, not just the first built.
            assert any(
                not torch.equal(p, q) for p, q in zip(comp.parameters(), other.parameters())
            ), f"{family}: {name} identical across seeds"


def test_components_have_independent_weights():
    pipe = cached("sdxl")
    emb1 = pipe.text_encoder.get_input_embeddings().weight
    emb2 = pipe.text_encoder_2.get_input_embeddings().weight
    assert not torch.equal(emb1, emb2)


def test_adding_a_component_does_not_shift_others():
    # Same seed and config: the UNet of sd-controlnet (built alongside a ControlNet) and of
    # sd-img2img must equal sd's, since each component is seeded from its own name.
    base = cached("sd").unet.state_dict()
    for family in ("sd-controlnet", "sd-img2img"):
        other = cached(family).unet.state_dict()
        assert all(torch.equal(base[k], other[k]) for k in base)


@pytest.mark.parametrize("family", ["sd-img2img", "sdxl-img2img"])
@pytest.mark.parametrize("steps", [1, 5])
def test_img2img_step_counts(family, steps):
    calls = []
    run(cached(family), family, steps=steps, callback_on_step_end=lambda p, i, t, kw: calls.append(i) or kw)
    assert len(calls) == steps


def test_global_rng_untouched():
    state = torch.get_rng_state()
    T.tiny_pipeline("sd", seed=5)
    assert torch.equal(state, torch.get_rng_state())


def test_output_seed_changes_output():
    pipe = cached("sd")
    assert not torch.equal(run(pipe, "sd", steps=1, seed=0), run(pipe, "sd", steps=1, seed=1))


# ---------------------------------------------------------------------------------------------
# example_inputs
# ---------------------------------------------------------------------------------------------


def test_example_inputs_contents():
    kw = T.example_inputs("sd", steps=3, seed=7, batch=3, num_images_per_prompt=2)
    assert kw["prompt"][0] == "a red circle" and len(set(kw["prompt"])) == 3
    assert kw["num_inference_steps"] == 3 and kw["num_images_per_prompt"] == 2
    assert kw["height"] == kw["width"] == 32 and kw["output_type"] == "latent"
    assert isinstance(kw["generator"], torch.Generator)
    assert kw["generator"].initial_seed() == 7
    # A fresh generator per call, so reusing inputs does not continue a consumed one.
    assert T.example_inputs("sd")["generator"] is not T.example_inputs("sd")["generator"]
    assert T.example_inputs("sd", prompt="x")["prompt"] == "x"
    assert T.example_inputs("sd", num_inference_steps=9)["num_inference_steps"] == 9
    assert "max_sequence_length" in T.example_inputs("sd3")


def test_example_images_are_seeded():
    import numpy as np

    a, b, c = (T.example_inputs("sd-inpaint", seed=s) for s in (0, 0, 1))
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))
    assert a["image"].size == (32, 32) and a["mask_image"].mode == "L"


def test_many_prompts_stay_distinct():
    prompts = T.example_inputs("sd", batch=20)["prompt"]
    assert len(set(prompts)) == 20


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------


def test_clip_tokenizer_is_real_bpe():
    tok = cached("sd").tokenizer
    ids = tok("a red circle").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a red circle"
    # Unknown words split into byte symbols rather than failing.
    assert len(tok("zxq").input_ids) == 5
    assert max(tok("Ünïcödé ✓").input_ids) < cached("sd").text_encoder.config.vocab_size


def test_t5_tokenizer():
    tok = cached("flux").tokenizer_2
    ids = tok("a red circle").input_ids
    assert ids[-1] == tok.eos_token_id == 1
    assert tok.convert_ids_to_tokens(ids[:3]) == ["\u2581a", "\u2581red", "\u2581circle"]


# ---------------------------------------------------------------------------------------------
# schedulers, dtype and errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,name,cls",
    [
        ("sd", "ddim", "DDIMScheduler"),
        ("sd", "euler", "EulerDiscreteScheduler"),
        ("sdxl", "dpm++", "DPMSolverMultistepScheduler"),
        ("flux", "flow-euler", "FlowMatchEulerDiscreteScheduler"),
    ],
)
def test_scheduler_by_name(family, name, cls):
    pipe = T.tiny_pipeline(family, scheduler=name)
    assert type(pipe.scheduler).__name__ == cls
    if name == "dpm++":
        assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    if family != "flux":
        # Built from the SD training schedule, not the class defaults.
        assert pipe.scheduler.config.beta_schedule == "scaled_linear"
        if name == "ddim":
            assert pipe.scheduler.config.clip_sample is False
    assert tuple(run(pipe, family, steps=2).shape) == T.latent_shape(family)


def test_scheduler_instance_is_used():
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(cached("sd").scheduler.config)
    assert T.tiny_pipeline("sd", scheduler=sched).scheduler is sched


def test_dtype():
    pipe = T.tiny_pipeline("sd", dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert run(pipe, "sd", steps=1).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["bfloat16", "torch.bfloat16"])
def test_dtype_by_name(name):
    pipe = T.tiny_pipeline("sd", dtype=name)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", ["float99", "int8", torch.int64, 16])
def test_bad_dtype_is_refused_before_building(bad, monkeypatch):
    monkeypatch.setattr(T, "_build", lambda *a: pytest.fail("built a pipeline for a bad dtype"))
    with pytest.raises(DlxError, match=r"argument `dtype`"):
        T.tiny_pipeline("sd", dtype=bad)


@pytest.mark.parametrize("bad", ["sd4", "SD", ""])
def test_bad_family(bad):
    for call in (lambda: T.tiny_pipeline(bad), lambda: T.example_inputs(bad), lambda: T.latent_shape(bad)):
        with pytest.raises(DlxError) as e:
            call()
        msg = str(e.value)
        assert "family" in msg and repr(bad) in msg and "sd-controlnet" in msg
        assert isinstance(e.value, ValueError)


def test_bad_scheduler_name():
    with pytest.raises(DlxError) as e:
        T.tiny_pipeline("sd", scheduler="pndm")
    msg = str(e.value)
    assert "scheduler" in msg and "'pndm'" in msg and "dpm++" in msg and "flow-euler" in msg


@pytest.mark.parametrize("family,name", [("sd", "flow-euler"), ("sd3", "ddim"), ("flux", "dpm++")])
def test_scheduler_unfit_for_family(family, name):
    with pytest.raises(DlxError) as e:
        T.tiny_pipeline(family, scheduler=name)
    assert repr(name) in str(e.value) and family in str(e.value)


# ---------------------------------------------------------------------------------------------
# IP-Adapter
# ---------------------------------------------------------------------------------------------


def test_ip_adapter_changes_output():
    plain = run(cached("sd"), "sd", steps=2)
    pipe = T.add_tiny_ip_adapter(T.tiny_pipeline("sd"), seed=0)
    assert type(pipe.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert type(pipe.feature_extractor).__name__.startswith("CLIPImageProcessor")
    kw = T.example_inputs("sd", ip_adapter_image=True)
    assert kw["ip_adapter_image"].size == (32, 32)

    pipe.set_ip_adapter_scale(0.0)
    off = run(pipe, "sd", steps=2, ip_adapter_image=True)
    pipe.set_ip_adapter_scale(1.0)
    on = run(pipe, "sd", steps=2, ip_adapter_image=True)
    # Scale 0 reproduces the plain pipeline; scale 1 injects the image tokens.
    torch.testing.assert_close(off, plain, atol=1e-5, rtol=0)
    assert (on - off).abs().max() > 1e-3


def test_ip_adapter_is_seeded():
    a = T.add_tiny_ip_adapter(T.tiny_pipeline("sd"), seed=0)
    b = T.add_tiny_ip_adapter(T.tiny_pipeline("sd"), seed=0)
    c = T.add_tiny_ip_adapter(T.tiny_pipeline("sd"), seed=1)
    wa, wb, wc = weights(a), weights(b), weights(c)
    ip_keys = [k for k in wa if "to_k_ip" in k or "encoder_hid_proj" in k or k.startswith("image_encoder.")]
    assert ip_keys and all(torch.equal(wa[k], wb[k]) for k in ip_keys)
    assert any(not torch.equal(wa[k], wc[k]) for k in ip_keys)


def test_ip_adapter_rejects_transformer_pipelines():
    with pytest.raises(DlxError) as e:
        T.add_tiny_ip_adapter(cached("flux"))
    assert "FluxPipeline" in str(e.value)
