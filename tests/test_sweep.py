"""dlx.sweep: rows equal standalone runs, results survive, bad input is refused before model work."""

from __future__ import annotations

import json
import math
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image

import dlx
from dlx import DlxError
from dlx import _diffusers as D
from dlx.sweeps import engine
from dlx.sweeps.spec import build_spec

from .helpers import pipe_for

CALL = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32)
PROMPTS = ["a red circle", "a blue square"]


def standalone(pipe, cfg, prompt, seed, call=CALL):
    """The same config run alone, as a user would: its controls attached, the seed's generator."""
    with dlx.attach(pipe, *cfg.parts()):
        return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", **call).images[0]


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def as_png_array(img: torch.Tensor) -> np.ndarray:
    return (img.permute(1, 2, 0).float().numpy() * 255).round().clip(0, 255).astype("uint8")


def mixed_spec(**kw):
    configs = {"cut .5": dlx.CFGCutoff(0.5), "interval": dlx.GuidanceInterval(0.25, 0.75),
               "linear": dlx.GuidanceSchedule("linear", low=1.0, high=8.0), "adaptive": dlx.AdaptiveCutoff(0.5),
               "sigma": dlx.CFGCutoff(sigma=1.0), "full": None}
    return build_spec(prompts=PROMPTS, seeds=[0, 1], configs=configs, call=CALL, **kw)


