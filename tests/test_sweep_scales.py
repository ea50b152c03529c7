"""dlx.sweep over guidance scales: rows of one step count and several scales share a pipeline call
where the pipeline's scale acts only in the CFG combination, and every row still equals its
standalone run at its own scale."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import dlx
from dlx import DlxError
from dlx.families import scale_changes_inputs
from dlx.metrics import psnr
from dlx.sweeps import engine
from dlx.sweeps.spec import Config, build_spec

from .helpers import pipe_for

CALL = dict(num_inference_steps=4, height=32, width=32)
PROMPTS = ["a red circle", "a blue square"]
SCALES = [1.0, 3.0, 6.0]


def standalone(pipe, cfg, prompt, seed, scale, call=CALL):
    """The config run alone at ``scale``, as a user would: a plain call with its controls attached
    (at a scale <= 1 the call has no CFG and a control warns that it could not act: expected)."""
    with warnings.catch_warnings(), dlx.attach(pipe, *cfg.parts()):
        warnings.filterwarnings("ignore", ".*no step of this call was guided", UserWarning)
        return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", guidance_scale=scale,
                    **call).images[0]


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def as_png_array(img: torch.Tensor) -> np.ndarray:
    return (img.permute(1, 2, 0).float().numpy() * 255).round().clip(0, 255).astype("uint8")


def batches(res) -> list[dict]:
    return [e for e in res.events if e["kind"] == "batch"]


def close(got, ref, dtype, what):
    # the batched-row tolerance of tests/test_sweep.py: fp32 max |difference| <= 1e-5 on the
    # decoded image; fp16 PSNR >= 40 dB
    if dtype == torch.float32:
        assert (got - ref).abs().max().item() <= 1e-5, what
    else:
        mse = ((got - ref) ** 2).mean().item()
        assert mse == 0 or 10 * math.log10(1 / mse) >= 40, what


def test_three_scales_run_in_fewer_calls_than_scales(tmp_path):
    # Before: one series of calls per (steps, scale), 3 calls here. Now one call holds every scale.
    pipe = pipe_for("sd")
    res = dlx.sweep(pipe, prompts=PROMPTS[:1], seeds=[0, 1], cutoffs=[0, 0.5, 1.0], guidance_scales=SCALES,
                    out=tmp_path, timing=(), progress=False, metrics=["psnr"], **CALL)
    (b,) = batches(res)
    assert b["rows"] == 18 and b["scale"] == SCALES and b["call_scale"] == 6.0 and b["steps"] == 4
    f = res.frame
    assert (f.status == "ok").all() and len(f) == 18
    # per row: NFE = 4 conditional evaluations + one unconditional per guided step; at scale 1
    # the row is unguided at every step, as a standalone call at scale 1 runs without CFG
    for r in f.itertuples():
        want = 0 if r.guidance_scale <= 1 else {0.0: 0, 0.5: 2, 1.0: 4}[r.cutoff]
        assert (r.guided_steps, r.nfe) == (want, 4 + want), r.config
    assert b["nfe_sum"] == f.nfe.sum() == 2 * (12 + 18 + 18)


def mixed_spec(scales=SCALES, call=CALL, **kw):
    """Cutoff, interval, adaptive and sigma configs at every scale of ``scales``, and the two
    schedules at those above 1 (``build_spec`` refuses a schedule at a scale <= 1: no CFG), in
    one grid."""
    configs = {"cut .5": dlx.CFGCutoff(0.5), "interval": dlx.GuidanceInterval(0.25, 0.75),
               "adaptive": dlx.AdaptiveCutoff(0.5), "sigma": dlx.CFGCutoff(sigma=1.0), "full": None}
    spec = build_spec(prompts=PROMPTS, seeds=[0], configs=configs, guidance_scales=scales, call=call, **kw)
    sched = build_spec(prompts=PROMPTS, seeds=[0], guidance_scales=[s for s in scales if s > 1], call=call,
                       configs={"linear": dlx.GuidanceSchedule("linear", low=1.0),
                                "constant": dlx.GuidanceSchedule("constant")}, **kw)
    spec.configs += [c for c in sched.configs if c.controls]
    return spec


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_every_row_of_a_mixed_scale_call_equals_its_standalone_run(dtype):
    from dlx.testing import tiny_pipeline

    pipe = tiny_pipeline("sd", dtype=dtype) if dtype != torch.float32 else pipe_for("sd")
    spec = mixed_spec()
    rows = spec.rows()
    cfgs = {c.name: c for c in spec.configs}
    out = engine.run_batch(pipe, spec, rows)
    assert out["scale"] == SCALES and out["call_scale"] == 6.0
    guided = {}
    for j, r in enumerate(rows):
        cfg = cfgs[r["config"]]
        s = spec.scale_of(cfg)
        ref = standalone(pipe, cfg, r["prompt"], r["seed"], s).float()
        close(out["images"][j], ref, dtype, r["config"])
        guided[r["config"]] = out["guided"][j]
        assert out["nfe"][j] == 4 + out["guided"][j], r["config"]
    # each sample followed its own plan at its own scale (4 steps)
    assert guided["full scale=1"] == guided["cut .5 scale=1"] == guided["adaptive scale=1"] == 0
    assert guided["full scale=3"] == guided["full scale=6"] == 4
    assert guided["cut .5 scale=6"] == guided["interval scale=3"] == 2
    assert guided["linear scale=3"] == guided["linear scale=6"] == 3  # scale exactly 1 at p = 0


def test_a_schedule_reads_its_own_rows_scale_not_the_calls(monkeypatch):
    # GuidanceSchedule's default `high` (and the constant schedule) come from the call's scale: in
    # a call run at 6 a scale-3 row must still get 3's schedule, as its standalone run at 3 does.
    pipe = pipe_for("sd")
    spec = build_spec(prompts=PROMPTS[:1], seeds=[0], guidance_scales=[3.0, 6.0], call=CALL,
                      configs={"linear": dlx.GuidanceSchedule("linear", low=1.0),
                               "constant": dlx.GuidanceSchedule("constant")})
    rows = spec.rows()
    cfgs = {c.name: c for c in spec.configs}
    made = {}
    real = Config.parts

    def keep(self):  # the fresh control instances each row runs with
        ps = real(self)
        made[self.name] = ps
        return ps

    monkeypatch.setattr(Config, "parts", keep)
    out = engine.run_batch(pipe, spec, rows)
    seen = {name: ps[0].report.get("scales") for name, ps in made.items() if ps}
    assert out["call_scale"] == 6.0
    # low 1, default high = 1 + (s - 1) / mean(0, 1/4, 1/2, 3/4): the mean of the schedule over
    # the 4 steps is the row's own scale s
    for s in (3.0, 6.0):
        high = 1 + (s - 1) / 0.375
        assert [v[0] for v in seen[f"linear scale={s:g}"]] == pytest.approx([1 + (high - 1) * i / 4 for i in range(4)])
        assert [v[0] for v in seen[f"constant scale={s:g}"]] == [s] * 4
    for j, r in enumerate(rows):
        cfg = cfgs[r["config"]]
        ref = standalone(pipe, cfg, r["prompt"], r["seed"], spec.scale_of(cfg)).float()
        assert (out["images"][j] - ref).abs().max().item() <= 1e-5, r["config"]


def test_a_scale_one_row_equals_a_plain_call_at_scale_one(tmp_path):
    # No dlx at all in the reference: the pipeline's own no-CFG path at guidance_scale=1.
    pipe = pipe_for("sd")
    res = dlx.sweep(pipe, prompts=PROMPTS[:1], seeds=[2], configs={"full CFG": None}, guidance_scales=[1.0, 5.0],
                    out=tmp_path, timing=(), progress=False, metrics=["psnr"], **CALL)
    (b,) = batches(res)
    assert b["scale"] == [1.0, 5.0]
    f = res.frame.set_index("guidance_scale")
    plain = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(2), output_type="pt", guidance_scale=1.0,
                 **CALL).images[0]
    got = png(f.loc[1.0, "image"]).astype(int)
    assert np.abs(got - as_png_array(plain).astype(int)).max() <= 1
    assert f.loc[1.0, "nfe"] == 4 and f.loc[5.0, "nfe"] == 8


def test_guidance_rescale_is_applied_per_sample_in_a_mixed_call():
    # rescale_noise_cfg reads a sample's combined and conditional predictions only: the tap
    # rescales each sample at its own scale, so mixing scales keeps rows equal to standalone.
    pipe = pipe_for("sd")
    call = {**CALL, "guidance_rescale": 0.7}
    assert scale_changes_inputs(pipe, call) is None
    spec = build_spec(prompts=PROMPTS[:1], seeds=[0], cutoffs=[0.5, 1.0], guidance_scales=[1.0, 3.0, 8.0], call=call)
    rows = spec.rows()
    cfgs = {c.name: c for c in spec.configs}
    out = engine.run_batch(pipe, spec, rows)
    for j, r in enumerate(rows):
        cfg = cfgs[r["config"]]
        ref = standalone(pipe, cfg, r["prompt"], r["seed"], spec.scale_of(cfg), call).float()
        assert (out["images"][j] - ref).abs().max().item() <= 1e-5, r["config"]


def test_psnr_compares_with_full_guidance_of_the_same_scale(tmp_path):
    pipe = pipe_for("sd")
    res = dlx.sweep(pipe, prompts=PROMPTS[:1], seeds=[0], cutoffs=[0.5, 1.0], guidance_scales=[3.0, 6.0],
                    out=tmp_path, timing=(), progress=False, metrics=["psnr"], **CALL)
    assert len(batches(res)) == 1
    f = res.frame.set_index("config")

    def img(name):
        return torch.from_numpy(png(f.loc[name, "image"]).copy()).permute(2, 0, 1)[None].float() / 255

    for s, other in (("3", "6"), ("6", "3")):
        own = psnr(img(f"cutoff=0.5 scale={s}"), [""], img(f"cutoff=1 scale={s}"))[0]
        wrong = psnr(img(f"cutoff=0.5 scale={s}"), [""], img(f"cutoff=1 scale={other}"))[0]
        assert f.loc[f"cutoff=0.5 scale={s}", "psnr"] == pytest.approx(own, abs=1e-4)
        assert abs(own - wrong) > 1.0  # the other scale's reference would give another number
        assert f.loc[f"cutoff=1 scale={s}", "psnr"] == 100.0


def test_prefix_sharing_never_merges_rows_of_different_scales(tmp_path):
    # cutoff=0 rows are unguided at every step at any scale, yet rows of different scales are
    # never merged: a mixed call evaluates exactly what one call per scale evaluates, and rows
    # of one scale still share their guided prefix (fewer evaluations than nominal).
    pipe = pipe_for("sd")
    kw = dict(prompts=PROMPTS[:1], seeds=[0], cutoffs=[0, 0.5, 1.0], timing=(), progress=False, metrics=["psnr"],
              **CALL)
    mixed = dlx.sweep(pipe, guidance_scales=[3.0, 6.0], out=tmp_path / "mixed", **kw)
    (b,) = batches(mixed)
    alone = [batches(dlx.sweep(pipe, guidance_scale=s, out=tmp_path / f"s{s:g}", **kw))[0] for s in (3.0, 6.0)]
    # per scale, cutoffs 0 / .5 / 1 over 4 steps: nominal 4 + 6 + 8 = 18 evaluations; shared
    # 14 (steps 0-1: .5 and 1 share one guided pair, 0 its own conditional row; then 3 + 1)
    assert [a["evaluations"] for a in alone] == [14, 14] and [a["nfe_sum"] for a in alone] == [18, 18]
    assert b["nfe_sum"] == 36 and b["evaluations"] == 28
    f = mixed.frame
    assert f.evaluations.sum() == pytest.approx(28)


def test_share_keys_hold_the_scale(monkeypatch):
    pipe = pipe_for("sd")
    spec = build_spec(prompts=PROMPTS[:1], seeds=[0], cutoffs=[0, 1.0], guidance_scales=[3.0, 6.0], call=CALL)
    keys = []
    real = dlx.Share.__init__
    monkeypatch.setattr(dlx.Share, "__init__", lambda self, k: keys.append(k) or real(self, k))
    engine.run_batch(pipe, spec, spec.rows())
    (k,) = keys
    assert len(set(k)) == 2 and {s for _, _, s in k} == {3.0, 6.0}


def test_a_schedule_at_scale_one_is_refused_before_any_model_work(tmp_path, monkeypatch):
    # A standalone GuidanceSchedule run at scale 1 is refused (no CFG to schedule): the sweep says
    # so when it checks its grid, naming the config and the scale, before running any row.
    pipe = pipe_for("sd")
    monkeypatch.setattr(engine, "run_batch", lambda *a, **k: pytest.fail("a row ran"))
    with pytest.raises(DlxError, match=r"config 'linear scale=1': GuidanceSchedule needs guidance_scale > 1.*"
                                       r"got guidance_scale=1\.0"):
        dlx.sweep(pipe, prompts=PROMPTS[:1], seeds=[0], guidance_scales=[1.0, 4.0], out=tmp_path, timing=(),
                  progress=False, metrics=["psnr"], configs={"linear": dlx.GuidanceSchedule("linear"), "full": None},
                  **CALL)
    assert not (tmp_path / "sweep.sqlite").exists()
    with pytest.raises(DlxError, match="guidance_scale > 1"):  # as the standalone run is
        with dlx.attach(pipe, dlx.GuidanceSchedule("linear")):
            pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="pt", **{**CALL, "guidance_scale": 1.0})


def _lcm_pipe():
    """A tiny SD pipeline whose UNet embeds the guidance scale (time_cond_proj_dim, as LCM's)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from dlx.testing import _UNET_COMMON

    base = pipe_for("sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_UNET_COMMON, in_channels=4, cross_attention_dim=32, attention_head_dim=8,
                                time_cond_proj_dim=16).eval()
    return StableDiffusionPipeline(**{**base.components, "unet": unet}, requires_safety_checker=False)


def test_where_the_scale_feeds_the_denoiser_each_scale_keeps_its_own_call(tmp_path):
    pipe = _lcm_pipe()
    assert "time_cond_proj_dim" in scale_changes_inputs(pipe, {})
    res = dlx.sweep(pipe, prompts=PROMPTS[:1], seeds=[0], configs={"full CFG": None}, guidance_scales=[2.0, 6.0],
                    out=tmp_path, timing=(), progress=False, metrics=["psnr"], **CALL)
    assert [e["scale"] for e in batches(res)] == [2.0, 6.0]
    f = res.frame.set_index("guidance_scale")
    for s in (2.0, 6.0):
        ref = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="pt", guidance_scale=s,
                   **CALL).images[0]
        assert np.array_equal(png(f.loc[s, "image"]), as_png_array(ref)), s
    spec = build_spec(prompts=PROMPTS[:1], seeds=[0], configs={"full CFG": None}, guidance_scales=[2.0, 6.0],
                      call=CALL)
    with pytest.raises(DlxError, match="cannot share one call.*time_cond_proj_dim"):
        engine.run_batch(pipe, spec, spec.rows())


