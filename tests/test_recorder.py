"""Recorder and record(): every step seen, output untouched, pipeline left as found."""

import json
import math

import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, SDCFGCutoffCallback

import dlx
from dlx.families import family_of
from dlx.session import Part
from dlx.testing import FAMILIES, example_inputs

from .helpers import bitwise, pipe_for, pipeline_state, run


@pytest.mark.parametrize("family", FAMILIES)
def test_records_every_step_without_changing_the_output(family):
    pipe = pipe_for(family)
    ref = run(pipe, family)
    before = pipeline_state(pipe)
    with dlx.record(pipe) as trace:
        out = run(pipe, family)
    assert bitwise(out, ref), "recording changed the output"
    assert pipeline_state(pipe) == before
    assert len(trace) == pipe.num_timesteps == 4
    assert bitwise(trace[-1].latents, out), "final recorded latents differ from output_type='latent'"
    fam = family_of(pipe)
    for i, s in enumerate(trace):
        assert s.index == i
        assert s.latents.shape == out.shape
        assert s.cond.shape == out.shape and s.uncond.shape == out.shape and s.x0.shape == out.shape
        assert s.cfg_active == [True] and s.nfe == [2.0] and s.guided
        assert s.step_ms > 0 and math.isfinite(s.sigma)
        assert not torch.equal(s.cond, s.uncond)
    assert len(trace.conditioning) == 1, "unchanged embeddings must be stored once"
    assert set(trace.conditioning[0]) == set(fam.conditioning)
    b = out.shape[0]
    assert trace.conditioning[0]["prompt_embeds"].shape[0] == (b if fam.cfg == "calls" else 2 * b)
    assert trace.meta["pipeline"] == type(pipe).__name__ and trace.meta["family"] == fam.name
    assert trace.meta["stop_reason"] == "completed" and trace.nfe == [8.0]
    assert trace.meta["seed"] == 0 and trace.meta["versions"]["dlx"] == dlx.__version__


def test_latents_in_the_trace_are_each_step_of_the_run():
    pipe = pipe_for("sd")
    seen = []

    def spy(p, i, t, kw):
        seen.append(kw["latents"].clone())
        return kw

    with dlx.record(pipe) as trace:
        run(pipe, "sd", callback_on_step_end=spy, callback_on_step_end_tensor_inputs=["latents"])
    assert len(seen) == len(trace)
    for s, lat in zip(trace, seen):
        assert bitwise(s.latents, lat)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "ddim-v"])
