"""dlx.sweep's numbers stay trustworthy across resumes, retries and odd arguments (the hostile-user
review of 2026-12-03): a resume with another scheduler config or an edited metric is refused, a
retried reference recomputes what depends on it, times follow the timing batch asked for, and
arguments are checked against the pipeline before any model work."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest

import dlx
from dlx import DlxError
from dlx.sweeps import engine, model
from dlx.sweeps.result import bootstrap_ci
from dlx.sweeps.spec import build_spec

from .helpers import pipe_for

CALL = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32)


def _sweep(out, **kw):
    args = dict(prompts=["a red circle"], seeds=[0], cutoffs=[0.5, 1.0], out=out, timing=(), progress=False, **CALL)
    args.update(kw)
    return dlx.sweep(args.pop("pipe", pipe_for("sd")), **args)


# -- resume: what made the stored rows must not change under them ------------------------------------

def test_resume_with_another_scheduler_config_is_refused(tmp_path):
    pipe = pipe_for("sd")
    _sweep(tmp_path)
    old = pipe.scheduler
    pipe.scheduler = type(old).from_config(old.config, timestep_spacing="trailing")
    try:
        with pytest.raises(DlxError, match=r"different sweep.*scheduler_config.*timestep_spacing"):
            _sweep(tmp_path)
    finally:
        pipe.scheduler = old
    assert len(_sweep(tmp_path).frame) == 2  # the original scheduler resumes


def test_an_edited_metric_is_refused_on_resume_and_the_same_one_resumes(tmp_path):
    def sharp(images, prompts, reference_images):
        return [1.0] * len(images)

    first = sharp
    _sweep(tmp_path, metrics=[first])
    assert _sweep(tmp_path, metrics=[first]).frame.sharp.tolist() == [1.0, 1.0]

    def sharp(images, prompts, reference_images):  # noqa: F811 - the "fixed" body, same name
        return [2.0] * len(images)

    with pytest.raises(DlxError, match=r"`metrics`: metric 'sharp' is not the one that made the values"):
        _sweep(tmp_path, metrics=[sharp])


def test_retrying_a_failed_reference_recomputes_the_rows_compared_with_it(tmp_path, monkeypatch):
    real = engine.run_batch

    def failing_reference(pipe, spec, rows, **kw):
        if any(r["config"] == "cutoff=1" for r in rows):
            raise RuntimeError("simulated failure of the reference row")
        return real(pipe, spec, rows, **kw)

    monkeypatch.setattr(engine, "run_batch", failing_reference)
    with pytest.warns(dlx.sweeps.SweepWarning, match="1 of 2 rows failed; first error: RuntimeError: simulated"):
        f = _sweep(tmp_path / "a", max_batch=1).frame.set_index("config")
    assert f.loc["cutoff=1", "status"] == "failed" and f.loc["cutoff=0.5", "status"] == "ok"
    assert math.isnan(f.loc["cutoff=0.5", "psnr"])  # nothing to compare with
    monkeypatch.setattr(engine, "run_batch", real)
    f = _sweep(tmp_path / "a", max_batch=1, retry_failed=True).frame.set_index("config")
    clean = _sweep(tmp_path / "b", max_batch=1).frame.set_index("config")
    assert (f.status == "ok").all()
    assert f.loc["cutoff=0.5", "psnr"] == clean.loc["cutoff=0.5", "psnr"] < 100  # recomputed, not left NaN


def test_a_model_that_fails_to_load_leaves_out_free_for_the_corrected_call(tmp_path):
    with pytest.raises(DlxError, match="could not load 'noorg/nomodel'"):
        _sweep(tmp_path, pipe="noorg/nomodel")
    assert len(_sweep(tmp_path).frame) == 2  # not "holds a different sweep"


def test_the_embedded_model_by_name_and_as_loaded_is_one_sweep(tmp_path, monkeypatch):
    kw = dict(prompts=["a red circle"], seeds=[0], cutoffs=[1.0], metrics=["psnr"], timing=(), progress=False,
              num_inference_steps=2, guidance_scale=6.0, out=tmp_path)
    by_name = dlx.sweep("shapes", **kw)
    monkeypatch.setattr(engine, "run_batch", lambda *a, **k: pytest.fail("a finished sweep must not run rows"))
    assert dlx.sweep(dlx.zoo.load("shapes"), **kw).frame.equals(by_name.frame)
    other = dlx.zoo.load("shapes")
    other.scheduler = type(other.scheduler).from_config(other.scheduler.config, timestep_spacing="leading")
    with pytest.raises(DlxError, match=r"different sweep.*model"):
        dlx.sweep(other, **kw)


def test_linspace_and_literal_cutoffs_are_one_sweep(tmp_path):
    a = build_spec(prompts=["p"], seeds=[0], cutoffs=np.linspace(0, 1, 6).tolist(), call=CALL)
    b = build_spec(prompts=["p"], seeds=[0], cutoffs=[0, 0.2, 0.4, 0.6, 0.8, 1.0], call=CALL)
    assert a.digest() == b.digest() and a.configs[3].name == "cutoff=0.6"


def test_a_refused_spec_says_where_it_differs(tmp_path):
    _sweep(tmp_path, seeds=[0, 1])
    with pytest.raises(DlxError, match=r"seeds\[1\]: stored 1, given 2"):
        _sweep(tmp_path, seeds=[0, 2])


# -- the numbers the summary shows ---------------------------------------------------------------------

def test_a_metric_without_any_value_summarises_to_nan_not_zero(tmp_path):
    def mse(images, prompts, reference_images):
        return [float("nan")] * len(images)

    mse.higher_is_better = False
    s = _sweep(tmp_path, metrics=[mse]).summary()
    assert s.mse.isna().all() and s.mse_lo.isna().all() and s.mse_hi.isna().all()


def test_an_interval_needs_two_values():
    assert all(math.isnan(x) for x in bootstrap_ci([3.0]))
    assert all(math.isnan(x) for x in bootstrap_ci([float("nan"), 3.0]))
    assert bootstrap_ci([2.0, 2.0]) == (2.0, 2.0)


def test_a_user_metric_gets_the_full_guidance_images(tmp_path):
    seen = []

    def diff(images, prompts, reference_images):
        seen.append(reference_images is not None)
        return (images.float() - reference_images.float()).abs().flatten(1).mean(1)

    f = _sweep(tmp_path, metrics=[diff]).frame.set_index("config")
    assert seen and all(seen)
    assert f.loc["cutoff=1", "diff"] == 0.0 < f.loc["cutoff=0.5", "diff"]


def test_times_are_for_the_timing_batch_of_the_last_call(tmp_path):
    r2 = _sweep(tmp_path, timing=("eager",), timing_batch=2, timing_repeats=1)
    r1 = _sweep(tmp_path, timing=("eager",), timing_batch=1, timing_repeats=1)
    assert (r2.timing_batch, r1.timing_batch) == (2, 1)
    from dlx.sweeps.cost import predict_ms

    c1 = r1.costs("eager")[(3, 5.0)]
    assert c1["batch"] == 1
    row = r1.frame.set_index("config").loc["cutoff=1"]
    assert row.time_eager_s == pytest.approx(predict_ms(c1, row.guided_steps, 3) / 1e3, rel=1e-12)
    assert {c["batch"] for c in r1._costs} == {1, 2}  # the batch-2 measurement is kept


def test_configs_at_scale_one_have_no_cfg_regime(tmp_path):
    s = _sweep(tmp_path, guidance_scales=[1.0, 5.0], timing=("eager",), timing_repeats=1).summary()
    s = s.set_index("config")
    assert s.loc["cutoff=0.5 scale=1", "regime_eager"] == "no CFG"
    assert s.loc["cutoff=0.5 scale=5", "regime_eager"] in ("host-bound", "denoiser-bound")


# -- arguments checked against the pipeline, before any model work -----------------------------------

def test_a_misspelt_pipeline_argument_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(DlxError, match=r"`num_inference_step` is not a parameter of StableDiffusionPipeline"
                                       r".*did you mean `num_inference_steps`"):
        _sweep(tmp_path, num_inference_step=2)
    assert not (tmp_path / "sweep.sqlite").exists()


def test_the_pipelines_own_defaults_fill_scale_and_steps():
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    assert model.check_call(StableDiffusionPipeline, {}) == {}  # 7.5 and 50: the spec stays as it was
    assert model.check_call(StableDiffusionXLPipeline, {}) == {"guidance_scale": 5.0}
    assert model.check_call(StableDiffusion3Pipeline, {}) == {"guidance_scale": 7.0, "num_inference_steps": 28}
    assert model.check_call(StableDiffusionXLPipeline, {"guidance_scale": 3.0}) == {"guidance_scale": 3.0}
    assert model.check_call(StableDiffusionXLPipeline, {}, guidance_scales=[3, 6]) == {}


@pytest.mark.parametrize("kw, match", [
    (dict(seeds=[2 ** 63]), r"`seeds` must hold seeds below 2\*\*63; got 9223372036854775808"),
    (dict(negative_prompt=["blurry", "dark"]), r"`negative_prompt` must be one string shared by every row"),
    (dict(cutoffs=[0.1, 0.1000001]), r"argument `cutoffs`: \[0.1, 0.1000001\] holds ratios too close"),
])
def test_bad_sweep_arguments_are_refused_before_the_store(tmp_path, kw, match):
    with pytest.raises(DlxError, match=match):
        _sweep(tmp_path, **kw)
    assert not (tmp_path / "sweep.sqlite").exists()


def test_a_metric_named_like_a_result_column_is_refused(tmp_path):
    def seed(images, prompts, reference_images):
        return [0.0] * len(images)

    with pytest.raises(DlxError, match=r"`metrics`: a metric named 'seed' would clash"):
        _sweep(tmp_path, metrics=[seed])
    assert not (tmp_path / "sweep.sqlite").exists()


def test_summary_and_images_arguments_are_checked(tmp_path):
    res = _sweep(tmp_path)
    with pytest.raises(DlxError, match=r"`level` must be a confidence level in \(0, 1\).*got 95"):
        res.summary(level=95)
    with pytest.raises(DlxError, match=r"`n_boot` must be a positive int; got 0"):
        res.summary(n_boot=0)
    with pytest.raises(DlxError, match=r"`config`: 'typo' is not in this sweep"):
        res.images(config="typo")
    with pytest.raises(DlxError, match=r"`seed`: '0' is not in this sweep"):
        res.images(seed="0")


# -- the YAML spec -----------------------------------------------------------------------------------

def test_yaml_call_may_not_hold_sweep_settings_and_out_is_relative_to_the_file(tmp_path):
    from dlx.sweeps.yaml_spec import read_yaml

    (tmp_path / "sub").mkdir()
    bad = tmp_path / "sub" / "bad.yaml"
    bad.write_text("model: shapes\nout: runs/x\nprompts: [a red circle]\ncutoffs: [0, 1]\ncall: {out: elsewhere}\n")
    with pytest.raises(DlxError, match=r"spec `call.out`: \['out'\] are sweep settings"):
        read_yaml(bad)
    good = tmp_path / "sub" / "good.yaml"
    good.write_text(textwrap.dedent("""\
        model: shapes
        out: runs/x
        prompts: [a red circle]
        cutoffs: [0, 1]
        retry_failed: true
        call: {num_inference_steps: 4}
    """))
    kw = read_yaml(good)
    assert kw["out"] == str(tmp_path / "sub" / "runs" / "x") and kw["retry_failed"] is True
    assert kw["num_inference_steps"] == 4
