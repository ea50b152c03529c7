"""The run protocol: per-sample controls and their composition, dlx.Share, configurations,
call arguments and call timing in the trace, the unguided tail, and what a call leaves behind."""

import json
import threading
import math

import pytest
import torch

import dlx
from dlx.guidance import boundary

from .helpers import bitwise, pipe_for, pipeline_state, run

# Same sample alone vs inside a batch: the denoiser runs at another batch size, so float32
# kernels round differently (seen: 2.7e-5 on latents of magnitude ~5). Stated tolerance:
BATCH_TOL = dict(rtol=1e-5, atol=1e-4)


class _Shapes:
    """Records the leading dim of every input the denoiser really gets (installed under the tap)."""

    def __init__(self, module):
        self.module, self.rows = module, []
        orig = module.forward

        def forward(*a, **k):
            x = a[0] if a else k.get("sample", k.get("hidden_states"))
            self.rows.append(x.shape[0])
            return orig(*a, **k)

        module.forward = forward

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        del self.module.forward


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _batched_and_alone(family, make_batched, make_alone, steps=5, seeds=(10, 11, 12), **kw):
    pipe = pipe_for(family)
    prompts = ["a red circle", "a blue square", "a cat"][: len(seeds)]
    with dlx.attach(pipe, *make_batched()):
        batched = run(pipe, family, steps=steps, prompt=prompts, generator=_gens(seeds), **kw)
    for j, (p, s) in enumerate(zip(prompts, seeds)):
        with dlx.attach(pipe, *make_alone(j)):
            alone = run(pipe, family, steps=steps, prompt=p, generator=_gens([s]), **kw)
        assert torch.allclose(batched[j: j + 1], alone, **BATCH_TOL), (j, (batched[j] - alone[0]).abs().max())
    return batched


# --- per-sample controls ------------------------------------------------------------------------

PER_SAMPLE = [
    ("cutoff-ratio", lambda: [dlx.CFGCutoff(ratio=[0, 0.4, 1])], lambda j: [dlx.CFGCutoff(ratio=[0, 0.4, 1][j])]),
    ("cutoff-step", lambda: [dlx.CFGCutoff(step=[1, 0, 3])], lambda j: [dlx.CFGCutoff(step=[1, 0, 3][j])]),
    ("cutoff-sigma", lambda: [dlx.CFGCutoff(sigma=[0.5, 5.0, 100.0])],
     lambda j: [dlx.CFGCutoff(sigma=[0.5, 5.0, 100.0][j])]),
    ("cutoff-diffusers", lambda: [dlx.CFGCutoff(ratio=[0, 0.5, 0.9], compat="diffusers")],
     lambda j: [dlx.CFGCutoff(ratio=[0, 0.5, 0.9][j], compat="diffusers")]),
    ("interval", lambda: [dlx.GuidanceInterval(start=[0, 0.2, 0.6], stop=[0.4, 1.0, 0.8])],
     lambda j: [dlx.GuidanceInterval([0, 0.2, 0.6][j], [0.4, 1.0, 0.8][j])]),
    ("schedule", lambda: [dlx.GuidanceSchedule("linear", low=[1.0, 2.0, 3.0], high=[9.0, 4.0, 3.0])],
     lambda j: [dlx.GuidanceSchedule("linear", low=[1.0, 2.0, 3.0][j], high=[9.0, 4.0, 3.0][j])]),
    ("adaptive", lambda: [dlx.AdaptiveCutoff(threshold=[0.5, 0.99999, 1.0])],
     lambda j: [dlx.AdaptiveCutoff(threshold=[0.5, 0.99999, 1.0][j])]),
    ("composed", lambda: [dlx.GuidanceInterval(0.2, 1.0), dlx.CFGCutoff(ratio=[0.6, 1.0, 0.2])],
     lambda j: [dlx.GuidanceInterval(0.2, 1.0), dlx.CFGCutoff(ratio=[0.6, 1.0, 0.2][j])]),
]


@pytest.mark.parametrize("name, batched, alone", PER_SAMPLE, ids=[p[0] for p in PER_SAMPLE])
def test_each_sample_of_a_batch_equals_the_sample_run_alone_with_its_own_control(name, batched, alone):
    _batched_and_alone("sd", batched, alone)


def test_per_sample_cutoff_on_sdxl_and_sd3():
    for fam in ("sdxl", "sd3"):
        _batched_and_alone(fam, lambda: [dlx.CFGCutoff(ratio=[0.2, 0.8])], lambda j: [dlx.CFGCutoff(ratio=[0.2, 0.8][j])],
                           steps=4, seeds=(1, 2))