def test_unbatched_rows_equal_standalone_runs_bitwise(tmp_path):
    pipe = pipe_for("sd")
    res = dlx.sweep(pipe, prompts=PROMPTS, seeds=[0, 3], cutoffs=[0, 0.5, 1.0], out=tmp_path, max_batch=1,
                    timing=(), progress=False, **CALL)
    f = res.frame
    assert len(f) == 12 and (f.status == "ok").all() and (f.batch == 1).all()
    cfgs = {c.name: c for c in res.spec.configs}
    for r in f.itertuples():
        ref = as_png_array(standalone(pipe, cfgs[r.config], r.prompt, r.seed))
        assert np.array_equal(png(r.image), ref), r.config
    # NFE per sample: 4 conditional evaluations plus one unconditional per guided step
    assert f.groupby("config").nfe.first().to_dict() == {"cutoff=0": 4.0, "cutoff=0.5": 6.0, "cutoff=1": 8.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_batched_rows_equal_standalone_within_tolerance(dtype):
    # Stated tolerance: fp32 max |difference| <= 1e-5 on the decoded image (batched matmuls
    # round differently; measured ~1.4e-6); fp16 PSNR >= 40 dB (measured ~75 dB).
    from dlx.testing import tiny_pipeline

    pipe = tiny_pipeline("sd", dtype=dtype) if dtype != torch.float32 else pipe_for("sd")
    spec = mixed_spec()
    rows = spec.rows()
    out = engine.run_batch(pipe, spec, rows)
    cfgs = {c.name: c for c in spec.configs}
    for j, r in enumerate(rows):
        ref = standalone(pipe, cfgs[r["config"]], r["prompt"], r["seed"]).float()
        got = out["images"][j]
        if dtype == torch.float32:
            assert (got - ref).abs().max().item() <= 1e-5, r["config"]
        else:
            mse = ((got - ref) ** 2).mean().item()
            assert mse == 0 or 10 * math.log10(1 / mse) >= 40, r["config"]
    # each sample followed its own plan: guided steps per config (4 steps)
    guided = {r["config"]: g for r, g in zip(rows, out["guided"])}
    assert guided["cut .5"] == 2 and guided["interval"] == 2 and guided["full"] == 4
    assert guided["linear"] == 3  # the scale is exactly 1 at p = 0: that step skips the uncond pass


def test_resume_computes_nothing_when_done_and_refuses_another_spec(tmp_path):
    pipe = pipe_for("sd")
    kw = dict(prompts=PROMPTS, seeds=[0], cutoffs=[0, 1.0], out=tmp_path, timing=(), progress=False, **CALL)
    first = dlx.sweep(pipe, **kw).frame
    batches = [e for e in dlx.sweeps.SweepResult(tmp_path).events if e["kind"] == "batch"]
    second = dlx.sweep(pipe, **kw)
    assert [e for e in second.events if e["kind"] == "batch"] == batches
    assert second.frame.equals(first)
    with pytest.raises(DlxError, match=r"different sweep.*seeds: stored \[0\], given \[0, 1\]"):
        dlx.sweep(pipe, **{**kw, "seeds": [0, 1]})


def test_resume_refuses_other_weights_under_the_same_name(tmp_path):
    # the same name, class, dtype and scheduler, other weights (a fine-tune, a fused LoRA): the
    # stored rows were made by another model, so resuming into them is refused
    pipe = pipe_for("sd")
    kw = dict(prompts=PROMPTS[:1], seeds=[0], cutoffs=[0, 1.0], out=tmp_path, timing=(), progress=False, **CALL)
    fp = dlx.sweeps.weights_fingerprint(pipe)
    assert fp is not None and dlx.sweeps.weights_fingerprint(pipe) == fp  # stable
    dlx.sweep(pipe, **{**kw, "seeds": [0]})
    w = pipe.unet.conv_in.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.view(-1)[w.numel() // 2] += 1e-3  # one value, in the middle of one tensor
        other = dlx.sweeps.weights_fingerprint(pipe)
        assert other != fp
        with pytest.raises(DlxError, match=rf"argument `pipe`: its weights differ.*stored {fp}, given {other}"):
            dlx.sweep(pipe, **kw)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert dlx.sweeps.weights_fingerprint(pipe) == fp
    assert (dlx.sweep(pipe, **kw).frame.status == "ok").all()


def test_finished_sweep_loads_no_weights(tmp_path, monkeypatch):
    folder = tmp_path / "pipe"
    pipe_for("sd").save_pretrained(folder)
    kw = dict(prompts=PROMPTS[:1], seeds=[0], cutoffs=[0, 1.0], out=tmp_path / "out", timing=(), progress=False,
              **CALL)
    res = dlx.sweep(str(folder), **kw)
    assert (res.frame.status == "ok").all()

    def refuse(*a, **k):
        raise AssertionError("a finished sweep must not load the model")

    monkeypatch.setattr("dlx.sweeps.api.load_pipeline", refuse)
    assert dlx.sweep(str(folder), **kw).frame.equals(res.frame)


def test_failed_rows_are_stored_and_oom_halves_the_batch(tmp_path, monkeypatch):
    real = engine.run_batch

    def flaky(pipe, spec, rows, **kw):
        if len(rows) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        if any(r["seed"] == 1 and r["config"] == "cutoff=0" for r in rows):
            raise RuntimeError("boom")
        return real(pipe, spec, rows, **kw)

    monkeypatch.setattr(engine, "run_batch", flaky)
    res = dlx.sweep(pipe_for("sd"), prompts=PROMPTS[:1], seeds=[0, 1], cutoffs=[0, 1.0], out=tmp_path, timing=(),
                    progress=False, share=False, **CALL)
    f = res.frame.set_index(["config", "seed"])
    assert f.loc[("cutoff=0", 1), "status"] == "failed" and "RuntimeError: boom" in f.loc[("cutoff=0", 1), "error"]
    assert (res.frame.status == "ok").sum() >= 2
    ooms = [e for e in res.events if e["kind"] == "oom"]
    assert ooms and ooms[0]["batch"] == 4 and ooms[0]["retry_with"] == 2
    assert (res.frame[res.frame.status == "ok"].batch <= 2).all()


def test_after_oom_the_rest_of_the_batch_runs_at_the_lowered_size(tmp_path, monkeypatch):
    real = engine.run_batch
    sizes = []

    def small_memory(pipe, spec, rows, **kw):
        sizes.append(len(rows))
        if len(rows) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(pipe, spec, rows, **kw)

    monkeypatch.setattr(engine, "run_batch", small_memory)
    res = dlx.sweep(pipe_for("sd"), prompts=PROMPTS[:1], seeds=[0, 1, 2, 3], cutoffs=[0, 1.0], out=tmp_path,
                    timing=(), progress=False, share=False, max_batch=8, **CALL)
    assert (res.frame.status == "ok").all()
    # 8 fails, 4 fails, then every piece at 2: the second half of the 8 is not tried at 4 again
    assert sizes == [8, 4, 2, 2, 2, 2]
    assert [(e["batch"], e["retry_with"]) for e in res.events if e["kind"] == "oom"] == [(8, 4), (4, 2)]


def test_store_is_wal_with_one_row_per_key(tmp_path):
    dlx.sweep(pipe_for("sd"), prompts=PROMPTS[:1], seeds=[0], cutoffs=[0.5, 1.0], out=tmp_path, timing=(),
              progress=False, **CALL)
    con = sqlite3.connect(tmp_path / "sweep.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    spec = json.loads(con.execute("SELECT value FROM meta WHERE key='spec'").fetchone()[0])
    assert spec["call"] == CALL and [c["name"] for c in spec["configs"]] == ["cutoff=0.5", "cutoff=1"]
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT row_id) FROM rows").fetchone() == (2, 2)


def test_summary_has_means_and_intervals_and_plot_returns_fig_ax(tmp_path):
    import matplotlib

    res = dlx.sweep(pipe_for("sd"), prompts=PROMPTS, seeds=[0, 1], cutoffs=[0, 0.5, 1.0], out=tmp_path,
                    timing=("eager",), timing_repeats=1, progress=False, **CALL)
    s = res.summary().set_index("config")
    f = res.frame
    for c in s.index.drop("cutoff=1"):
        vals = f[f.config == c].psnr
        assert s.loc[c, "psnr"] == pytest.approx(vals.mean())
        assert s.loc[c, "psnr_lo"] <= s.loc[c, "psnr"] <= s.loc[c, "psnr_hi"]
    # the reference compared with itself: identical images, PSNR +inf (not a 100 dB stand-in)
    assert s.loc["cutoff=1", "is_reference"] and not s.is_reference.drop("cutoff=1").any()
    assert s.loc["cutoff=1", "psnr"] == math.inf and s.loc["cutoff=1", "ssim"] == pytest.approx(1.0)
    # predicted standalone time grows with the guided steps; the regime is named
    t = s.time_eager_s
    assert t["cutoff=0"] < t["cutoff=0.5"] < t["cutoff=1"]
    assert s.regime_eager.iloc[0] in ("host-bound", "denoiser-bound")
    # the same time as a share of full guidance's: 1 for the reference, the ratio of means otherwise
    assert s.loc["cutoff=1", "time_eager_vs_full"] == 1.0
    assert s.loc["cutoff=0", "time_eager_vs_full"] == pytest.approx(t["cutoff=0"] / t["cutoff=1"], rel=1e-12)
    assert s.loc["cutoff=0", "time_eager_vs_full"] < s.loc["cutoff=0.5", "time_eager_vs_full"] < 1
    fig, ax = res.plot()
    assert isinstance(fig, matplotlib.figure.Figure) and ax.get_xlabel().startswith("predicted wall time")
    assert len(res.images(config="cutoff=0")) == 4


def test_reference_config_is_added_when_missing():
    spec = build_spec(prompts=PROMPTS, seeds=[0], cutoffs=[0, 0.5], call=CALL)
    assert [c.name for c in spec.configs] == ["cutoff=0", "cutoff=0.5", "full CFG"]
    spec = build_spec(prompts=PROMPTS, seeds=[0], configs={"a": dlx.GuidanceInterval(0.2, 0.8)},
                      guidance_scales=[3, 6], call=CALL)
    assert [c.name for c in spec.configs] == ["a scale=3", "a scale=6", "full CFG scale=3", "full CFG scale=6"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(cutoffs=[]), "`cutoffs`"),
    (dict(cutoffs=[0, 1.5]), r"`cutoffs`.*1\.5"),
    (dict(cutoffs=[float("nan")]), "`cutoffs`"),
    (dict(prompts=[]), "`prompts`"),
    (dict(prompts=[""]), "`prompts`"),
    (dict(seeds=[]), "`seeds`"),
    (dict(seeds=[-1]), "`seeds`"),
    (dict(metrics=["fid"]), "`metrics`.*'fid'"),
    (dict(metrics=["lpips"]), "`metrics`.*'lpips' needs its network"),
    (dict(metrics=["adherence"], prompts=["a cat on a mat"]), "`prompts`.*'a cat on a mat'"),
    (dict(configs={}), "`configs`"),
    (dict(configs={"x": "not a control"}), "`configs`"),
    (dict(max_batch=0), "`max_batch`"),
    (dict(generator=1), "`generator`"),
    (dict(timing=("fast",)), "`timing`"),
    (dict(num_inference_steps=0), "`num_inference_steps`"),
])
def test_bad_input_is_refused_before_model_work(tmp_path, kwargs, match):
    class NoModel:  # a pipeline that fails if anything calls it
        def __call__(self, *a, **k):
            raise AssertionError("model work started")

    kw = dict(prompts=PROMPTS, seeds=[0], cutoffs=[0, 1.0], out=tmp_path, **CALL)
    kw.update(kwargs)
    if "cutoffs" in kwargs or "configs" in kwargs:
        kw = {k: v for k, v in kw.items() if k not in ("cutoffs", "configs")} | {
            k: v for k, v in kwargs.items() if k in ("cutoffs", "configs")}
    with pytest.raises(DlxError, match=match):
        dlx.sweep("shapes", **kw)