def test_x0_matches_the_schedulers_own_estimate(scheduler):
    if scheduler == "ddim-v":  # the same outputs read as v-prediction
        from diffusers import DDIMScheduler

        pipe = pipe_for("sd")
        pipe = type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(
            pipe.scheduler.config, prediction_type="v_prediction")})
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = pipe_for("sd", scheduler)
    sched = pipe.scheduler
    orig = sched.step
    x0s = []

    def step(*a, **k):
        k["return_dict"] = True
        res = orig(*a, **k)
        x0s.append(res.pred_original_sample.clone())
        return (res.prev_sample,)

    sched.step = step
    try:
        with dlx.record(pipe) as trace:
            run(pipe, "sd")
    finally:
        del sched.step
    assert len(x0s) == len(trace)
    for s, ref in zip(trace, x0s):
        # float32 arithmetic along two routes: agree to 1e-4 relative
        assert torch.allclose(s.x0, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux", "sd-controlnet"])
def test_pipeline_restored_after_an_exception_inside_the_loop(family):
    pipe = pipe_for(family)
    ref = run(pipe, family)
    before = pipeline_state(pipe)

    def boom(p, i, t, kw):
        if i == 1:
            raise RuntimeError("boom at step 1")
        return kw

    with pytest.raises(RuntimeError, match="boom"):
        with dlx.record(pipe, dlx.CFGCutoff(ratio=0.5)) as trace:
            run(pipe, family, callback_on_step_end=boom)
    assert pipeline_state(pipe) == before
    assert "boom" in trace.stop_reason and len(trace) == 1
    assert bitwise(run(pipe, family), ref), "the pipeline no longer produces its old output"


class _Explode(Part):
    wants_calls = True

    def on_denoiser(self, run, call):
        if call.step == 2:
            raise KeyboardInterrupt  # also a user pressing stop in Jupyter


def test_restored_after_interrupt_from_inside_the_denoiser():
    pipe = pipe_for("sd")
    run(pipe, "sd")
    before = pipeline_state(pipe)
    with pytest.raises(KeyboardInterrupt):
        with dlx.record(pipe, _Explode()) as trace:
            run(pipe, "sd")
    assert pipeline_state(pipe) == before
    assert len(trace) == 2 and trace.stop_reason.startswith("error: KeyboardInterrupt")


def test_plain_callback_records_what_callbacks_see_and_composes_with_official_callbacks():
    pipe = pipe_for("sd")
    rec = dlx.Recorder(pipe)
    assert rec.tensor_inputs == ["latents", "prompt_embeds"]
    official = SDCFGCutoffCallback(cutoff_step_ratio=0.5)
    ref = run(pipe, "sd", callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    out = run(pipe, "sd", callback_on_step_end=MultiPipelineCallbacks([official, rec]))
    assert bitwise(out, ref)
    t = rec.trace
    assert len(t) == 4 and bitwise(t[-1].latents, out)
    assert t[0].cond is None  # predictions need the tap
    # the official callback sliced the embeddings after step 2: stored again, with the cond half
    assert len(t.conditioning) == 2 and t.conditioning[1]["prompt_embeds"].shape[0] == 1
    assert [s.conditioning for s in t] == [0, 0, 1, 1]
    assert math.isnan(t[0].step_ms) and t[1].step_ms > 0
    # one value per sample, read off the pipeline's batch-wide state; no evaluations counted
    assert all(len(s.guidance_scale) == len(s.cfg_active) == len(s.nfe) == 1 for s in t)
    assert t[0].cfg_active == [True] and t[0].guidance_scale == [5.0] and all(math.isnan(s.nfe[0]) for s in t)


def test_attached_recorder_sees_the_official_cutoff_take_effect():
    pipe = pipe_for("sdxl")
    from diffusers.callbacks import SDXLCFGCutoffCallback

    ref = run(pipe, "sdxl", callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.5))
    with dlx.record(pipe) as trace:
        out = run(pipe, "sdxl", callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.5))
    assert bitwise(out, ref)
    # diffusers' callback fires after step int(4·0.5) = 2, so steps 0..2 are guided
    assert [s.cfg_active for s in trace] == [[True], [True], [True], [False]]
    assert [s.nfe for s in trace] == [[2], [2], [2], [1]]
    assert trace[3].uncond.isnan().all() and trace.last_guided_step == 2  # NaN rows: not guided
    assert trace.stack("uncond").shape[0] == 4


def test_storage_options():
    pipe = pipe_for("sd")
    with dlx.record(pipe, keep=("latents", "cond")) as full:
        run(pipe, "sd")
    with dlx.record(pipe, keep=("latents", "cond"), dtype=torch.float16, downsample=2) as trace:
        out = run(pipe, "sd")
    s = trace[0]
    assert s.latents.dtype == torch.float16 and s.cond.dtype == torch.float16
    assert s.latents.shape[-1] == out.shape[-1] // 2
    assert s.uncond is None and s.x0 is None and trace.conditioning == []
    for a, b in zip(trace, full):  # each kept tensor is the full one, 2×2-averaged in float32, then fp16
        pool = lambda t: torch.nn.functional.avg_pool2d(t.float(), 2).to(t.dtype).to(torch.float16)  # noqa: E731
        assert bitwise(a.latents, pool(b.latents)) and bitwise(a.cond, pool(b.cond))
        assert not bitwise(a.latents.float(), b.latents[..., ::2, ::2].half().float())


def test_one_run_per_recorder():
    pipe = pipe_for("sd")
    with pytest.raises(dlx.DlxError, match="already holds a run"):
        with dlx.record(pipe):
            run(pipe, "sd")
            run(pipe, "sd")
    assert pipeline_state(pipe)["class"].__name__ == "StableDiffusionPipeline"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep=("latents", "noise")), r"`keep`.*'noise'"),
        (dict(dtype="fp16"), r"`dtype`.*'fp16'"),
        (dict(downsample=0), r"`downsample`.*0"),
        (dict(storage="disk"), r"`storage`.*'disk'"),
    ],
)
def test_bad_recorder_arguments(kwargs, match):
    with pytest.raises(dlx.DlxError, match=match):
        dlx.Recorder(pipe_for("sd"), **kwargs)