def test_per_sample_plans_are_recorded_per_sample():
    pipe = pipe_for("sd")
    with dlx.record(pipe, dlx.CFGCutoff(ratio=[0, 0.4, 1])) as trace:
        run(pipe, "sd", steps=5, batch=3)
    # ratio 0.4 of 5 steps guides the first ⌊0.4·5 + ½⌋ = 2
    assert [s.cfg_active for s in trace] == [[False, True, True]] * 2 + [[False, False, True]] * 3
    assert [s.nfe for s in trace] == [[1.0, 2.0, 2.0]] * 2 + [[1.0, 1.0, 2.0]] * 3
    assert [s.guidance_scale for s in trace] == [[5.0] * 3] * 5
    assert trace.nfe == [5.0, 7.0, 10.0]
    df = trace.to_frame(per_sample=True)
    assert df.groupby("sample")["nfe"].sum().tolist() == pytest.approx(trace.nfe, rel=1e-12)
    assert df[df["sample"] == 1]["cfg_active"].tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("part, name", [
    (lambda: dlx.CFGCutoff(ratio=[0.1, 0.5]), "ratio"),
    (lambda: dlx.CFGCutoff(step=[1, 2, 3, 1]), "step"),
    (lambda: dlx.CFGCutoff(sigma=[1.0, 2.0]), "sigma"),
    (lambda: dlx.GuidanceInterval(start=[0.1, 0.2], stop=[0.5, 0.6]), "start"),
    (lambda: dlx.GuidanceSchedule("linear", low=[1.0, 2.0]), "low"),
    (lambda: dlx.AdaptiveCutoff(threshold=[0.9, 0.95]), "threshold"),
    (lambda: dlx.Share(["a", "b"]), "keys"),
])
def test_a_list_of_the_wrong_length_fails_before_any_denoiser_evaluation(part, name):
    pipe = pipe_for("sd")
    with _Shapes(pipe.unet) as shapes:
        with pytest.raises(dlx.DlxError, match=rf"argument `{name}` has \d values \(one per sample\) but the run has 3"):
            with dlx.attach(pipe, part()):
                run(pipe, "sd", batch=3)
    assert shapes.rows == []
    assert type(pipe).__name__ == "StableDiffusionPipeline"


@pytest.mark.parametrize("make, match", [
    (lambda: dlx.CFGCutoff(ratio=[0.1, 1.5]), r"`ratio\[1\]`.*1\.5"),
    (lambda: dlx.CFGCutoff(ratio=[]), r"`ratio`.*non-empty"),
    (lambda: dlx.CFGCutoff(step=[1, -2]), r"`step\[1\]`.*-2"),
    (lambda: dlx.CFGCutoff(sigma=[float("nan")]), r"`sigma\[0\]`.*nan"),
    (lambda: dlx.GuidanceInterval(start=[0.5, 0.1], stop=[0.4, 0.9]), r"`start` \(0\.5\) must not exceed `stop` \(0\.4\) for sample 0"),
    (lambda: dlx.GuidanceInterval(start=[0.1, 0.2], stop=[0.5, 0.6, 0.7]), r"same length"),
    (lambda: dlx.GuidanceSchedule(low=float("inf")), r"`low`.*finite.*inf"),
    (lambda: dlx.GuidanceSchedule(high=[2.0, -1.0]), r"`high\[1\]`.*-1\.0"),
    (lambda: dlx.AdaptiveCutoff(threshold=[0.9, 0.0]), r"`threshold\[1\]`.*0\.0"),
    (lambda: dlx.Share("abc"), r"`keys`.*'abc'"),
    (lambda: dlx.Share([[1], [2]]), r"`keys\[0\]` must be hashable"),
])
def test_bad_per_sample_values_name_the_argument(make, match):
    with pytest.raises(dlx.DlxError, match=match):
        make()


def test_two_scale_setters_are_refused_at_attach_before_any_call():
    pipe = pipe_for("sd")
    with pytest.raises(dlx.DlxError, match="two attached parts set the guidance scale"):
        with dlx.attach(pipe, dlx.GuidanceSchedule("linear"), dlx.GuidanceSchedule("cosine")):
            raise AssertionError("refused at attach")
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_schedule_default_high_keeps_the_constant_mean_over_the_steps_that_run():
    pipe = pipe_for("sd")
    for n, kind in ((2, "linear"), (5, "linear"), (5, "cosine")):
        sched = dlx.GuidanceSchedule(kind, low=1.0)
        with dlx.record(pipe, sched) as trace:
            run(pipe, "sd", steps=n, guidance_scale=5.0)
        assert all(len(s.guidance_scale) == 1 for s in trace)
        scales = [s.guidance_scale[0] for s in trace]
        assert scales[0] == 1.0 and sum(scales) / n == pytest.approx(5.0, rel=1e-12), (n, kind, scales)


