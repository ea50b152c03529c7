"""dlx.metrics: torchmetrics fidelity, LPIPS and CLIP with networks passed in, user callables."""

from __future__ import annotations

import math

import pytest
import torch

from dlx import DlxError
from dlx.metrics import PSNR_CAP, resolve


def _images(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g)


def test_psnr_and_ssim_per_image_match_torchmetrics():
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnr, ssim = resolve(["psnr", "ssim"])
    a, b = _images(0), _images(1)
    b = 0.8 * a + 0.2 * b
    got = psnr(a, ["p"] * 3, b)
    for i in range(3):
        assert got[i] == pytest.approx(float(peak_signal_noise_ratio(a[i:i + 1], b[i:i + 1], data_range=1.0)), rel=1e-5)
    got = ssim(a, ["p"] * 3, b)
    for i in range(3):
        assert got[i] == pytest.approx(float(structural_similarity_index_measure(a[i:i + 1], b[i:i + 1], data_range=1.0)),
                                       rel=1e-5)
    assert psnr(a, ["p"] * 3, a) == [PSNR_CAP] * 3  # identical images: capped, not inf
    assert psnr.higher_is_better and psnr.reference and ssim.higher_is_better


class TinyLpips(torch.nn.Module):
    """A random stand-in for torchmetrics' LPIPS network (same call: net(a, b, normalize=True))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, a, b, normalize=False):
        if normalize:
            a, b = 2 * a - 1, 2 * b - 1
        return ((self.conv(a) - self.conv(b)) ** 2).mean((1, 2, 3), keepdim=True)


def test_lpips_uses_the_network_given_and_is_lower_is_better():
    (m,) = resolve(["lpips"], networks={"lpips": TinyLpips()})
    a, b = _images(0), _images(1)
    d = m(a, ["p"] * 3, b)
    assert all(v > 0 for v in d) and m(a, ["p"] * 3, a) == [0.0] * 3
    assert m.higher_is_better is False and m.reference


def _tiny_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from dlx.testing import _clip_tokenizer

    tok = _clip_tokenizer()
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    cfg = CLIPConfig(text_config=dict(**small, vocab_size=max(1000, len(tok)), max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id),
                     vision_config=dict(**small, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    return CLIPModel(cfg).eval(), proc


def test_clip_score_is_100_times_clipped_cosine_with_the_model_given():
    model, proc = _tiny_clip()
    (m,) = resolve(["clip"], networks={"clip": (model, proc)})
    imgs = _images(0, 2)
    got = m(imgs, ["a red circle", "a blue square"], None)
    x = [(i * 255).round().to(torch.uint8) for i in imgs]
    batch = proc(text=["a red circle", "a blue square"], images=x, return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=batch["pixel_values"])
        txt = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    want = (100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1).clamp_min(0)).tolist()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert m.higher_is_better and not m.reference


def test_user_callable_keeps_its_direction():
    def darkness(images, prompts, reference_images):
        return 1 - images.mean((1, 2, 3))

    darkness.higher_is_better = False
    (m,) = resolve([darkness])
    assert m.name == "darkness" and m.higher_is_better is False
    assert m(torch.zeros(2, 3, 4, 4), ["a", "b"], None) == [1.0, 1.0]


def test_adherence_judges_the_embedded_models_language():
    from dlx.zoo.shapes_data import render, sample_scenes

    scene = sample_scenes(2, torch.Generator().manual_seed(0))
    (m,) = resolve(["adherence"])
    assert m(render(scene), scene.captions(), None) == [1.0, 1.0]


@pytest.mark.parametrize("metrics, networks, match", [
    (["fid"], None, "unknown metric 'fid'"),
    (["lpips"], None, "'lpips' needs its network"),
    (["clip"], None, "'clip' needs its network"),
    (["clip"], {"clip": "openai/clip"}, "'clip' must be \\(model, processor\\)"),
    (["psnr"], {"vgg": 1}, "`networks` has unknown key 'vgg'"),
    (["psnr", "psnr"], None, "twice"),
    ([3], None, "`metrics`"),
])
def test_bad_metrics_are_refused(metrics, networks, match):
    with pytest.raises(DlxError, match=match):
        resolve(metrics, networks)


def test_metric_returning_the_wrong_count_is_an_error():
    (m,) = resolve([lambda images, prompts, ref: [1.0]])
    with pytest.raises(DlxError, match="returned 1 values for 2 images"):
        m(torch.zeros(2, 3, 4, 4), ["a", "b"], None)
    assert not math.isnan(m(torch.zeros(1, 3, 4, 4), ["a"], None)[0])