class _Wants(Part):
    tensor_inputs = ["add_text_embeds"]


def test_asking_for_a_tensor_the_pipeline_does_not_expose_lists_what_it_exposes():
    pipe = pipe_for("sd")
    with pytest.raises(dlx.DlxError, match=r"\['add_text_embeds'\].*exposes \['latents', 'prompt_embeds', 'negative_prompt_embeds'\]"):
        with dlx.attach(pipe, _Wants()):
            run(pipe, "sd")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and "_dlx_session" not in type(pipe).__dict__


def test_pipeline_without_callbacks_cannot_be_recorded():
    from diffusers import PixArtAlphaPipeline

    with pytest.raises(dlx.DlxError, match="PixArtAlphaPipeline has no `callback_on_step_end`"):
        dlx.family_of(PixArtAlphaPipeline)


def test_unsupported_pipeline_names_its_class_and_the_supported_families():
    class KandinskyV22Pipeline:
        _callback_tensor_inputs = ["latents"]

        def __call__(self, prompt, callback_on_step_end=None):
            pass

    with pytest.raises(dlx.DlxError, match=r"KandinskyV22Pipeline is not supported.*sdxl \(StableDiffusionXLPipeline"):
        dlx.Recorder(KandinskyV22Pipeline())


def test_attach_rejects_non_parts_and_nesting():
    pipe = pipe_for("sd")
    with pytest.raises(dlx.DlxError, match="got <function"):
        with dlx.attach(pipe, lambda *a: a):
            pass
    with dlx.attach(pipe):
        with pytest.raises(dlx.DlxError, match="already attached"):
            with dlx.attach(pipe):
                pass
    assert type(pipe).__name__ == "StableDiffusionPipeline" and "_dlx_session" not in type(pipe).__dict__


def test_each_step_holds_one_value_per_sample_batch_of_three():
    """Issue 10, item 6: per-sample guidance on the step, summarised per step by to_frame."""
    pipe = pipe_for("sd")
    parts = dlx.CFGCutoff(ratio=[0, 0.4, 1]), dlx.GuidanceSchedule("linear", low=[2.0] * 3, high=[2.0, 7.0, 12.0])
    with dlx.record(pipe, *parts) as trace:
        run(pipe, "sd", steps=5, batch=3)
    # sample 0 never guided, sample 1 on the first ⌊0.4·5 + ½⌋ = 2 steps, sample 2 on all
    assert [s.cfg_active for s in trace] == [[False, True, True]] * 2 + [[False, False, True]] * 3
    assert [s.nfe for s in trace] == [[1.0, 2.0, 2.0]] * 2 + [[1.0, 1.0, 2.0]] * 3
    # scale low + (high − low)·i/5 per sample; an unguided sample keeps its planned scale
    assert [s.guidance_scale for s in trace] == [[2.0, 2.0 + i, 2.0 + 2 * i] for i in range(5)]
    assert [sum(s.nfe[j] for s in trace) for j in range(3)] == trace.nfe == [5.0, 7.0, 10.0]
    assert [s.guided for s in trace] == [True] * 5 and trace.last_guided_step == 4
    df = trace.to_frame()
    assert df["cfg_active"].tolist() == [True] * 5
    assert df["nfe"].tolist() == [5 / 3] * 2 + [4 / 3] * 3
    assert df["guidance_scale"].iloc[0] == 2.0 and df["guidance_scale"].iloc[1:].isna().all()
    per = trace.to_frame(per_sample=True)
    for j in range(3):
        mine = per[per["sample"] == j]
        assert mine["cfg_active"].tolist() == [s.cfg_active[j] for s in trace]
        assert mine["nfe"].tolist() == [s.nfe[j] for s in trace]
        assert mine["guidance_scale"].tolist() == [s.guidance_scale[j] for s in trace]


def test_example_inputs_give_batch_rows_to_the_trace():
    pipe = pipe_for("sd")
    with dlx.record(pipe) as trace:
        pipe(**example_inputs("sd", batch=2, num_images_per_prompt=2))
    assert trace.meta["batch"] == 4 and trace[0].cond.shape[0] == 4
    df = trace.to_frame(per_sample=True)
    assert len(df) == 4 * 4 and set(df["sample"]) == {0, 1, 2, 3}