# --- prefix sharing ------------------------------------------------------------------------------


def _sweep(pipe, parts, steps, ratios, seed=3):
    kw = dict(prompt="a red circle", num_images_per_prompt=len(ratios), generator=_gens([seed] * len(ratios)))
    with dlx.record(pipe, dlx.CFGCutoff(ratio=ratios), *parts, keep=("latents", "x0")) as trace:
        out = run(pipe, "sd", steps=steps, **kw)
    return out, trace


def test_share_evaluates_each_group_once_125_instead_of_225():
    pipe = pipe_for("sd")
    ratios = [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    with _Shapes(pipe.unet) as shapes:
        _, trace = _sweep(pipe, [dlx.Share([0] * 6)], 25, ratios)
    assert trace.meta["evaluations"] == 125 == sum(shapes.rows)
    assert trace.meta["evaluations"] == sum(s.evaluations for s in trace)
    assert [s.evaluations for s in trace][:6] == [3, 3, 3, 3, 3, 4]
    # nominal per-sample NFE as without sharing
    assert trace.nfe == [25.0 + boundary(r, 25) for r in ratios]


def test_share_gives_the_unshared_result():
    pipe = pipe_for("sd")
    ratios = [0, 0.4, 0.4, 1.0]
    plain, t0 = _sweep(pipe, [], 5, ratios)
    shared, t1 = _sweep(pipe, [dlx.Share(["p"] * 4)], 5, ratios)
    assert t0.meta["evaluations"] == 5 * 4 + 2 * 2 + 5 and t1.meta["evaluations"] < t0.meta["evaluations"]
    # the denoiser runs at another batch size: the tolerance of batched vs alone
    assert torch.allclose(shared, plain, **BATCH_TOL)
    # the two samples with equal keys and plans are the same sample: bitwise
    assert bitwise(shared[1], shared[2])
    for a, b in zip(t0, t1):
        assert torch.allclose(a.x0, b.x0, **BATCH_TOL) and a.cfg_active == b.cfg_active


def test_share_with_distinct_keys_is_the_plain_batched_run_bitwise():
    pipe = pipe_for("sd")
    gens = lambda: _gens([1, 2])  # noqa: E731
    with dlx.attach(pipe, dlx.CFGCutoff(ratio=[0.4, 0.8])):
        a = run(pipe, "sd", steps=5, prompt=["a cat", "a dog"], generator=gens())
    with dlx.attach(pipe, dlx.CFGCutoff(ratio=[0.4, 0.8]), dlx.Share(["cat", "dog"])):
        b = run(pipe, "sd", steps=5, prompt=["a cat", "a dog"], generator=gens())
    assert bitwise(a, b)


def test_share_refuses_a_broken_promise_and_stochastic_schedulers_and_flux():
    pipe = pipe_for("sd")
    with pytest.raises(dlx.DlxError, match="samples 0 and 1 have the same key 'k' but different inputs"):
        with dlx.attach(pipe, dlx.CFGCutoff(ratio=[0, 1]), dlx.Share(["k", "k"])):
            run(pipe, "sd", prompt="a cat", num_images_per_prompt=2, generator=_gens([1, 2]))
    with pytest.raises(dlx.DlxError, match=r"deterministic scheduler.*eta=0\.5"):
        with dlx.attach(pipe, dlx.Share(["k"])):
            run(pipe, "sd", eta=0.5)
    with pytest.raises(dlx.DlxError, match="Share is not supported on flux"):
        with dlx.attach(pipe_for("flux"), dlx.Share(["k"])):
            pass
    assert pipeline_state(pipe)["class"].__name__ == "StableDiffusionPipeline"


# --- configurations ------------------------------------------------------------------------------

CONFIG_PARTS = [
    lambda: dlx.CFGCutoff(ratio=0.3),
    lambda: dlx.CFGCutoff(step=[1, 2], compat="diffusers"),
    lambda: dlx.CFGCutoff(sigma=[1.5, 2.0]),
    lambda: dlx.GuidanceInterval(0.1, [0.5, 0.9]),
    lambda: dlx.GuidanceSchedule("cosine", low=[1.0, 2.0], high=7.0),
    lambda: dlx.AdaptiveCutoff(threshold=[0.9, 0.99]),
    lambda: dlx.IPAdapterCutoff(step=2),
    lambda: dlx.Interrupt(after_step=3, seconds=2.5, on_nonfinite=True),
    lambda: dlx.Share(["a", "a", 3]),
    lambda: dlx.Recorder(pipe_for("sd"), keep=("latents", "x0"), dtype=torch.float16, downsample=2, storage="device"),
]


@pytest.mark.parametrize("make", CONFIG_PARTS)
def test_every_part_rebuilds_from_its_json_config(make):
    part = make()
    cfg = part.config()
    assert json.loads(json.dumps(cfg)) == cfg and cfg["type"] == type(part).__name__
    assert cfg.get("rebuildable", True)
    again = dlx.part_from_config(json.loads(json.dumps(cfg)), pipe=pipe_for("sd"))
    assert type(again) is type(part) and again.config() == cfg


def test_a_callable_schedule_is_recorded_by_name_and_not_rebuildable():
    def ramp(p):
        return 2 + p

    cfg = dlx.GuidanceSchedule(ramp).config()
    assert cfg["args"]["schedule"] == {"callable": f"{__name__}.test_a_callable_schedule_is_recorded_by_name_and_not_rebuildable.<locals>.ramp"}
    assert cfg["rebuildable"] is False
    with pytest.raises(dlx.DlxError, match="cannot be rebuilt"):
        dlx.part_from_config(cfg)
    with pytest.raises(dlx.DlxError, match="unknown part type 'Nope'"):
        dlx.part_from_config({"type": "Nope", "args": {}})


def test_trace_records_part_configs_and_every_call_argument():
    pipe = pipe_for("sd")
    with dlx.record(pipe, dlx.CFGCutoff(ratio=[0.5, 1.0])) as trace:
        run(pipe, "sd", steps=4, num_images_per_prompt=2, generator=_gens([7, 8]), guidance_rescale=0.3, eta=0.0)
    parts = trace.meta["parts"]
    assert parts[0]["type"] == "CFGCutoff" and parts[0]["args"] == {"ratio": [0.5, 1.0]}  # compat="dlx" is the default: left out
    assert dlx.part_from_config(parts[0]).config() == {k: parts[0][k] for k in ("type", "args")}
    call = trace.meta["call"]
    assert call["num_inference_steps"] == 4 and call["guidance_scale"] == 5.0 and call["guidance_rescale"] == 0.3
    assert call["generator"] == {"generator_seeds": [7, 8]} and trace.meta["seed"] == [7, 8]
    assert call["height"] == 32 and call["eta"] == 0.0 and call["num_images_per_prompt"] == 2
    assert call["scheduler"]["class"] == type(pipe.scheduler).__name__
    assert call["scheduler"]["config"]["num_train_timesteps"] == pipe.scheduler.config.num_train_timesteps
    assert "callback_on_step_end" not in call
    json.dumps(trace.meta)  # JSON all through


# --- call timing and keep=() ---------------------------------------------------------------------


def test_call_timing_splits_the_call_into_encode_loop_and_decode():
    pipe = pipe_for("sd")
    with dlx.record(pipe, keep=()) as trace:
        run(pipe, "sd", steps=3, output_type="pt")
    ct = trace.meta["call_timing"]
    assert set(ct) == {"encode_ms", "loop_ms", "decode_ms", "call_ms"}
    assert all(v > 0 for v in ct.values())
    assert ct["encode_ms"] + ct["loop_ms"] + ct["decode_ms"] == pytest.approx(ct["call_ms"], rel=1e-9)
    assert ct["loop_ms"] >= sum(s.step_ms for s in trace) * (1 - 1e-9)
    # keep=(): no tensors, every scalar
    assert trace.fields() == [] and trace.conditioning == []
    assert all(s.latents is None and s.x0 is None for s in trace)
    assert [s.nfe for s in trace] == [[2.0]] * 3 and trace.meta["evaluations"] == 6


# --- the unguided tail ---------------------------------------------------------------------------


def test_unguided_tail_leaves_cfg_like_diffusers_callbacks():
    pipe = pipe_for("sd")
    run(pipe, "sd")
    before = pipeline_state(pipe)
    with _Shapes(pipe.unet) as shapes:
        with dlx.record(pipe, dlx.CFGCutoff(ratio=0.5)) as trace:
            out = run(pipe, "sd", steps=4, batch=2)
    # steps 0-1 guided (the pipeline's doubled batch), then the pipeline's own unguided loop
    assert shapes.rows == [4, 4, 2, 2]
    assert trace.meta["cfg_left_after_step"] == 1
    assert [s.cfg_active for s in trace] == [[True] * 2] * 2 + [[False] * 2] * 2
    assert [s.guidance_scale for s in trace] == [[5.0] * 2] * 4, "the tail records the call's scale, not 0"
    assert [s.nfe for s in trace] == [[2, 2]] * 2 + [[1, 1]] * 2 and trace[2].uncond.isnan().all()
    assert trace.stack("uncond")[:2].isfinite().all()  # stack works on a cutoff trace
    assert pipeline_state(pipe) == before and pipe.guidance_scale == 5.0
    # the tap path (rows taken from the doubled batch on every step) gives the same result bitwise
    with _Shapes(pipe.unet) as shapes:
        with dlx.attach(pipe, _FirstSteps(2)):
            tapped = run(pipe, "sd", steps=4, batch=2)
    assert shapes.rows == [4, 4, 2, 2] and bitwise(out, tapped)


def test_the_unguided_tail_runs_without_the_tap_when_nothing_reads_its_calls():
    """After the switch out of CFG, with no part reading denoiser calls, the tail's calls are the
    pipeline's own (no tap host work: issue 10 item 10), still counted, bitwise the same result."""
    pipe = pipe_for("sd")
    plain = pipe.unet.__dict__.get("forward")
    seen = []

    def cb(p, i, t, kw):
        seen.append(p.unet.__dict__.get("forward") is plain)
        return kw

    cut = dlx.CFGCutoff(ratio=0.5)
    with dlx.attach(pipe, cut):
        out = run(pipe, "sd", steps=4, batch=2, callback_on_step_end=cb)
    assert seen == [False, False, True, True]  # tapped while guided, then the pipeline's own forward
    assert cut.report["nfe"] == [6, 6]  # 2 + 2 + 1 + 1 per sample: the untapped steps are counted
    assert pipe.unet.__dict__.get("forward") is plain
    with dlx.record(pipe, dlx.CFGCutoff(ratio=0.5)) as trace:  # a recorder reads every call: tapped
        recorded = run(pipe, "sd", steps=4, batch=2)
    assert bitwise(out, recorded) and [s.nfe for s in trace] == [[2, 2]] * 2 + [[1, 1]] * 2


class _FirstSteps(dlx.Part):
    """A control that guides the first k steps and does not say the tail is unguided."""

    def __init__(self, k):
        self.k = k

    def guidance(self, run, step):
        return dlx.session.Guide(mask=(step < self.k,) * run.batch)


def test_per_sample_cutoffs_leave_cfg_after_the_last_one():
    pipe = pipe_for("sd")
    with _Shapes(pipe.unet) as shapes:
        with dlx.record(pipe, dlx.CFGCutoff(ratio=[0.2, 0.6])) as trace:
            run(pipe, "sd", steps=5, batch=2)
    # step 0: both guided (4 rows); steps 1-2: one guided (3 rows taken); steps 3-4: no CFG batch
    assert shapes.rows == [4, 3, 3, 2, 2] and trace.meta["cfg_left_after_step"] == 2


# --- what a call leaves behind ---------------------------------------------------------------------


def test_a_fresh_pipeline_after_a_dlx_call_works_as_after_a_plain_call():
    from dlx.testing import tiny_pipeline

    fresh = tiny_pipeline("sd", seed=0)
    plain = tiny_pipeline("sd", seed=0)
    run(plain, "sd")
    with dlx.record(fresh, dlx.CFGCutoff(ratio=0.5), dlx.Interrupt(after_step=2)):
        run(fresh, "sd")
    assert fresh.guidance_scale == plain.guidance_scale == 5.0
    assert fresh.do_classifier_free_guidance == plain.do_classifier_free_guidance
    assert fresh.interrupt is False and plain.interrupt is False
    assert math.isfinite(fresh.guidance_scale)


# --- shared components, shared parts, threads (issue 11 items 2, 3) ------------------------------


def _sibling(pipe):
    """A second pipeline built from the same components (shares the UNet)."""
    sib = type(pipe)(**pipe.components)
    sib.set_progress_bar_config(disable=True)
    return sib


def test_two_blocks_cannot_tap_one_shared_denoiser():
    pipe = pipe_for("sd")
    sib = _sibling(pipe)
    ref = run(sib, "sd")
    with dlx.attach(pipe, dlx.CFGCutoff(ratio=0.5)):
        with pytest.raises(dlx.DlxError, match="already tapped by another dlx block"):
            with dlx.attach(sib):
                pass
    assert type(sib).__name__ == "StableDiffusionPipeline" and "forward" not in pipe.unet.__dict__
    with dlx.attach(sib):  # once the first block ended
        assert bitwise(run(sib, "sd"), ref)


def test_a_plain_call_from_another_thread_through_a_tapped_denoiser_is_untouched():
    pipe = pipe_for("sd")
    sib = _sibling(pipe)
    ref = run(sib, "sd")
    got = {}

    def meanwhile(p, i, t, kw):
        if i == 1:  # the tap is installed on the shared UNet now
            th = threading.Thread(target=lambda: got.setdefault("out", run(sib, "sd")))
            th.start()
            th.join()
        return kw

    with dlx.record(pipe, dlx.CFGCutoff(ratio=[0.25])) as trace:
        run(pipe, "sd", callback_on_step_end=meanwhile)
    assert bitwise(got["out"], ref)
    assert trace.nfe == [5.0] and trace.meta["evaluations"] == 5
    assert "forward" not in pipe.unet.__dict__


def test_a_plain_call_from_inside_a_callback_through_a_tapped_denoiser_is_untouched():
    pipe = pipe_for("sd")
    sib = _sibling(pipe)
    ref = run(sib, "sd")
    got = {}

    def meanwhile(p, i, t, kw):
        if i == 1:
            got["out"] = run(sib, "sd")  # same thread, the tap installed on the shared UNet
        return kw

    with dlx.record(pipe, dlx.CFGCutoff(ratio=[0.25])) as trace:
        run(pipe, "sd", callback_on_step_end=meanwhile)
    assert bitwise(got["out"], ref) and trace.meta["evaluations"] == 5


def test_one_part_in_two_concurrent_runs_is_refused():
    pipe = pipe_for("sd")
    sib = _sibling(pipe)
    sib.unet = pipe_for("sd-img2img").unet  # its own UNet: only the part is shared
    cut = dlx.CFGCutoff(ratio=0.5)
    errors = []

    def second(p, i, t, kw):
        if i == 0:
            def other():
                try:
                    with dlx.attach(sib, cut):
                        run(sib, "sd", steps=2)
                except dlx.DlxError as e:
                    errors.append(str(e))
            th = threading.Thread(target=other)
            th.start()
            th.join()
        return kw

    with dlx.record(pipe, cut) as trace:
        run(pipe, "sd", steps=4, callback_on_step_end=second)
    assert len(errors) == 1 and "in use by another running pipeline call" in errors[0]
    assert [s.guided for s in trace] == [True, True, False, False]
    assert type(sib).__name__ == "StableDiffusionPipeline"
    with dlx.attach(sib, cut):  # one after the other is fine
        run(sib, "sd", steps=2)
    assert cut.report["last_guided_step"] == 0


# --- second-order schedulers (issue 11 item 6) -----------------------------------------------------


def test_second_order_schedulers_are_refused_before_the_call():
    from diffusers import HeunDiscreteScheduler

    pipe = _sibling(pipe_for("sd"))
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with _Shapes(pipe.unet) as shapes:
        with pytest.raises(dlx.DlxError, match="HeunDiscreteScheduler is a second-order scheduler"):
            with dlx.record(pipe, dlx.CFGCutoff(ratio=0.5)):
                run(pipe, "sd")
    assert shapes.rows == [] and type(pipe).__name__ == "StableDiffusionPipeline"


# --- reports describe what ran (issue 11 item 4) -----------------------------------------------------


def test_reports_describe_what_ran_and_a_control_that_could_not_act_warns():
    from diffusers.callbacks import SDCFGCutoffCallback

    pipe = pipe_for("sd")
    cut = dlx.CFGCutoff(ratio=0.75)
    with dlx.record(pipe, cut):  # the user's own callback cuts CFG after step 1
        run(pipe, "sd", steps=4, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.25))
    assert cut.report["last_guided_step"] == 1 and cut.report["guided_steps_run"] == [0, 1]
    with pytest.warns(UserWarning, match="CFGCutoff: no step of this call was guided"):
        with dlx.record(pipe, cut):
            run(pipe, "sd", guidance_scale=1.0)
    assert cut.report["last_guided_step"] is None and cut.report["acted"] is False