def test_out_that_cannot_be_written_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DlxError, match="`out`.*is a file"):
        dlx.sweep("shapes", prompts=["a red circle"], seeds=[0], cutoffs=[0], out=f)
    with pytest.raises(DlxError, match="`out`: cannot write"):
        dlx.sweep("shapes", prompts=["a red circle"], seeds=[0], cutoffs=[0], out=f / "sub")


def test_keep_previews_stores_per_step_x0_previews(tmp_path):
    from dlx.render import render_steps, to_pil

    pipe = pipe_for("sd")
    res = dlx.sweep(pipe, prompts=PROMPTS[:1], seeds=[0], cutoffs=[0.5, 1.0], out=tmp_path, max_batch=1,
                    keep_previews=True, timing=(), progress=False, **CALL)
    f = res.frame
    for r in f.itertuples():
        p = res.previews(r.row_id)
        assert p.dtype == torch.uint8 and tuple(p.shape) == (4, 128, 128, 3)
        with dlx.record(pipe, *{c.name: c for c in res.spec.configs}[r.config].parts(), keep=("x0",)) as tr:
            pipe(r.prompt, generator=torch.Generator().manual_seed(r.seed), output_type="pt", **CALL)
        want = render_steps(tr, "x0")
        assert all(np.array_equal(p[i].numpy(), np.asarray(to_pil(want[i, 0], 128))) for i in range(4))
    with pytest.raises(DlxError, match="keep_previews=True"):
        dlx.sweeps.SweepResult(tmp_path).previews("nope")