def test_records_a_compiled_denoiser_without_changing_its_output():
    # torch.compile wraps the UNet in an OptimizedModule (its truth test raises); dynamo's eager
    # backend keeps this fast on a CPU while exercising the same wrapper
    pipe = tiny_pipeline_compiled()
    fwd = pipe.unet.__dict__.get("forward")  # OptimizedModule keeps its compiled forward here
    assert fwd is not None
    ref = run(pipe, "sd")
    with dlx.record(pipe, dlx.CFGCutoff(ratio=0.5)) as trace:
        cut = run(pipe, "sd")
    with dlx.record(pipe) as trace2:
        out = run(pipe, "sd")
    assert bitwise(out, ref) and len(trace2) == 4 and trace2[0].cond is not None
    assert trace.nfe == [6.0] and not bitwise(cut, ref)
    assert pipe.unet.__dict__.get("forward") is fwd, "the compiled forward must be restored"


def tiny_pipeline_compiled():
    from dlx.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    return pipe


def test_x0_of_flow_matching_is_x_minus_sigma_v():
    # FlowMatchEuler: x_{i+1} = x_i + (σ_{i+1} − σ_i)·v_i, and x0_i = x_i − σ_i·v_i
    pipe = pipe_for("sd3")
    with dlx.record(pipe) as trace:
        run(pipe, "sd3", steps=5)
    sig = pipe.scheduler.sigmas.double()
    for i in range(1, 5):
        x_i = trace[i - 1].latents.double()
        v = (trace[i].latents.double() - x_i) / (sig[i + 1] - sig[i])
        expected = x_i - sig[i] * v
        assert trace[i].sigma == pytest.approx(float(sig[i]), rel=1e-5)
        assert torch.allclose(trace[i].x0.double(), expected, rtol=1e-4, atol=1e-4)


# --- what ran: partial schedules, the prediction the scheduler used (issue 11 items 1, 5) --------


class _SchedulerSpy:
    """Captures, per scheduler step, the timestep, the model output it stepped with, the sample,
    and its own x0 (``pred_original_sample``) where it computes one."""

    def __init__(self, pipe):
        self.sched, self.steps = pipe.scheduler, []
        orig = self.sched.step

        def step(model_output, timestep, sample, *a, **k):
            k["return_dict"] = True
            res = orig(model_output, timestep, sample, *a, **k)
            x0 = getattr(res, "pred_original_sample", None)
            self.steps.append(dict(t=float(timestep), v=model_output.clone(), x=sample.clone(),
                                   x0=None if x0 is None else x0.clone()))
            return (res.prev_sample,)

        self.sched.step = step

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        del self.sched.step


def _close(a, b):
    # float32 along two routes: agree to 1e-4 relative (the existing x0 tolerance)
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("family, kw", [
    ("sdxl", dict(denoising_end=0.5, steps=8)),
    ("sdxl-img2img", dict(denoising_start=0.5, steps=8)),
    ("sd-img2img", dict(strength=0.5, steps=8)),
])
def test_the_trace_records_the_steps_that_ran(family, kw):
    pipe = pipe_for(family)
    with _SchedulerSpy(pipe) as spy:
        with dlx.record(pipe, dlx.CFGCutoff(sigma=1e-3)) as trace:
            run(pipe, family, **kw)
    assert [s.timestep for s in trace] == [s["t"] for s in spy.steps]
    assert len(trace) == len(spy.steps) < 8
    # every real sigma is above 1e-3: every step that ran is guided
    assert all(s.cfg_active == [True] for s in trace)
    for s, ref in zip(trace, spy.steps):
        if ref["x0"] is not None:
            assert _close(s.x0, ref["x0"]), s.index


def test_x0_includes_guidance_rescale():
    pipe = pipe_for("sd")
    with _SchedulerSpy(pipe) as spy:
        with dlx.record(pipe) as trace:
            run(pipe, "sd", guidance_rescale=0.7)
    for s, ref in zip(trace, spy.steps):
        assert _close(s.x0, ref["x0"]), s.index


