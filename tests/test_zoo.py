"""The shipped shapes model: loads offline, generates, its metric is right on renders, and a
small re-measurement agrees with its model card."""

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dlx.zoo
from dlx.errors import DlxError
from dlx.zoo import shapes_data as sd
from dlx.zoo.metric import adherence

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools" / "zoo"  # the scripts that trained and measured the model: outside the package
SCRIPTS = ("train_shapes", "measure_shapes", "train_classifier", "shapes_tokenizer")


#: the scripts run as the card says, from the repository root, with no PYTHONPATH: they find dlx themselves
_ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1"}


def _tool(name, monkeypatch):
    """A script of tools/zoo imported as its own directory sees it (siblings import each other)."""
    monkeypatch.syspath_prepend(str(TOOLS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def pipe():
    return dlx.zoo.load("shapes", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def facts():
    return dlx.zoo.info("shapes")


def test_import_is_light():
    code = ("import sys, dlx.zoo; heavy = [m for m in ('diffusers', 'transformers', 'pandas') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_info_describes_the_language(facts):
    assert facts["image_size"] == 64
    assert set(facts["colours"]) >= {"red", "blue"} and "circle" in facts["shapes"]
    assert "left of" in facts["relations"]
    assert 1.0 <= facts["recommended_guidance_scale"] <= 7.5
    m = facts["measured"]
    assert m["size_on_disk_bytes"] <= 30e6
    assert m["largest_file_bytes"] <= 16 * 2**20
    # every template renders a caption the parser and the tokenizer accept
    t = facts["templates"]["relation"].format(colour="red", shape="circle", side="left",
                                              colour2="blue", shape2="square", side2="right")
    assert sd.parse(t)["relation"] == "left of"
    assert sd.parse(facts["templates"]["and"].format(colour="red", shape="circle", colour2="blue",
                                                     shape2="square"))["relation"] is None


def test_tokenizer_gives_one_token_per_word(pipe):
    tok = pipe.tokenizer
    assert tok.model_max_length == sd.MAX_TOKENS
    ids = tok("a red circle on the left and a blue square on the right").input_ids
    assert len(ids) == 13 + 2  # thirteen words, bos, eos
    sc = sd.sample_scenes(64, torch.Generator().manual_seed(3))
    ref = tok(sc.captions(), padding="max_length", max_length=tok.model_max_length).input_ids
    assert sd.token_ids(sc, tok.get_vocab()).tolist() == ref


def test_generates_an_image_that_follows_a_prompt(pipe, facts):
    prompt = "a yellow circle"
    out = pipe(prompt, num_inference_steps=25, guidance_scale=facts["recommended_guidance_scale"],
               generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert out.shape == (1, 3, 64, 64)
    assert out.std() > 0.1  # not a flat or noise-free blank image
    df = dlx.zoo.adherence(out, [prompt])
    assert list(df.columns[:8]) == ["prompt", "template", "colour0", "shape0", "colour1", "shape1",
                                    "relation", "ok"]
    assert df["colour0"].iloc[0]  # a single yellow object is the easiest case


def test_metric_is_right_on_fresh_renders(monkeypatch):
    m = _tool("train_classifier", monkeypatch).evaluate_metric(n=300, seed=4242)
    assert m["shape_accuracy"] >= 0.98
    assert m["ok_on_own_caption"] >= 0.98
    assert m["ok_on_mismatched_caption"] <= 0.02


def test_metric_columns_and_mismatches():
    sc = sd.sample_scenes(8, torch.Generator().manual_seed(9), template_weights={"relation": 1.0})
    imgs = sd.render(sc)
    caps = sc.captions()
    df = adherence(imgs, caps)
    assert df["ok"].all() and df["relation"].all()
    # same objects, opposite relation: every image fails on the relation alone
    flipped = [sd.caption(1, c.tolist(), s.tolist(), int(r) ^ 1)
               for c, s, r in zip(sc.colour, sc.shape, sc.relation)]
    df2 = adherence(imgs, flipped)
    assert not df2["ok"].any() and df2["colour0"].all() and df2["shape0"].all()
    # PIL images are accepted too
    from PIL import Image

    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).astype("uint8")) for im in imgs[:2]]
    assert adherence(pil, caps[:2])["ok"].all()
    with pytest.raises(DlxError):
        adherence(imgs[:1], ["a red elephant"])


def test_remeasurement_agrees_with_the_card(pipe, facts, tmp_path, monkeypatch):
    """The first 32 held-out pairs at the recommended scale and at 1.0, with 12 DDIM steps
    instead of the card's 25 (to keep this test near 20 s), as one ``dlx.sweep`` (one batched
    call of all 64 rows, each sample at its own scale, judged on the stored 8-bit PNGs).  The
    card stores these 32 pairs' verdicts (measured["quick_check"]): at most 3 of 32 may flip
    (float32 drift between CPUs). On this repository's CPU machine the sweep flips none; its
    PNGs equal those of one call per scale (the hand-written loop it replaced) within 1 level
    of 255 (48 of 64 images differ somewhere, batch-size rounding), with no verdict flipped,
    so the tolerance was not widened.  Against the card's 200-pair,
    25-step numbers: within 0.2 (sampling error of 32 pairs and the step count)."""
    tool = _tool("measure_shapes", monkeypatch)
    CHECK_PAIRS, CHECK_STEPS = tool.CHECK_PAIRS, tool.CHECK_STEPS

    m = facts["measured"]
    qc = m["quick_check"]
    assert (qc["pairs"], qc["steps"]) == (CHECK_PAIRS, CHECK_STEPS)
    rec = facts["recommended_guidance_scale"]
    pairs = sd.heldout_pairs(200)[:CHECK_PAIRS]
    res = dlx.sweep(pipe, pairs=pairs, configs={"full CFG": None}, guidance_scales=[rec, 1.0],
                    metrics=["adherence"], out=tmp_path / "sweep", num_inference_steps=CHECK_STEPS,
                    timing=(), progress=False)
    f = res.frame
    assert len(f) == 2 * CHECK_PAIRS and (f.status == "ok").all()
    got = {}
    for scale, key in ((rec, "adherence_recommended"), (1.0, "adherence_scale_1")):
        rows = f[f.guidance_scale == scale]
        assert list(zip(rows.prompt, rows.seed)) == pairs  # the card's verdicts are in pair order
        # full CFG costs 2 denoiser evaluations a step; scale 1 is the pipeline's own no-CFG path
        assert rows.nfe.tolist() == [CHECK_STEPS * (2 if scale > 1 else 1)] * CHECK_PAIRS
        ok = [v == 1.0 for v in rows.adherence]
        flips = sum(a != b for a, b in zip(ok, qc[str(scale)]["ok"]))
        assert flips <= 3, (scale, flips)
        got[scale] = sum(ok) / len(ok)
        assert abs(got[scale] - m[key]["adherence"]) <= 0.2, (scale, got, m[key])
    summary = res.summary().set_index("guidance_scale")["adherence"]
    assert summary[rec] == got[rec] and summary[1.0] == got[1.0]
    # guidance matters, as on the card (34.5 points over 200 pairs at 25 steps; 31 points on
    # these 32 pairs at 12 steps): the bar of the issue is 10 points
    card_gap = m["adherence_recommended"]["adherence"] - m["adherence_scale_1"]["adherence"]
    assert card_gap >= 0.10
    assert got[rec] - got[1.0] >= 0.10, got


def test_relation_metric_for_sweeps(monkeypatch):
    """train_shapes.relation, the sweep metric behind the card's "relation" figures: the
    adherence check's relation column as 1.0 / 0.0, NaN where the caption has no relation."""
    relation = _tool("train_shapes", monkeypatch).relation

    sc = sd.sample_scenes(4, torch.Generator().manual_seed(9), template_weights={"relation": 1.0})
    imgs, caps = sd.render(sc), sc.captions()
    flipped = [sd.caption(1, c.tolist(), s.tolist(), int(r) ^ 1)
               for c, s, r in zip(sc.colour, sc.shape, sc.relation)]
    assert relation(imgs, caps) == [1.0] * 4
    assert relation(imgs, flipped) == [0.0] * 4
    single = sd.render(sd.sample_scenes(1, torch.Generator().manual_seed(1), template_weights={"single": 1.0}))
    got = relation(single, ["a red circle"])
    assert len(got) == 1 and got[0] != got[0]  # NaN: no relation to judge


# --- the training and measuring scripts (tools/zoo) --------------------------------------------------


def test_the_card_is_what_the_measuring_script_writes(tmp_path):
    """The card's one documented command renders it from info.json: its quickest mode
    (--card-only, run as the card says, from the repository root) writes the shipped card byte for
    byte, so every figure on it is one of info.json's measured facts."""
    card = dlx.zoo.path("shapes") / "README.md"
    assert "`python tools/zoo/measure_shapes.py`" in card.read_text()
    r = subprocess.run([sys.executable, "tools/zoo/measure_shapes.py", "--card-only", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, env=_ENV)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "README.md").read_text() == card.read_text()
    assert not (tmp_path / "info.json").exists()  # measured nothing, wrote no facts


@pytest.mark.parametrize("script", ["train_shapes", "measure_shapes", "train_classifier"])
def test_each_script_parses_its_command_line(script):
    r = subprocess.run([sys.executable, f"tools/zoo/{script}.py", "--help"], cwd=ROOT, capture_output=True,
                       text=True, env=_ENV)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def test_runtime_code_imports_no_training_script():
    """dlx.zoo, the adherence metric and the demo's prompts run without tools/zoo: no module of
    the package imports one of its scripts (also not inside a function)."""
    found = []
    for f in sorted((ROOT / "dlx").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
            found += [f"{f.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                      if any(part in SCRIPTS for part in n.split("."))]
    assert not found, found
    assert not list((ROOT / "dlx" / "zoo").glob("*train*")) and not list((ROOT / "dlx" / "zoo").glob("measure*"))


def _copy(tmp_path):
    dst = tmp_path / "shapes_copy"
    shutil.copytree(dlx.zoo.path("shapes"), dst)
    return dst


def test_renamed_weights_file_is_a_clear_error(tmp_path):
    dst = _copy(tmp_path)
    w = dst / "unet" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_name("renamed.safetensors"))
    with pytest.raises(DlxError, match="shapes_copy"):
        dlx.zoo.load("shapes", folder=dst)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    dst = _copy(tmp_path)
    (dst / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(DlxError, match="shapes_copy") as e:
        dlx.zoo.load("shapes", folder=dst)
    assert isinstance(e.value, ValueError)


def test_unknown_model_and_bad_caption():
    with pytest.raises(DlxError):
        dlx.zoo.load("nope")
    with pytest.raises(DlxError):
        sd.parse("a red circle on the left and a red square on the right")  # colours must differ
    with pytest.raises(DlxError):
        sd.parse("a red circle on the left and a blue square on the left")
    assert json.loads((dlx.zoo.path("shapes") / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionPipeline"


def test_corrupt_captions_changes_one_fact_in_the_stated_share():
    """Training captions are noisy on purpose (the model card says why): a share `rate` of
    them gets exactly one fact wrong, and every noisy caption is still in the language."""
    g = torch.Generator().manual_seed(0)
    sc = sd.sample_scenes(20000, g)
    same = sd.corrupt_captions(sc, 0.0, torch.Generator().manual_seed(1))
    assert same.captions() == sc.captions()
    noisy = sd.corrupt_captions(sc, 0.3, torch.Generator().manual_seed(1))
    n_obj = torch.where(sc.template == sd.T_SINGLE, 1, 2).view(-1, 1)
    used = torch.arange(2).view(1, 2) < n_obj
    changes = (((noisy.colour != sc.colour) & used).sum(1) + ((noisy.shape != sc.shape) & used).sum(1)
               + (noisy.relation != sc.relation).long() * (sc.template == sd.T_RELATION).long())
    assert changes.max() == 1
    share = changes.float().mean().item()
    assert abs(share - 0.3) < 0.015, share  # 20000 draws: sd of the share ~0.003
    # images are untouched: positions and sizes are the true scene's
    assert torch.equal(noisy.centre, sc.centre) and torch.equal(noisy.radius, sc.radius)
    for cap in noisy.captions()[:3000]:
        sd.parse(cap)  # raises if two objects share a colour or the sides are not opposite


def test_load_honours_the_dtype_given_by_name():
    """Issue 11, item 11: dtype="float16" silently loaded float32 (one load: ~3 s)."""
    from dlx._args import float_dtype

    p = dlx.zoo.load("shapes", dtype="float16")
    assert {m.dtype for m in (p.unet, p.vae, p.text_encoder)} == {torch.float16}
    # every spelling goes through the same conversion
    assert {float_dtype("dtype", d) for d in (torch.float16, "float16", "torch.float16", "half")} == {torch.float16}


@pytest.mark.parametrize("dtype", ["float99", "int8", torch.int8, torch.bool, 16, ""])
def test_load_refuses_a_dtype_it_cannot_honour(dtype):
    with pytest.raises(DlxError, match=r"argument `dtype`.*" + str(dtype).replace(".", r"\.")):
        dlx.zoo.load("shapes", dtype=dtype)


def test_adherence_of_nothing_is_a_clear_error():
    with pytest.raises(DlxError, match="argument `prompts`"):
        dlx.zoo.adherence([], [])
    with pytest.raises(DlxError, match="argument `images`.*empty"):
        dlx.zoo.adherence([], ["a red circle"])
    with pytest.raises(DlxError, match="argument `images` holds NaN"):
        dlx.zoo.adherence(torch.full((1, 3, 64, 64), float("nan")), ["a red circle"])
    with pytest.raises(DlxError, match=r"argument `prompts`, entry 0: not a caption"):
        dlx.zoo.adherence(torch.zeros(1, 3, 64, 64), ["a red elephant"])


def test_the_embedded_model_as_img2img_saves_and_round_trips(pipe, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    with dlx.record(i2i) as t:
        i2i("a red circle", image=Image.new("RGB", (64, 64), (200, 30, 30)), strength=0.5,
            num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert not t[0].latents.is_contiguous()  # channels-last: the case that failed to save
    back = dlx.Trace.load(t.save(tmp_path / "i2i.safetensors"))
    for a, b in zip(t, back):
        for k, v in a.tensors().items():  # same bytes (NaN rows of unguided steps included)
            w = b.tensors()[k]
            assert v.dtype == w.dtype and v.shape == w.shape and torch.equal(
                v.contiguous().reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), k


def test_damaged_model_facts_name_the_file(tmp_path, monkeypatch):
    dst = tmp_path / "shapes"
    dst.mkdir()
    (dst / "info.json").write_text("{not json")
    monkeypatch.setattr(dlx.zoo, "_ROOT", tmp_path)
    with pytest.raises(DlxError, match=r"model facts damaged: .*info\.json is not valid JSON"):
        dlx.zoo.info("shapes")
    (dst / "info.json").write_text("[1, 2]")
    with pytest.raises(DlxError, match=r"info\.json holds list"):
        dlx.zoo.info("shapes")
