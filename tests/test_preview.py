"""Previews: latent→RGB maps, Flux unpacking, SD3 shift/scale, fitting, trace and live previews, TAESD."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import dlx
from dlx import DlxError
from dlx.families import FAMILIES
from dlx.preview import Preview, PreviewImage
from dlx.render import (
    LATENT_RGB,
    LatentRGB,
    fit_latent_rgb,
    latents_to_rgb,
    to_pil,
    trace_previews,
    unpack_latents,
    vae_to_rgb,
)
from dlx.testing import example_inputs, tiny_pipeline


def _unit_to_byte(v):
    """ComfyUI's preview_to_image on one value in [-1, 1], computed in float32 as the map is."""
    t = torch.tensor(v, dtype=torch.float32)
    return ((t + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8).tolist()


# --- the table -------------------------------------------------------------------------------------


def test_every_family_points_at_a_map_of_the_right_width():
    widths = {"sd15": 4, "sdxl": 4, "sd3": 16, "flux": 16}
    for fam in FAMILIES.values():
        assert LATENT_RGB[fam.latent_format].channels == widths[fam.latent_format]
    assert LATENT_RGB["sd15"].bias is None
    assert all(LATENT_RGB[k].bias is not None for k in ("sdxl", "sd3", "flux"))


def test_sd15_map_orientation_gives_the_known_colour():
    # Rows are latent channels: channel 3 = −1 gives −(row 3) = (0.2120, 0.2616, 0.7177), a light blue.
    lat = torch.zeros(1, 4, 2, 3)
    lat[:, 3] = -1.0
    rgb = latents_to_rgb(lat, "sd15")
    assert rgb.shape == (1, 2, 3, 3) and rgb.dtype == torch.uint8
    assert rgb[0, 0, 0].tolist() == [154, 160, 219]
    assert (rgb == rgb[0, 0, 0]).all()


def test_sdxl_zero_latent_is_the_bias_colour():
    rgb = latents_to_rgb(torch.zeros(2, 4, 4, 4), "sdxl")
    assert rgb[1, 2, 2].tolist() == _unit_to_byte([0.1084, -0.0175, -0.0011]) == [141, 125, 127]


def test_sd3_shift_and_scale():
    m = LATENT_RGB["sd3"]
    k = 2  # a reddish channel: row (0.1994, 0.0927, 0.0458)
    model = torch.zeros(1, 16, 4, 4)
    model[:, k] = 1.0
    # The VAE latent z whose model-space latent (z − shift)·scale is the unit latent above.
    z = model / 1.5305 + 0.0609
    expected = _unit_to_byte((m.factors[k] + m.bias).tolist())
    assert latents_to_rgb(model, "sd3")[0, 1, 1].tolist() == expected == [183, 166, 157]
    assert torch.equal(latents_to_rgb(z, "sd3", space="vae"), latents_to_rgb(model, "sd3"))
    # A VAE latent of exactly the shift is zero in model space: the bias colour.
    shift_only = torch.full((1, 16, 2, 2), 0.0609)
    assert latents_to_rgb(shift_only, "sd3", space="vae")[0, 0, 0].tolist() == _unit_to_byte(m.bias.tolist())
    # Handing raw VAE latents in as if they were model space gives another colour (the test can fail).
    assert latents_to_rgb(z, "sd3")[0, 1, 1].tolist() != expected


# --- Flux ----------------------------------------------------------------------------------------


def test_flux_unpacking_inverts_diffusers_packing():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(x, 2, 16, 6, 10)  # (2, 15, 64)
    # 48×80 image with Flux's vae_scale_factor 8 → 6×10 latent; the factor is found when not given.
    assert torch.equal(unpack_latents(packed, 48, 80, vae_scale_factor=8), x)
    assert torch.equal(unpack_latents(packed, 48, 80), x)
    assert torch.equal(unpack_latents(packed, 48, 80), FluxPipeline._unpack_latents(packed, 48, 80, 8))
    square = FluxPipeline._pack_latents(x[:, :, :6, :6].contiguous(), 2, 16, 6, 6)
    assert torch.equal(unpack_latents(square), x[:, :, :6, :6])


def test_flux_map_places_each_patch():
    from diffusers import FluxPipeline

    m = LATENT_RGB["flux"]
    x = torch.zeros(1, 16, 4, 6)
    x[:, 9, :, :3] = 1.0  # left half: channel 9 (a warm row), right half: zero latent
    packed = FluxPipeline._pack_latents(x, 1, 16, 4, 6)
    rgb = latents_to_rgb(packed, "flux", height=32, width=48)
    assert rgb.shape == (1, 4, 6, 3)
    assert (rgb[0, :, :3] == torch.tensor(_unit_to_byte((m.factors[9] + m.bias).tolist()), dtype=torch.uint8)).all()
    assert (rgb[0, :, 3:] == torch.tensor(_unit_to_byte(m.bias.tolist()), dtype=torch.uint8)).all()
    assert torch.equal(rgb, latents_to_rgb(x, "flux"))


def test_flux_non_square_sequence_without_size_raises():
    packed = torch.zeros(1, 15, 64)
    with pytest.raises(DlxError, match=r"15 tokens.*height.*width"):
        latents_to_rgb(packed, "flux")
    with pytest.raises(DlxError, match="15 tokens"):
        latents_to_rgb(packed, "flux", height=64, width=64)


# --- the diffusers guide's snippet -------------------------------------------------------------------


def _guide_latents_to_rgb(latents):
    """Verbatim from the diffusers callbacks guide ("Display image after each generation step")."""
    from PIL import Image

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_guide_map_reproduces_the_guide_bitwise(dtype):
    lat = (torch.randn(2, 4, 32, 24, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    batch = latents_to_rgb(lat, "sdxl-guide")
    for i in range(2):
        ref = np.asarray(_guide_latents_to_rgb(lat[i]))
        assert ref.std() > 10  # a real image, not a clamped flat one
        assert np.array_equal(latents_to_rgb(lat[i], "sdxl-guide").numpy(), ref)
        assert np.array_equal(batch[i].numpy(), ref)
    # ComfyUI's SDXL map is a different map: the guide's is reachable only by name.
    assert not torch.equal(latents_to_rgb(lat.float(), "sdxl"), batch)


# --- fitting -------------------------------------------------------------------------------------


class _LinearVAE(torch.nn.Module):
    """Encodes [−1, 1] images as z = M·[r, g, b, q] + c on a 4× average-pooled grid (q = r·g, so
    the four channels are independent); a known linear latent→RGB map exists."""

    def __init__(self, scaling_factor, shift_factor):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.M = torch.nn.Parameter(torch.randn(4, 4, generator=g) + 2 * torch.eye(4), requires_grad=False)
        self.c = torch.nn.Parameter(torch.randn(4, generator=g), requires_grad=False)
        self.config = types.SimpleNamespace(scaling_factor=scaling_factor, shift_factor=shift_factor)

    def encode(self, x):
        p = torch.nn.functional.avg_pool2d(x, 4)
        feats = torch.cat([p, p[:, :1] * p[:, 1:2]], dim=1)
        z = torch.einsum("ij,bjhw->bihw", self.M, feats) + self.c.view(1, 4, 1, 1)
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=z))


def test_fit_recovers_a_known_linear_map():
    vae = _LinearVAE(scaling_factor=0.5, shift_factor=0.1)
    imgs = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    m = fit_latent_rgb(vae, imgs)
    # rgb = Minv[:3]·(z − c) and z = zm / scale + shift for model-space zm:
    minv = torch.linalg.inv(vae.M.double())[:3]
    want_f = (minv / 0.5).T
    want_b = minv @ (0.1 - vae.c.double())
    assert isinstance(m, LatentRGB) and (m.scaling_factor, m.shift_factor) == (0.5, 0.1)
    torch.testing.assert_close(m.factors.double(), want_f, atol=1e-4, rtol=0)
    torch.testing.assert_close(m.bias.double(), want_b, atol=1e-4, rtol=0)
    assert "rms error 0.0000" in m.source
    # scaling/shift given explicitly override the config (and change the factors accordingly)
    m2 = fit_latent_rgb(vae, imgs, scaling_factor=1.0, shift_factor=0.0)
    torch.testing.assert_close(m2.factors.double(), minv.T, atol=1e-4, rtol=0)


def _colour_taesd():
    """A tiny AutoencoderTiny whose encoder carries colour linearly: identity (Dirac) convolutions
    and a last layer that mixes R, G, B into 4 channels; scaling and shift set in its config."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=4, scaling_factor=0.7, shift_factor=0.2,
    ).eval()
    convs = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv in convs[:-1]:
            torch.nn.init.dirac_(conv.weight)
            if conv.bias is not None:
                conv.bias.zero_()
        last = convs[-1]
        last.weight.zero_()
        mix = torch.tensor([[1.0, -0.5, 0.2], [0.3, 1.0, -0.4], [-0.2, 0.4, 1.0], [0.5, 0.5, 0.5]])
        last.weight[:, :3, 1, 1] = mix
        last.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    return vae


def test_fitted_map_previews_a_red_image_red():
    vae = _colour_taesd()
    g = torch.Generator().manual_seed(5)
    imgs = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear")
    m = fit_latent_rgb(vae, [to_pil((img.permute(1, 2, 0) * 255).to(torch.uint8), None) for img in imgs])
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 1.0
    z = vae.encode(red * 2 - 1).latents  # VAE space
    rgb = latents_to_rgb((z - 0.2) * 0.7, m).float().mean(dim=(0, 1, 2))
    assert rgb[0] > 240 and rgb[1] < 15 and rgb[2] < 15, rgb
    assert torch.equal(latents_to_rgb(z, m, space="vae"), latents_to_rgb((z - 0.2) * 0.7, m))


# --- recorded and live runs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd():
    return tiny_pipeline("sd")


@pytest.fixture(scope="module")
def sd_trace(sd):
    with dlx.record(sd) as trace:
        sd(**example_inputs("sd", steps=4))
    return trace


def test_trace_previews_one_128_image_per_step(sd_trace):
    for kind in ("x0", "latent"):
        imgs = trace_previews(sd_trace, kind=kind)
        assert len(imgs) == len(sd_trace) == 4
        assert all(im.size == (128, 128) and im.mode == "RGB" for im in imgs)
    x0, lat = trace_previews(sd_trace, "x0"), trace_previews(sd_trace, "latent")
    assert np.asarray(x0[0]).tolist() != np.asarray(lat[0]).tolist()  # x0 is not x_t
    # Nearest-neighbour enlargement: each 16×16 latent pixel is an 8×8 block of the 128 image.
    small = trace_previews(sd_trace, "x0", size=None)
    assert small[2].size == (16, 16)
    a = np.asarray(x0[2])
    assert np.array_equal(a, np.asarray(small[2]).repeat(8, 0).repeat(8, 1))
    want = latents_to_rgb(sd_trace.steps[2].x0, "sd15")[0].numpy()
    assert np.array_equal(np.asarray(small[2]), want)
    assert trace_previews(sd_trace, size=48)[0].size == (48, 48)


def test_trace_previews_reject_bad_arguments(sd_trace):
    with pytest.raises(DlxError, match="kind"):
        trace_previews(sd_trace, kind="noise")
    with pytest.raises(DlxError, match="size"):
        trace_previews(sd_trace, size=0)
    with pytest.raises(DlxError, match="sample"):
        trace_previews(sd_trace, sample=1)
    with pytest.raises(DlxError, match="no known map"):
        trace_previews(sd_trace, factors="sd2")


def test_preview_part_hands_every_step_to_fn(sd):
    got = []
    live = Preview(lambda step, image: got.append((step, image)), kind="x0")
    with dlx.record(sd, live) as trace:
        sd(**example_inputs("sd", steps=4))
    assert [s for s, _ in got] == [0, 1, 2, 3]
    first = got[0][1]
    assert isinstance(first, PreviewImage) and not first.converted  # nothing copied yet
    # previews are made when first used
    assert [im.rendered for _, im in got] == [False] * 4 and "not rendered" in repr(first)
    assert first.tensor.dtype == torch.uint8 and first.tensor.shape == (16, 16, 3)
    assert first.size == (128, 128) and first.converted  # a PIL attribute converts it
    recorded = trace_previews(trace, "x0")
    for (_, live_img), rec_img in zip(got, recorded):
        assert np.array_equal(np.asarray(live_img), np.asarray(rec_img))
    assert [(p["type"], p["report"]) for p in trace.meta["parts"]] == [("Preview", {"kind": "x0", "previews": 4})]


def _graph_like(pipe):
    """Make the UNet return its prediction in one reused buffer, as a CUDA graph's replay does."""
    forward = pipe.unet.forward
    buf = {}

    def replay(*a, **k):
        out = forward(*a, **{**k, "return_dict": False})[0]
        b = buf.setdefault(out.shape, torch.empty_like(out))
        b.copy_(out)
        return (b,)
    object.__setattr__(pipe.unet, "forward", replay)
    return lambda: pipe.unet.__dict__.pop("forward")


@pytest.mark.parametrize("kind", ["x0", "latent"])
@pytest.mark.parametrize("batch,sample,cutoff", [(1, 0, None), (2, 1, None), (2, 1, 0.5)])
def test_live_previews_survive_reused_denoiser_buffers(kind, batch, sample, cutoff):
    pipe = tiny_pipeline("sd")
    parts = [dlx.CFGCutoff(ratio=cutoff)] if cutoff else []

    def previews():
        got = []
        with dlx.record(pipe, *parts, Preview(lambda s, im: got.append(im), kind=kind, sample=sample)) as t:
            pipe(**example_inputs("sd", steps=4, batch=batch))
        return got, t
    ref, trace = previews()
    undo = _graph_like(pipe)
    try:
        got, _ = previews()
    finally:
        undo()
    assert len(got) == 4 and not got[3].rendered
    for a, b, c in zip(got, ref, trace_previews(trace, kind, sample=sample)):
        assert torch.equal(a.tensor, b.tensor) and np.array_equal(np.asarray(a), np.asarray(c))
    assert not torch.equal(got[0].tensor, got[3].tensor)


def test_live_preview_with_a_map_that_does_not_fit_fails_at_the_first_step():
    pipe = tiny_pipeline("sd")
    seen = []
    with pytest.raises(DlxError, match=r"4 channels.*'sd3'.*expects 16"):
        with dlx.attach(pipe, Preview(lambda s, im: seen.append(s), factors="sd3")):
            pipe(**example_inputs("sd", steps=4))
    assert seen == []


def test_x0_preview_of_an_input_changed_in_place_raises_instead_of_lying():
    pipe = tiny_pipeline("sd")
    got = []

    held = []

    def nudge(pipe, step, t, kw):
        # without CFG the denoiser's input is `latents` itself: the latents after step 0 are the
        # input of step 1; change them in place once step 1 is done
        if step == 0:
            held.append(kw["latents"])
        if step == 1:
            held[0].mul_(1.0)
        return kw
    with dlx.attach(pipe, Preview(lambda s, im: got.append(im))):
        pipe(**example_inputs("sd", steps=3, guidance_scale=1.0), callback_on_step_end=nudge)
    with pytest.raises(DlxError, match="denoiser input of step 1 was changed in place"):
        got[1].tensor
    assert got[1].rendered is False
    assert got[0].tensor.shape == got[2].tensor.shape == (16, 16, 3)


def test_preview_latent_as_plain_callback(sd, sd_trace):
    got = {}
    sd(**example_inputs("sd", steps=4), callback_on_step_end=Preview(lambda s, im: got.__setitem__(s, im.pil()), kind="latent"))
    assert sorted(got) == [0, 1, 2, 3]
    for s, rec in enumerate(trace_previews(sd_trace, "latent")):
        assert np.array_equal(np.asarray(got[s]), np.asarray(rec))
    with pytest.raises(DlxError, match="attach"):
        sd(**example_inputs("sd", steps=1), callback_on_step_end=Preview(lambda s, im: None, kind="x0"))


def test_preview_every_and_arguments(sd):
    steps = []
    with dlx.attach(sd, Preview(lambda s, im: steps.append(s), kind="latent", every=3)):
        sd(**example_inputs("sd", steps=5))
    assert steps == [0, 3, 4]  # every 3rd step and the last
    with pytest.raises(DlxError, match="fn"):
        Preview("not callable")
    with pytest.raises(DlxError, match="every"):
        Preview(print, every=0)
    with pytest.raises(DlxError, match="no known map"):
        Preview(print, factors="nope")


def test_wrong_channels_for_the_family_names_both():
    flux = tiny_pipeline("flux")  # tiny Flux: 4 latent channels packed as (B, 64, 16)
    with dlx.record(flux) as trace:
        flux(**example_inputs("flux", steps=2))
    assert trace.steps[0].latents.shape == (1, 64, 16)
    with pytest.raises(DlxError, match=r"4 channels.*'flux'.*expects 16"):
        trace_previews(trace)
    with pytest.raises(DlxError, match=r"4 channels.*'sd3'.*expects 16"):
        latents_to_rgb(torch.zeros(1, 4, 8, 8), "sd3")
    # With a 4-channel map the packed latents unpack through the call's height/width (32 → 16×16).
    imgs = trace_previews(trace, kind="latent", factors="sd15", size=None)
    assert len(imgs) == 2 and imgs[0].size == (16, 16)
    from diffusers import FluxPipeline

    unpacked = FluxPipeline._unpack_latents(trace.steps[1].latents, 32, 32, flux.vae_scale_factor)
    assert np.array_equal(np.asarray(imgs[1]), latents_to_rgb(unpacked, "sd15")[0].numpy())


# --- TAESD ---------------------------------------------------------------------------------------


def test_taesd_previews(sd, sd_trace):
    taesd = _colour_taesd()  # scaling 0.7, shift 0.2 in its config: applied as a pipeline would
    lat = sd_trace.steps[3].latents
    with torch.no_grad():
        ref = taesd.decode(lat / 0.7 + 0.2).sample
    want = ((ref + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)[0].permute(1, 2, 0)
    assert want.shape == (32, 32, 3)  # one upsampling: 16 → 32
    assert torch.equal(vae_to_rgb(taesd, lat)[0], want)
    imgs = trace_previews(sd_trace, kind="latent", factors=taesd, size=None)  # a VAE passed as factors=
    assert np.array_equal(np.asarray(imgs[3]), want.numpy())
    assert trace_previews(sd_trace, kind="latent", taesd=taesd)[3].size == (128, 128)
    got = []
    with dlx.attach(sd, Preview(lambda s, im: got.append(im), kind="latent", taesd=taesd, size=None)):
        sd(**example_inputs("sd", steps=4))
    assert len(got) == 4 and torch.equal(got[3].tensor, want)
    with pytest.raises(DlxError, match="taesd"):
        Preview(print, taesd=object())
