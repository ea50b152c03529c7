"""The run protocol's core: one rule for combining guides, guidance rules and zero samples in the
tap, per-sample controls, and the one record of a run that every count is read from."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dlx
from dlx import DlxError
from dlx.protocol import Guide, combine

from .helpers import bitwise, pipe_for, pipeline_state, run

FAMILIES = ["sd", "sdxl", "sd3", "flux"]


def test_combine_ands_masks_ors_zero_and_takes_one_scale_and_rule():
    rule = object()
    plan = combine(3, (5.0, 5.0, 5.0), [
        (None, Guide(mask=(True, False, True))),
        (None, Guide(scale=(2.0, 3.0, 4.0))),
        (2, Guide(mask=(True,), rule=(rule,))),
        (0, Guide(zero=(True,))),
    ], default=5.0)
    assert plan.mask == (False, False, True)  # sample 0 zeroed: never guided
    assert plan.scale == (2.0, 3.0, 4.0)
    assert plan.rule == (None, None, rule) and plan.zero == (True, False, False)
    assert not plan.passthrough
    plain = combine(2, (5.0, 5.0), [(None, None)], default=5.0)
    assert plain.passthrough and plain.rule == () and plain.zero == ()


class Halfway:
    """A guidance rule: halfway between the conditional and the CFG prediction."""

    def __init__(self):
        self.calls = []

    def combine(self, run, step, samples, cond, uncond, scale):
        self.calls.append((step, samples))
        return cond + 0.5 * scale * (cond - uncond)


class RuleControl(dlx.Part):
    sets_rule = True

    def __init__(self, rule, samples=None, zero_steps=()):
        self.rule, self.samples, self.zero_steps = rule, samples, tuple(zero_steps)

    def guidance(self, run, step):
        pick = [self.samples is None or j in self.samples for j in range(run.batch)]
        return Guide(rule=[self.rule if p else None for p in pick],
                     zero=[step in self.zero_steps] * run.batch if self.zero_steps else None)


class Observe(dlx.Part):
    wants_calls = True

    def __init__(self):
        self.calls = []

    def on_denoiser(self, run, call):
        self.calls.append((call.cond.clone(), None if call.uncond is None else call.uncond.clone(), call.guided.clone()))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_rule_forms_the_guided_prediction_on_every_family(family):
    # The pipeline steps with exactly the rule's prediction: check it against the rule applied to
    # the cond/uncond predictions the tap saw, at every step, bitwise.
    pipe = pipe_for(family)
    rule, obs = Halfway(), Observe()
    run(pipe, family)  # a plain call first: it leaves the pipeline's own flags as diffusers sets them
    before = pipeline_state(pipe)
    with dlx.attach(pipe, RuleControl(rule), obs):
        run(pipe, family, num_images_per_prompt=2)
    assert pipeline_state(pipe) == before
    assert [s for _, s in rule.calls] == [(0, 1)] * 4
    scale = 5.0
    for c, u, g in obs.calls:
        assert bitwise(g, c + 0.5 * scale * (c - u))


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_rule_on_some_samples_cfg_on_the_others_each_equal_alone(family):
    pipe = pipe_for(family)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    with dlx.attach(pipe, RuleControl(Halfway(), samples={1})):
        both = run(pipe, family, num_images_per_prompt=2, generator=gens())
    plain = run(pipe, family, num_images_per_prompt=1, generator=torch.Generator().manual_seed(1))
    with dlx.attach(pipe, RuleControl(Halfway())):
        alone = run(pipe, family, num_images_per_prompt=1, generator=torch.Generator().manual_seed(2))
    # batched matmuls round differently: latents agree within 1e-4
    assert (both[0] - plain[0]).abs().max().item() <= 1e-4 and (both[1] - alone[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_zero_steps_are_not_evaluated_and_predict_zero(family):
    pipe = pipe_for(family)
    obs = Observe()
    with dlx.record(pipe, RuleControl(None, zero_steps=(0,)), obs) as trace:
        run(pipe, family)
    assert trace[0].nfe == [0.0] and trace[0].evaluations == 0 and trace[0].cfg_active == [False]
    assert [s.nfe for s in trace.steps[1:]] == [[2.0]] * 3
    assert trace.nfe == [6.0]
    c, u, g = obs.calls[0]
    assert torch.count_nonzero(g) == 0 and torch.count_nonzero(c) == 0


def test_two_rule_setters_are_refused_at_attach():
    pipe = pipe_for("sd")
    with pytest.raises(DlxError, match="set the guidance rule"):
        with dlx.attach(pipe, RuleControl(Halfway()), RuleControl(Halfway())):
            pass
    with pytest.raises(DlxError, match=r"of sample 0 set the guidance rule"):
        with dlx.attach(pipe, RuleControl(Halfway()), per_sample=[[RuleControl(Halfway())]]):
            pass


def test_per_sample_controls_equal_each_config_recorded_alone():
    pipe = pipe_for("sd")
    configs = [[dlx.CFGCutoff(0.5)], [dlx.GuidanceInterval(0.25, 1.0)], [dlx.AdaptiveCutoff(0.5)], []]
    gens = [torch.Generator().manual_seed(3) for _ in configs]
    with dlx.record(pipe, per_sample=configs) as trace:
        both = run(pipe, "sd", num_images_per_prompt=len(configs), generator=gens)
    again = [[dlx.CFGCutoff(0.5)], [dlx.GuidanceInterval(0.25, 1.0)], [dlx.AdaptiveCutoff(0.5)], []]
    for j, parts in enumerate(again):
        with dlx.record(pipe, *parts) as alone:
            one = run(pipe, "sd", generator=torch.Generator().manual_seed(3))
        # batched matmuls round differently: latents (|x| up to ~8) agree within 1e-4 (measured 1.8e-5)
        assert (both[j] - one[0]).abs().max().item() <= 1e-4
        assert trace.nfe[j] == alone.nfe[0]
        assert [s.cfg_active[j] for s in trace.steps] == [s.cfg_active[0] for s in alone.steps]


def test_per_sample_arguments_are_checked():
    pipe = pipe_for("sd")
    with pytest.raises(DlxError, match="per_sample"):
        with dlx.attach(pipe, per_sample="CFGCutoff"):
            pass
    with pytest.raises(DlxError, match=r"per_sample\[0\]`: Interrupt acts at the end of each step"):
        with dlx.attach(pipe, per_sample=[[dlx.Interrupt(after_step=1)]]):
            pass
    with pytest.raises(DlxError, match=r"`scales` has 1 values but `per_sample` has 2"):
        with dlx.attach(pipe, per_sample=[[], []], scales=[3.0]):
            pass
    with pytest.raises(DlxError, match=r"`per_sample` has 2 entries .* batch 1"):
        with dlx.attach(pipe, per_sample=[[], []]):
            run(pipe, "sd")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_sweep_row_counts_what_the_config_recorded_alone_counts(family, tmp_path):
    # One truth: a sweep row's NFE and guided steps are those of the same config recorded alone
    # with dlx.record (both read the run's one record).
    from dlx.testing import example_inputs

    pipe = pipe_for(family)
    call = {k: v for k, v in example_inputs(family, steps=4).items()
            if k not in ("prompt", "generator", "output_type", "num_images_per_prompt")}
    configs = {"cut .5": dlx.CFGCutoff(0.5), "interval": dlx.GuidanceInterval(0.25, 0.75),
               "adaptive": dlx.AdaptiveCutoff(0.5), "full": None}
    if family != "flux":  # Flux applies its true-CFG scale itself: no scale schedules
        configs["linear"] = dlx.GuidanceSchedule("linear", low=1.0, high=8.0)
    res = dlx.sweep(pipe, prompts=["a red circle", "a blue square"], seeds=[0, 1], configs=configs,
                    out=tmp_path, timing=(), progress=False, metrics=[], **call)
    f = res.frame
    assert (f.status == "ok").all()
    cfgs = {c.name: c for c in res.spec.configs}
    for r in f.itertuples():
        with dlx.record(pipe, *cfgs[r.config].parts()) as alone:
            img = pipe(r.prompt, generator=torch.Generator().manual_seed(r.seed), output_type="pt", **call).images[0]
        assert r.nfe == alone.nfe[0], (r.config, r.nfe, alone.nfe)
        assert r.guided_steps == sum(s.cfg_active[0] for s in alone.steps), r.config
        # and the row's image is the config's alone, within the sweep's stated guarantee (one level)
        want = (img.permute(1, 2, 0).float().numpy() * 255).round().clip(0, 255).astype("int16")
        with Image.open(r.image) as im:
            got = np.asarray(im.convert("RGB")).astype("int16")
        assert np.abs(got - want).max() <= 1, r.config


def test_the_documented_custom_control_runs_as_written():
    # docs/custom_control.md: a control written in one short file, run and recorded as shown.
    text = (Path(__file__).parents[1] / "docs" / "custom_control.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/custom_control.md has no python block"
    ns: dict = {}
    exec(compile("\n".join(blocks), "custom_control.md", "exec"), ns)  # noqa: S102 - our own docs
    trace = ns["trace"]
    assert [s.cfg_active for s in trace.steps] == [[True], [False], [True], [False]]
    assert trace.nfe == [6.0]
    assert ns["EveryOther"](period=2).config() == {"type": "EveryOther", "args": {}}
    assert dlx.part_from_config({"type": "EveryOther", "args": {"period": 3}}).period == 3


def test_a_schedule_beside_a_rule_is_refused_before_any_work(tmp_path):
    # A rule guides at its own scale: a schedule beside it would be silently ignored.
    pipe = pipe_for("sd")
    with pytest.raises(DlxError, match="GuidanceSchedule sets the guidance scale and RuleControl the guidance rule"):
        with dlx.attach(pipe, dlx.GuidanceSchedule("linear"), RuleControl(Halfway())):
            pass
    with pytest.raises(DlxError, match="on sample 1"):
        with dlx.attach(pipe, per_sample=[[], [dlx.GuidanceSchedule("linear"), RuleControl(Halfway())]]):
            pass
    from diffusers.guiders import ClassifierFreeGuidance

    with pytest.raises(DlxError, match="config 'both': GuidanceSchedule sets the guidance scale and Guider"):
        dlx.sweep(pipe, prompts=["a"], seeds=[0], out=tmp_path, timing=(), progress=False,
                  configs={"both": [dlx.GuidanceSchedule("linear"), dlx.Guider(ClassifierFreeGuidance(guidance_scale=3.0))]})


# -- regressions found by the review of the merged redesign --------------------------------------

def test_flux_with_a_rule_whose_window_closes_before_the_end():
    from diffusers.guiders import ClassifierFreeGuidance

    pipe = pipe_for("flux")
    for parts in ([dlx.Guider(ClassifierFreeGuidance(guidance_scale=4.0)), dlx.CFGCutoff(0.5)],
                  [dlx.Guider(ClassifierFreeGuidance(guidance_scale=4.0, stop=0.5))]):
        with dlx.record(pipe, *parts) as trace:
            run(pipe, "flux")
        assert [s.cfg_active for s in trace.steps] == [[True], [True], [False], [False]]
        assert trace.nfe == [6.0]


def test_flux_zero_init_steps_evaluate_nothing():
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    pipe = pipe_for("flux")
    with dlx.record(pipe, dlx.Guider(ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1))) as trace:
        run(pipe, "flux")
    assert trace[0].nfe == [0.0] and trace[0].evaluations == 0
    assert [s.nfe for s in trace.steps[1:]] == [[2.0]] * 3


def test_share_never_evaluates_a_stateful_rule_sample_as_another_ones_copy():
    # APG momentum is a sample's own history: shared samples that part must not lose it.
    from diffusers.guiders import AdaptiveProjectedGuidance

    pipe = pipe_for("sd")
    mk = lambda: dlx.Guider(AdaptiveProjectedGuidance(guidance_scale=5.0, eta=0.0,  # noqa: E731
                                                      adaptive_projected_guidance_momentum=-0.5))
    gens = lambda: [torch.Generator().manual_seed(4) for _ in range(2)]  # noqa: E731
    with dlx.attach(pipe, mk(), dlx.CFGCutoff([0.5, 1.0]), dlx.Share(["k", "k"])):
        shared = run(pipe, "sd", num_images_per_prompt=2, generator=gens())
    with dlx.attach(pipe, mk(), dlx.CFGCutoff([0.5, 1.0])):
        plain = run(pipe, "sd", num_images_per_prompt=2, generator=gens())
    assert (shared - plain).abs().max().item() <= 1e-4


def test_sample_scales_without_per_sample_controls():
    pipe = pipe_for("sd")
    with dlx.record(pipe, scales=[0.5, 5.0]) as trace:
        both = run(pipe, "sd", num_images_per_prompt=2, guidance_scale=5.0,
                   generator=[torch.Generator().manual_seed(1) for _ in range(2)])
    assert trace.nfe == [4.0, 8.0] and [s.cfg_active for s in trace.steps] == [[False, True]] * 4
    alone = run(pipe, "sd", guidance_scale=0.5, generator=torch.Generator().manual_seed(1))
    assert (both[0] - alone[0]).abs().max().item() <= 1e-4
    assert dlx.labels.config_label(trace, 0) == "no CFG (scale ≤ 1)"
    assert dlx.labels.config_label(trace, 1) == "full CFG + scale 5"
    with pytest.raises(DlxError, match=r"`scales` guides samples at 8, but the call's guidance_scale is 1"):
        with dlx.attach(pipe, scales=[5.0, 8.0]):
            run(pipe, "sd", num_images_per_prompt=2, guidance_scale=1.0)


def test_per_sample_traces_are_labelled_with_each_samples_controls():
    pipe = pipe_for("sd")
    with dlx.record(pipe, per_sample=[[dlx.CFGCutoff(0.5)], []]) as trace:
        run(pipe, "sd", num_images_per_prompt=2)
    assert dlx.labels.config_label(trace, 0) == "CFGCutoff(ratio=0.5)"
    assert dlx.labels.config_label(trace, 1) == "full CFG"
    assert dlx.labels.config_label(trace) == "2 samples, each its own controls"


def test_a_guider_in_a_sweep_shows_its_own_scale_and_refuses_scales_it_ignores(tmp_path):
    from diffusers.guiders import ClassifierFreeGuidance

    pipe = pipe_for("sd")
    g7 = dlx.Guider(ClassifierFreeGuidance(guidance_scale=7.0))
    with pytest.raises(DlxError, match=r"config 'g7': Guider needs the pipeline's unconditional batch"):
        dlx.sweep(pipe, prompts=["a"], seeds=[0], configs={"g7": g7, "full": None}, guidance_scales=[1.0],
                  out=tmp_path / "a", timing=(), progress=False)
    with pytest.raises(DlxError, match=r"crossing it with guidance_scales=\[3.0, 4.0\] would only relabel it"):
        dlx.sweep(pipe, prompts=["a"], seeds=[0], configs={"g7": g7, "full": None}, guidance_scales=[3.0, 4.0],
                  out=tmp_path / "b", timing=(), progress=False)
    res = dlx.sweep(pipe, prompts=["a"], seeds=[0], configs={"g7": g7, "full": None}, out=tmp_path / "c",
                    timing=(), progress=False, metrics=["psnr"], num_inference_steps=4, guidance_scale=4.0,
                    height=32, width=32)
    f = res.frame.set_index("config")
    assert f.loc["g7", "guidance_scale"] == 7.0 and f.loc["full", "guidance_scale"] == 4.0
    assert res.summary().set_index("config").loc["g7", "guidance_scale"] == 7.0


def test_a_config_identical_to_full_guidance_on_every_pair_shows_infinite_psnr(tmp_path):
    pipe = pipe_for("sd")
    res = dlx.sweep(pipe, prompts=["a", "b"], seeds=[0], configs={"same": dlx.GuidanceSchedule("constant"),
                    "cut": dlx.CFGCutoff(0.5), "full": None}, out=tmp_path, timing=(), progress=False,
                    metrics=["psnr"], num_inference_steps=4, guidance_scale=5.0, height=32, width=32)
    s = res.summary().set_index("config")
    assert s.loc["same", "psnr"] == math.inf and math.isfinite(s.loc["cut", "psnr"])