def test_padding_the_denoiser_batch_to_few_shapes_keeps_results(tmp_path):
    # Under CUDA graphs each denoiser batch size is a graph; pad=True pads to buckets (here on the
    # CPU, eager: the results must not change beyond batch-size rounding, and the sizes are logged).
    assert [D.buckets(n) for n in (1, 2, 3, 5, 7, 9, 13, 20, 40, 50, 96, 97)] == \
        [1, 2, 3, 6, 8, 12, 16, 24, 48, 64, 96, 128]
    pipe = pipe_for("sd")
    kw = dict(prompts=PROMPTS, seeds=[0], cutoffs=[0, 0.5, 1.0], timing=(), progress=False, share=False, **CALL)
    plain = dlx.sweep(pipe, out=tmp_path / "a", **kw).frame
    padded = dlx.sweep(pipe, out=tmp_path / "b", pad=True, **kw)
    shapes = next(e for e in padded.events if e["kind"] == "shapes")
    # 6 rows: 6 + 4 guided rows, then 6 + 2: denoiser batches 10 and 8 -> buckets 12 and 8
    assert shapes["padded_sizes"] == [8, 12] and shapes["graphs"] == 2
    for a, b in zip(plain.image, padded.frame.image):
        assert np.abs(png(a).astype(int) - png(b).astype(int)).max() <= 1
    assert "forward" not in pipe.unet.__dict__  # the padding wrapper is gone