def test_x0_includes_sd3_skip_layer_guidance():
    pipe = pipe_for("sd3")
    kw = dict(steps=5, skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    plain = run(pipe, "sd3", **kw)
    with _SchedulerSpy(pipe) as spy:
        with dlx.record(pipe) as trace:
            out = run(pipe, "sd3", **kw)
    assert bitwise(out, plain)
    sig = pipe.scheduler.sigmas
    revised = 0
    for i, (s, ref) in enumerate(zip(trace, spy.steps)):
        x0 = ref["x"].float() - sig[i].item() * ref["v"].float()  # flow matching: x0 = x − σ·v
        assert _close(s.x0, x0), i
        plain_cfg = torch.lerp(s.uncond, s.cond, 5.0)
        revised += not torch.allclose(ref["v"], plain_cfg, rtol=1e-4, atol=1e-5)
    assert revised >= 3, "skip-layer guidance must really change the prediction on the steps it runs"


# --- callbacks that return less, reuse, errors at the end (issue 11 items 8, 13, 14) -------------


def test_a_user_callback_returning_an_empty_dict_keeps_the_latents_recorded():
    pipe = pipe_for("sd")
    ref = run(pipe, "sd")
    with dlx.record(pipe) as trace:
        out = run(pipe, "sd", callback_on_step_end=lambda p, i, t, kw: {})
    assert bitwise(out, ref)
    assert all(s.latents is not None for s in trace) and bitwise(trace[-1].latents, out)


def test_a_second_call_in_one_block_keeps_the_first_traces_metadata():
    pipe = pipe_for("sd")
    with pytest.raises(dlx.DlxError, match="already holds a run"):
        with dlx.record(pipe) as trace:
            run(pipe, "sd", steps=4, prompt="a red circle")
            first = json.loads(json.dumps(trace.meta, default=str))
            run(pipe, "sd", steps=3, prompt="a dog")
    assert len(trace) == 4 and trace.meta["call"]["prompt"] == "a red circle"
    assert trace.meta["stop_reason"] == "completed" and trace.meta["nfe"] == [8.0]
    assert {k: v for k, v in json.loads(json.dumps(trace.meta, default=str)).items() if k != "recorded_at"} == \
        {k: v for k, v in first.items() if k != "recorded_at"}
    # the same with one Recorder reused in two blocks
    rec = dlx.Recorder(pipe)
    with dlx.attach(pipe, rec):
        run(pipe, "sd")
    with pytest.raises(dlx.DlxError, match="already holds a run"):
        with dlx.attach(pipe, rec):
            run(pipe, "sd", steps=2)
    assert len(rec.trace) == 4 and rec.trace.meta["stop_reason"] == "completed"
    assert pipeline_state(pipe)["class"].__name__ == "StableDiffusionPipeline"


class _BadEnd(Part):
    def on_run_end(self, run, error):
        raise ValueError("part end failed")


def test_a_part_whose_end_raises_does_not_skip_the_recorders_end():
    pipe = pipe_for("sd")
    with pytest.raises(ValueError, match="part end failed"):
        with dlx.record(pipe, _BadEnd()) as trace:
            run(pipe, "sd")
    assert trace.meta["stop_reason"] == "completed" and all(s.x0 is not None for s in trace)
    assert all(s.step_ms > 0 for s in trace)

    def boom(p, i, t, kw):
        if i == 1:
            raise KeyError("the user's own error")
        return kw

    with pytest.raises(KeyError, match="the user's own error") as info:
        with dlx.record(pipe, _BadEnd()) as trace:
            run(pipe, "sd", callback_on_step_end=boom)
    assert any("part end failed" in n for n in getattr(info.value, "__notes__", []))
    assert "KeyError" in trace.meta["stop_reason"] and trace.meta["pipeline"] == "StableDiffusionPipeline"


def test_a_user_callback_returning_nothing_is_named():
    pipe = pipe_for("sd")
    before = pipeline_state(pipe)
    with pytest.raises(dlx.DlxError, match=r"callback_on_step_end must return a dict.*returned NoneType at step 0"):
        with dlx.record(pipe) as trace:
            run(pipe, "sd", callback_on_step_end=lambda p, i, t, kw: None)
    assert "DlxError" in trace.stop_reason and pipeline_state(pipe)["den_dict"] == before["den_dict"]
