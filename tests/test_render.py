"""dlx.render: decoder choice (the model's own small VAE vs the family map), sharp upscaling, PNG bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import dlx
from dlx import DlxError
from dlx.render import (
    decoder_for,
    latents_to_rgb,
    png_bytes,
    render_steps,
    small_vae,
    trace_previews,
    upscale,
    vae_to_rgb,
)
from dlx.testing import example_inputs, tiny_pipeline


# --- upscaling -------------------------------------------------------------------------------------


def _checker(n=4):
    a = np.zeros((n, n, 3), np.uint8)
    a[::2, ::2] = (255, 0, 0)
    a[1::2, 1::2] = (0, 0, 255)
    return Image.fromarray(a)


def test_upscale_integer_factor_is_whole_blocks():
    img = _checker()
    big = np.asarray(upscale(img, 32))
    assert big.shape == (32, 32, 3)
    assert np.array_equal(big, np.asarray(img).repeat(8, 0).repeat(8, 1))


def test_upscale_non_integer_factor_stays_sharp():
    img = _checker()
    big = np.asarray(upscale(img, 30)).astype(int)  # 4 -> 30: 8x blocks box-filtered to 30
    assert big.shape == (30, 30, 3)
    src = np.asarray(img).astype(int)
    # Away from block boundaries every pixel is exactly its source pixel (no blur)...
    centre = big[3::7, 3::7][:4, :4]
    assert np.array_equal(centre, src)
    # ...and at most one pixel per boundary mixes two colours: >= 3/4 of pixels keep a source colour.
    colours = {tuple(c) for c in src.reshape(-1, 3)}
    exact = sum(tuple(p) in colours for p in big.reshape(-1, 3))
    assert exact >= 0.75 * 30 * 30
    # Bilinear would blur much more: the same test fails for it (so the test can fail).
    blur = np.asarray(img.resize((30, 30), Image.Resampling.BILINEAR)).astype(int)
    assert sum(tuple(p) in colours for p in blur.reshape(-1, 3)) < 0.75 * 30 * 30


def test_upscale_shrinks_with_box_and_checks_size():
    img = Image.new("RGB", (64, 32), (10, 20, 30))
    assert upscale(img, 16).size == (16, 8)
    assert upscale(img, None) is img
    with pytest.raises(DlxError, match="size"):
        upscale(img, 0)


def test_png_bytes_round_trip():
    t = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = png_bytes(t)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), t.numpy())
    big = Image.open(io.BytesIO(png_bytes(t, 14)))
    assert big.size == (14, 10)
    assert np.array_equal(np.asarray(big), t.numpy().repeat(2, 0).repeat(2, 1))


# --- decoder choice ----------------------------------------------------------------------------------


def test_zoo_models_are_recognised_by_their_folder_on_any_machine():
    assert small_vae("/somewhere/else/site-packages/dlx/zoo/shapes") is small_vae(str(dlx.zoo.path("shapes")))
    assert small_vae("runwayml/stable-diffusion-v1-5") is None
    assert small_vae("/data/shapes") is None  # a folder called shapes is not the zoo's
    assert small_vae(None) is None
    f, v = decoder_for("/x/dlx/zoo/shapes")
    assert f is None and v is small_vae("/x/dlx/zoo/shapes")
    assert decoder_for("/x/dlx/zoo/shapes", decoder="map") == (None, None)
    assert decoder_for("my/model") == (None, None)  # a user's model: the family map
    with pytest.raises(DlxError, match=r"decoder='vae'.*'my/model'"):
        decoder_for("my/model", decoder="vae")
    with pytest.raises(DlxError, match="decoder"):
        decoder_for(None, decoder="taesd")
    with pytest.raises(DlxError, match="decoder"):
        decoder_for(None, decoder=3)


def test_a_model_registers_its_own_vae(monkeypatch):
    from dlx.render import decoders, registry

    monkeypatch.setattr(registry, "_VAES", dict(registry._VAES))
    monkeypatch.setattr(decoders, "_SMALL_VAES", {})
    vae = small_vae(str(dlx.zoo.path("shapes")))  # any small VAE will do
    loads = []

    def load(device, dtype):
        loads.append((device, dtype))
        return vae

    dlx.render.register_vae("mine", lambda p: p.name == "my-model", load)
    assert decoder_for("/models/my-model") == (None, vae)
    assert decoder_for(r"C:\models\my-model", decoder="vae") == (None, vae)  # Windows paths too
    assert decoder_for("/models/my-model", decoder="map") == (None, None)
    assert decoder_for("/models/other") == (None, None)
    assert small_vae("/models/my-model") is vae and len(loads) == 1  # loaded once per device and dtype
    assert loads == [(torch.device("cpu"), torch.float32)]
    with pytest.raises(DlxError, match="`matches`"):
        dlx.render.register_vae("x", None, load)
    with pytest.raises(DlxError, match="`name`"):
        dlx.render.register_vae("", lambda p: True, load)


def test_the_zoo_registers_at_import_dlx_without_torch():
    # A trace of the zoo model read in a fresh process still decodes through its VAE: `import dlx`
    # lets dlx.zoo register it, and neither imports torch.
    import subprocess
    import sys

    code = ("import sys, dlx; from dlx.render.registry import registered_vae; "
            "print(registered_vae('/elsewhere/dlx/zoo/shapes').name, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["shapes", "False"]


@pytest.fixture(scope="module")
def sd_trace():
    pipe = tiny_pipeline("sd")
    with dlx.record(pipe) as trace:
        pipe(**example_inputs("sd", steps=3, batch=2))
    return trace


def test_render_steps_shapes_and_family_map(sd_trace):
    rgb = render_steps(sd_trace, "x0")
    assert rgb.shape == (3, 2, 16, 16, 3) and rgb.dtype == torch.uint8 and rgb.device.type == "cpu"
    assert torch.equal(rgb[1, 1], latents_to_rgb(sd_trace.steps[1].x0[1:2], "sd15")[0])
    sub = render_steps(sd_trace, "latent", [1], steps=[2])
    assert torch.equal(sub[0, 0], latents_to_rgb(sd_trace.steps[2].latents[1:2], "sd15")[0])
    with pytest.raises(DlxError, match="steps"):
        render_steps(sd_trace, steps=[3])
    with pytest.raises(DlxError, match="sample"):
        render_steps(sd_trace, samples=[2])


def test_a_trace_of_the_zoo_model_decodes_with_its_vae(sd_trace):
    # The same latents, labelled as made by the zoo's shapes model, decode through its VAE.
    vae = small_vae(str(dlx.zoo.path("shapes")))
    t = dlx.Trace(steps=sd_trace.steps, meta=dict(sd_trace.meta, model="/elsewhere/dlx/zoo/shapes"))
    rgb = render_steps(t, "x0")
    assert rgb.shape == (3, 2, 64, 64, 3)  # the shapes VAE upsamples 4x
    want = vae_to_rgb(vae, sd_trace.steps[2].x0)
    assert torch.equal(rgb[2], want)
    assert trace_previews(t)[0].size == (128, 128)
    assert trace_previews(t, decoder="map", size=None)[0].size == (16, 16)


# --- the embedded model: legible previews (issue 13 point 0) -----------------------------------------


@pytest.fixture(scope="module")
def shapes_run():
    pipe = dlx.zoo.load("shapes")
    prompt = "a red circle on the left and a blue star on the right"
    with dlx.record(pipe) as trace:
        out = pipe(prompt, num_inference_steps=10, guidance_scale=6, generator=torch.Generator().manual_seed(0))
    return pipe, trace, out.images[0]


def test_zoo_previews_are_legible(shapes_run):
    pipe, trace, final = shapes_run
    assert trace.meta["model"] == pipe.name_or_path
    # x_t of the last step decoded is the pipeline's own output image (same VAE, same latents;
    # the pipeline rounds to uint8 where the preview truncates: at most 1 level apart).
    last = np.asarray(trace_previews(trace, "latent", size=None)[-1]).astype(int)
    assert last.shape == (64, 64, 3)
    assert np.abs(last - np.asarray(final).astype(int)).max() <= 1
    # The last x0 preview shows what the prompt asks: red on the left, blue on the right, dark ground.
    x0 = np.asarray(trace_previews(trace, "x0", size=None)[-1]).astype(float)
    red = (x0[..., 0] > 150) & (x0[..., 2] < 100)
    blue = (x0[..., 2] > 150) & (x0[..., 0] < 100)
    assert red[:, :32].sum() > 100 and red[:, 32:].sum() < 10
    assert blue[:, 32:].sum() > 50 and blue[:, :32].sum() < 10
    # The linear family map cannot read this VAE's latents (its red circle comes out blue).
    mapped = np.asarray(trace_previews(trace, "x0", size=None, decoder="map")[-1]).astype(float)
    assert ((mapped[..., 0] > 150) & (mapped[..., 2] < 100)).sum() < 10


def test_live_preview_of_the_zoo_model_uses_its_vae(shapes_run):
    pipe, trace, _ = shapes_run
    got = []
    with dlx.attach(pipe, dlx.Preview(lambda s, im: got.append(im), size=None)):
        pipe("a red circle on the left and a blue star on the right", num_inference_steps=10, guidance_scale=6,
             generator=torch.Generator().manual_seed(0))
    rec = trace_previews(trace, "x0", size=None)
    assert len(got) == 10 and got[0].tensor.shape == (64, 64, 3)
    for a, b in zip(got, rec):
        # one latent per decoder pass live, ten per pass from the trace: convolutions sum in another
        # order, so at most one level apart
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1