def test_explicit_pairs_instead_of_a_cross_product(tmp_path):
    pairs = [("a red circle", 3), ("a blue square", 5), ("a red circle", 5)]
    res = dlx.sweep(pipe_for("sd"), pairs=pairs, cutoffs=[0, 1.0], out=tmp_path, timing=(), progress=False, **CALL)
    f = res.frame
    assert sorted(zip(f.prompt, f.seed)) == sorted(pairs * 2)
    assert res.spec.to_json()["pairs"] == [list(p) for p in pairs]
    with pytest.raises(DlxError, match="`pairs`.*duplicates"):
        build_spec(pairs=pairs + pairs[:1], cutoffs=[0], call=CALL)
    with pytest.raises(DlxError, match="either `pairs` or `prompts`"):
        build_spec(pairs=pairs, prompts=PROMPTS, cutoffs=[0], call=CALL)


def test_rows_of_one_prompt_and_seed_share_their_guided_prefix(tmp_path):
    # 6 cutoffs over 25 steps: 225 sample-evaluations as a loop, 125 with the prefix shared
    # (dlx.Share); every row still equals its standalone run within the batched tolerance.
    pipe = pipe_for("sd")
    call = {**CALL, "num_inference_steps": 25}
    res = dlx.sweep(pipe, prompts=PROMPTS[:1], seeds=[0], cutoffs=[0, 0.2, 0.4, 0.6, 0.8, 1.0], out=tmp_path,
                    timing=(), progress=False, metrics=["psnr"], **call)
    (batch,) = [e for e in res.events if e["kind"] == "batch"]
    assert batch["nfe_sum"] == 225 and batch["evaluations"] == 125
    f = res.frame
    assert f.evaluations.sum() == pytest.approx(125)
    cfgs = {c.name: c for c in res.spec.configs}
    for r in f.itertuples():
        ref = as_png_array(standalone(pipe, cfgs[r.config], r.prompt, r.seed, call))
        assert np.abs(png(r.image).astype(int) - ref.astype(int)).max() <= 1, r.config


def test_a_row_that_decodes_to_nan_is_stored_failed_and_the_rest_go_on(tmp_path, monkeypatch):
    real = engine.run_batch

    def nan_row(pipe, spec, rows, **kw):
        out = real(pipe, spec, rows, **kw)
        for j, r in enumerate(rows):
            if r["config"] == "cutoff=0" and r["seed"] == 0:
                out["images"][j, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(engine, "run_batch", nan_row)
    res = dlx.sweep(pipe_for("sd"), prompts=PROMPTS[:1], seeds=[0, 1], cutoffs=[0, 1.0], out=tmp_path, timing=(),
                    progress=False, **CALL)
    f = res.frame.set_index(["config", "seed"])
    assert f.loc[("cutoff=0", 0), "status"] == "failed" and "NaN" in f.loc[("cutoff=0", 0), "error"]
    assert not isinstance(f.loc[("cutoff=0", 0), "image"], str)  # no image for a failed row
    assert (f.drop(index=[("cutoff=0", 0)]).status == "ok").all()
    s = res.summary().set_index("config")
    assert s.loc["cutoff=0", "failed"] == 1 and s.loc["cutoff=0", "psnr"] == pytest.approx(f.loc[("cutoff=0", 1), "psnr"])
