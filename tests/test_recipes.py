"""The diffusers callbacks guide's recipes against dlx: every comparison notebook 05 shows.

The guide's snippets are copied verbatim below (only the pipeline is a tiny offline one), then
each claim of the notebook is asserted: bitwise equality at batch 1, the steps really guided
(counted by a hook on the UNet's first layer, outside dlx), the official callbacks' failure at
batch 2, the state each leaves on the pipeline, and the per-step previews.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.callbacks import IPAdapterScaleCutoffCallback, SDCFGCutoffCallback, SDXLCFGCutoffCallback
from PIL import Image

import dlx
from dlx.testing import add_tiny_ip_adapter, example_inputs, tiny_pipeline

from .helpers import bitwise


class UNetRows:
    """Rows the UNet evaluates per call, from a pre-hook on ``conv_in`` (removed by ``close``)."""

    def __init__(self, pipe):
        self.rows: list[int] = []
        self._hook = pipe.unet.conv_in.register_forward_pre_hook(lambda m, args: self.rows.append(args[0].shape[0]))

    def close(self):
        self._hook.remove()


def _run(pipe, *parts, **call):
    """(final latents, rows per UNet call) of one call, with ``parts`` attached if any (without
    parts no dlx session is opened, so what the guide's callbacks leave on the pipeline stays)."""
    seen = UNetRows(pipe)
    try:
        if parts:
            with dlx.attach(pipe, *parts):
                out = pipe(**call, output_type="latent").images
        else:
            out = pipe(**call, output_type="latent").images
    finally:
        seen.close()
    return out, seen.rows


def _guided(rows, batch=1):
    """(number of guided steps, last guided step): a UNet call with 2 x batch rows ran CFG."""
    steps = [i for i, r in enumerate(rows) if r == 2 * batch]
    return len(steps), (steps[-1] if steps else None)


@functools.lru_cache(maxsize=None)
def _sdxl_dpm():
    pipe = tiny_pipeline("sdxl")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    return pipe


# --- 1. official cutoff callbacks ------------------------------------------------------------

GUIDE_CALL = dict(prompt="a sports car at the road, best quality, high quality, high detail, 8k resolution",
                  negative_prompt="", guidance_scale=6.5, num_inference_steps=25)


def _gen(seed=2628670641):
    return torch.Generator(device="cpu").manual_seed(seed)


@pytest.mark.parametrize("family, official", [("sdxl", SDXLCFGCutoffCallback), ("sd", SDCFGCutoffCallback)])
def test_official_cutoff_equals_compat_diffusers_bitwise_and_guides_11_of_25_steps(family, official):
    pipe = _sdxl_dpm() if family == "sdxl" else tiny_pipeline("sd")
    ref, ref_rows = _run(pipe, generator=_gen(), callback_on_step_end=official(cutoff_step_ratio=0.4), **GUIDE_CALL)
    with dlx.record(pipe, dlx.CFGCutoff(0.4, compat="diffusers")) as trace:
        ours, our_rows = _run(pipe, generator=_gen(), **GUIDE_CALL)
    assert bitwise(ref, ours)
    assert _guided(ref_rows) == _guided(our_rows) == (11, 10)
    assert trace.last_guided_step == 10 and trace.nfe == [25.0 + 11]
    # dlx's default semantics: exactly round(0.4 * 25) = 10 guided steps
    with dlx.record(pipe, dlx.CFGCutoff(0.4)) as default:
        _, rows = _run(pipe, generator=_gen(), **GUIDE_CALL)
    assert _guided(rows) == (10, 9) and default.last_guided_step == 9 and default.nfe == [35.0]


@pytest.mark.parametrize("family, official", [("sdxl", SDXLCFGCutoffCallback), ("sd", SDCFGCutoffCallback)])
def test_official_cutoff_raises_at_batch_two_and_dlx_equals_each_image_alone(family, official):
    pipe = _sdxl_dpm() if family == "sdxl" else tiny_pipeline("sd")
    with pytest.raises(RuntimeError, match="must match the size of tensor"):
        pipe(**GUIDE_CALL, num_images_per_prompt=2, generator=_gen(), output_type="latent",
             callback_on_step_end=official(cutoff_step_ratio=0.4))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    cut = dlx.CFGCutoff(0.4, compat="diffusers")
    pair, rows = _run(pipe, cut, num_images_per_prompt=2, generator=gens(), **GUIDE_CALL)
    assert _guided(rows, batch=2) == (11, 10)
    for j, g in enumerate(gens()):
        alone, _ = _run(pipe, cut, generator=g, **GUIDE_CALL)
        # a batch of 2 runs float32 kernels at another size; stated tolerance as in test_guidance
        assert torch.allclose(pair[j : j + 1], alone, rtol=1e-5, atol=1e-4)


# --- 2. the guide's dynamic CFG callback -----------------------------------------------------


def _dynamic_cfg_for(pipeline):
    """The guide's callback_dynamic_cfg verbatim; it reads the enclosing ``pipeline`` as the guide's
    reads a global."""

    def callback_dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
        # adjust the batch_size of prompt_embeds according to guidance_scale
        if step_index == int(pipeline.num_timesteps * 0.4):
            prompt_embeds = callback_kwargs["prompt_embeds"]
            prompt_embeds = prompt_embeds.chunk(2)[-1]

            # update guidance_scale and prompt_embeds
            pipeline._guidance_scale = 0.0
            callback_kwargs["prompt_embeds"] = prompt_embeds
        return callback_kwargs

    return callback_dynamic_cfg


def test_guide_dynamic_cfg_guides_21_of_50_steps_equals_compat_diffusers_and_leaks_the_scale():
    pipeline = tiny_pipeline("sd")
    call = dict(prompt="a red circle", num_inference_steps=50)
    ref, ref_rows = _run(pipeline, generator=_gen(1), callback_on_step_end=_dynamic_cfg_for(pipeline),
                         callback_on_step_end_tensor_inputs=["prompt_embeds"], **call)
    assert _guided(ref_rows) == (21, 20)
    assert pipeline.guidance_scale == 0.0, "the guide's callback leaves the scale at 0"
    pipeline._guidance_scale = 7.5
    with dlx.record(pipeline, dlx.CFGCutoff(0.4, compat="diffusers")) as trace:
        ours, rows = _run(pipeline, generator=_gen(1), **call)
    assert bitwise(ref, ours) and _guided(rows) == (21, 20) and trace.last_guided_step == 20
    assert pipeline.guidance_scale == 7.5, "dlx leaves the pipeline as found"
    _, rows = _run(pipeline, dlx.CFGCutoff(0.4), generator=_gen(1), **call)
    assert _guided(rows) == (20, 19)
    # chunk(2) keeps the positive half at any batch: this callback survives batch 2
    pair, rows = _run(pipeline, generator=_gen(1), num_images_per_prompt=2,
                      callback_on_step_end=_dynamic_cfg_for(pipeline),
                      callback_on_step_end_tensor_inputs=["prompt_embeds"], **call)
    assert pair.shape[0] == 2 and _guided(rows, batch=2) == (21, 20)


# --- 3. interrupt ----------------------------------------------------------------------------


def interrupt_callback(pipeline, i, t, callback_kwargs):
    stop_idx = 10
    if i == stop_idx:
        pipeline._interrupt = True

    return callback_kwargs


def test_guide_interrupt_runs_11_steps_and_equals_dlx_interrupt_after_step_10():
    pipeline = tiny_pipeline("sd")
    call = dict(prompt="A photo of a cat", num_inference_steps=50)
    ref, ref_rows = _run(pipeline, generator=_gen(0), callback_on_step_end=interrupt_callback, **call)
    assert len(ref_rows) == 11
    assert pipeline._interrupt is True, "the guide's callback leaves the flag set"
    pipeline._interrupt = False
    stop = dlx.Interrupt(after_step=10)
    with dlx.record(pipeline, stop) as trace:
        ours, rows = _run(pipeline, generator=_gen(0), **call)
    assert bitwise(ref, ours) and len(rows) == len(trace) == 11
    assert trace.stop_reason == "after_step=10" and stop.report["stopped_after_step"] == 10
    assert pipeline._interrupt is False, "dlx leaves the flag as found"
    with dlx.record(pipeline, dlx.Interrupt(after_step=9)) as trace9:
        _run(pipeline, generator=_gen(0), **call)
    assert len(trace9) == 10, "after_step=9 runs exactly 10 steps"


# --- 4. IP-Adapter cutoff --------------------------------------------------------------------


def _ip_scale(pipe):
    return next(p.scale for p in pipe.unet.attn_processors.values() if isinstance(getattr(p, "scale", None), list))


def test_ip_adapter_official_leaks_scale_zero_and_dlx_step_6_equals_it_bitwise():
    pipeline = add_tiny_ip_adapter(tiny_pipeline("sdxl"))
    pipeline.set_ip_adapter_scale(0.6)
    call = dict(example_inputs("sdxl", ip_adapter_image=True, prompt="a tiger sitting in a chair", steps=50),
                negative_prompt="deformed, ugly, wrong proportion, low res, bad anatomy, worst quality, low quality")
    call.pop("generator"), call.pop("output_type")
    official, _ = _run(pipeline, generator=_gen(), callback_on_step_end=IPAdapterScaleCutoffCallback(None, 5), **call)
    assert _ip_scale(pipeline) == [0.0], "the official callback leaves the adapter off"
    leaked, _ = _run(pipeline, generator=_gen(), **call)
    pipeline.set_ip_adapter_scale(0.0)
    no_adapter, _ = _run(pipeline, generator=_gen(), **call)
    pipeline.set_ip_adapter_scale(0.6)
    with_adapter, _ = _run(pipeline, generator=_gen(), **call)
    assert bitwise(leaked, no_adapter) and not bitwise(leaked, with_adapter)

    ours, _ = _run(pipeline, dlx.IPAdapterCutoff(step=6), generator=_gen(), **call)
    assert bitwise(official, ours) and _ip_scale(pipeline) == [0.6]
    five, _ = _run(pipeline, dlx.IPAdapterCutoff(step=5), generator=_gen(), **call)
    assert not bitwise(five, ours) and not bitwise(ours, with_adapter)


# --- 5. per-step previews --------------------------------------------------------------------


def latents_to_rgb(latents):
    weights = (
        (60, -60, 25, -70),
        (60, -5, 15, -50),
        (60, 10, -5, -35),
    )

    weights_tensor = torch.t(torch.tensor(weights, dtype=latents.dtype).to(latents.device))
    biases_tensor = torch.tensor((150, 140, 130), dtype=latents.dtype).to(latents.device)
    rgb_tensor = torch.einsum("...lxy,lr -> ...rxy", latents, weights_tensor) + biases_tensor.unsqueeze(-1).unsqueeze(-1)
    image_array = rgb_tensor.clamp(0, 255).byte().cpu().numpy().transpose(1, 2, 0)

    return Image.fromarray(image_array)


def test_guide_preview_equals_dlx_latent_preview_bitwise_at_every_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def decode_tensors(pipe, step, timestep, callback_kwargs):
        latents = callback_kwargs["latents"]

        image = latents_to_rgb(latents[0])
        image.save(f"{step}.png")

        return callback_kwargs

    pipeline = tiny_pipeline("sdxl")
    call = dict(prompt="A croissant shaped like a cute bear.", negative_prompt="Deformed, ugly, bad anatomy",
                num_inference_steps=50)
    pipeline(**call, generator=_gen(0), callback_on_step_end=decode_tensors, callback_on_step_end_tensor_inputs=["latents"])
    guide = [np.asarray(Image.open(tmp_path / f"{s}.png")) for s in range(50)]
    ours = {}
    pipeline(**call, generator=_gen(0), callback_on_step_end=dlx.Preview(
        lambda s, im: ours.update({s: np.asarray(im.pil())}), kind="latent", factors="sdxl-guide", size=None))
    assert sorted(ours) == list(range(50))
    assert all(guide[s].dtype == ours[s].dtype and np.array_equal(guide[s], ours[s]) for s in range(50))
    # the x0 preview the notebook times: one image per step, made only when used
    kept = []
    with dlx.attach(pipeline, dlx.Preview(lambda s, im: kept.append(im), kind="x0")):
        pipeline(**call, generator=_gen(0))
    assert len(kept) == 50 and not any(im.rendered for im in kept)
    assert kept[-1].pil().size == (128, 128)