def test_the_family_table_says_where_the_scale_only_combines():
    from dlx.families import FAMILIES

    assert {n: f.scale_only_combines for n, f in FAMILIES.items()} == {
        "sd": True, "sd-controlnet": True, "sdxl": True, "sd3": True, "flux": False}
    assert "flux" in scale_changes_inputs(pipe_for("flux"), {})
    sd3 = pipe_for("sd3")
    assert scale_changes_inputs(sd3, {}) is None
    assert "skip-layer" in scale_changes_inputs(sd3, {"skip_guidance_layers": [0]})


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_other_families_mix_scales_exactly(family):
    # SDXL (micro-conditioning doubled too) and SD3 (a transformer, flow matching): the scale acts
    # only in the CFG combination, so a mixed call's rows equal their standalone runs
    from dlx.testing import example_inputs

    inputs = example_inputs(family, steps=4)
    call = {"num_inference_steps": 4, "height": inputs["height"], "width": inputs["width"]}
    spec = build_spec(prompts=PROMPTS[:1], seeds=[0], cutoffs=[0.5, 1.0], guidance_scales=[1.0, 4.0], call=call)
    pipe = pipe_for(family)
    assert engine.mixes_scales(pipe, spec.call)
    rows = spec.rows()
    cfgs = {c.name: c for c in spec.configs}
    out = engine.run_batch(pipe, spec, rows)
    assert out["scale"] == [1.0, 4.0]
    for j, r in enumerate(rows):
        cfg = cfgs[r["config"]]
        ref = standalone(pipe, cfg, r["prompt"], r["seed"], spec.scale_of(cfg), call).float()
        assert (out["images"][j] - ref).abs().max().item() <= 1e-5, (family, r["config"])
