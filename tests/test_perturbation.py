"""Perturbation guiders (SLG, PAG, SEG) through the tap's third, perturbed pass.

The perturbed pass is diffusers' own hooks on the denoiser (``diffusers.hooks``), applied for one
pass and then undone so the pipeline is left exactly as found; the combination is the guider's own
``forward``. The references here are independent of dlx's seam: SD3's own skip-layer guidance in
the pipeline (bitwise), and the hooks applied the way diffusers' modular pipelines apply them
(``prepare_models`` over the guider's batches) to the very inputs of the step.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

import dlx
from dlx import DlxError

from dlx._diffusers import modules_restored

from .helpers import bitwise, pipe_for, pipeline_state, run

G = pytest.importorskip("diffusers.guiders")
from diffusers.hooks import HookRegistry, LayerSkipConfig, ModelHook  # noqa: E402

logging.getLogger("diffusers.guiders.guider_utils").setLevel(logging.ERROR)

MID = "mid_block.attentions.0.transformer_blocks"  # the tiny UNets' mid-block transformer blocks
BATCH_TOL = dict(rtol=1e-5, atol=1e-4)  # a sample alone vs in a batch: the denoiser at another batch size


def _pag(**kw):
    return G.PerturbedAttentionGuidance(
        perturbed_guidance_config={"indices": [0], "fqn": MID, "skip_attention": False,
                                   "skip_attention_scores": True, "skip_ff": False}, **kw)


#: (family, guider) pairs dlx runs, with windows that leave steps of every kind in 4 steps
CASES = {
    "sd-pag": ("sd", lambda: _pag(guidance_scale=4.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0,
                                  perturbed_guidance_stop=1.0)),
    "sd-slg": ("sd", lambda: G.SkipLayerGuidance(guidance_scale=4.0, skip_layer_guidance_scale=2.0,
                                                 skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.75,
                                                 skip_layer_config={"indices": [0], "fqn": MID})),
    "sd-seg": ("sd", lambda: G.SmoothedEnergyGuidance(guidance_scale=4.0, seg_guidance_scale=2.0, seg_blur_sigma=2.0,
                                                      seg_guidance_config={"indices": [0], "fqn": MID})),
    "sdxl-pag": ("sdxl", lambda: _pag(guidance_scale=4.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0,
                                      perturbed_guidance_stop=1.0)),
    "sdxl-slg": ("sdxl", lambda: G.SkipLayerGuidance(guidance_scale=4.0, skip_layer_guidance_scale=2.0,
                                                     skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
                                                     skip_layer_config={"indices": [0], "fqn": MID})),
    "sdxl-seg": ("sdxl", lambda: G.SmoothedEnergyGuidance(guidance_scale=4.0, seg_guidance_scale=2.0,
                                                          seg_blur_sigma=2.0, seg_guidance_config={"indices": [0], "fqn": MID})),
    "sd3-slg": ("sd3", lambda: G.SkipLayerGuidance(guidance_scale=4.0, skip_layer_guidance_scale=2.0,
                                                   skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
                                                   skip_layer_guidance_layers=[0])),
    "sd3-seg": ("sd3", lambda: G.SmoothedEnergyGuidance(guidance_scale=4.0, seg_guidance_scale=2.0,
                                                        seg_blur_sigma=2.0, seg_guidance_layers=[0])),
}


class _Calls(dlx.Part):
    """Keeps each step's conditional, unconditional and guided predictions (the scheduler's input)."""

    wants_calls = True

    def __init__(self):
        self.steps = {}

    def on_denoiser(self, run, call):
        self.steps[call.step] = (call.cond.clone(), None if call.uncond is None else call.uncond.clone(),
                                 call.guided.clone())


class _Spy:
    """Wraps the denoiser's forward under dlx's tap: every call dlx makes, with its inputs and
    whether diffusers' hooks were on the denoiser at the time."""

    def __init__(self, den):
        self.den, self.calls = den, []
        self.orig = type(den).forward.__get__(den)

    def __call__(self, *args, **kwargs):
        hooked = any(getattr(m.__dict__.get("_diffusers_hook"), "hooks", None) for m in self.den.modules())
        out = self.orig(*args, **kwargs)
        self.calls.append((hooked, args, kwargs, out[0] if isinstance(out, tuple) else out.sample))
        return out


def _rows(obj, n, idx):
    from dlx._diffusers import map_batch

    return map_batch(obj, n, lambda t: t[idx])


@pytest.mark.parametrize("case", sorted(CASES))
def test_perturbed_pass_is_diffusers_own_and_the_step_is_the_guiders_forward(case):
    family, make = CASES[case]
    pipe = pipe_for(family)
    den = getattr(pipe, "unet" if family != "sd3" else "transformer")
    run(pipe, family, steps=1, guidance_scale=4.0)  # the pipeline's own flags set by a call
    before = pipeline_state(pipe)
    guider = make()
    spy = _Spy(den)
    den.forward = spy
    calls = _Calls()
    part = dlx.Guider(guider)
    try:
        with dlx.attach(pipe, part, calls):
            run(pipe, family, steps=4, guidance_scale=4.0)
    finally:
        del den.forward
    assert pipeline_state(pipe) == before, "every module left as found"
    perturbed = part.report["perturbed_steps"][0]
    assert perturbed, "the window has perturbed steps"
    main = [c for c in spy.calls if not c[0]]
    pert = [c for c in spy.calls if c[0]]
    assert len(main) == 4 and len(pert) == len(perturbed)
    ref_guider = make()
    for step, (_, args, kwargs, out) in zip(perturbed, pert):
        _, margs, mkw, _ = main[step]
        n = (margs[0] if margs else mkw.get("sample", mkw.get("hidden_states"))).shape[0]
        # the perturbed pass's inputs are the step's conditional rows (the last row of the main call)
        c_args, c_kw = _rows((margs, mkw), n, slice(n - 1, n))
        for a, b in zip(torch.utils._pytree.tree_leaves((args, kwargs)), torch.utils._pytree.tree_leaves((c_args, c_kw))):
            if isinstance(a, torch.Tensor):
                assert bitwise(a, b)
        # diffusers' modular loop: set_state, then prepare_models / run / cleanup_models per batch;
        # the guider's third batch is the perturbed one (SEG's prepare_models never hooks in
        # diffusers 0.42.1, so its helper is called as prepare_models would)
        ref_guider.set_state(step, 4, None)
        with modules_restored(list(den.modules())):  # diffusers' cleanup_models leaves registries behind
            if family == "sd3" and type(ref_guider).__name__ == "SkipLayerGuidance":
                # SD3's own skip-layer argument (diffusers 0.42.1's block-skip hook returns SD3's
                # pair in the wrong order, which dlx corrects)
                ref = den(*c_args, **c_kw, skip_layers=[0])
            elif type(ref_guider).__name__ == "SmoothedEnergyGuidance":
                # its prepare_models never hooks in diffusers 0.42.1: the helper it would call
                from diffusers.hooks.smoothed_energy_guidance_utils import _apply_smoothed_energy_guidance_hook

                for name, cfg in zip(ref_guider._seg_layer_hook_names, ref_guider.seg_guidance_config):
                    cfg.indices = [cfg.indices] if isinstance(cfg.indices, int) else cfg.indices
                    _apply_smoothed_energy_guidance_hook(den, cfg, ref_guider.seg_blur_sigma, name=name)
                ref = den(*c_args, **c_kw)
            else:
                for cfg in ref_guider.skip_layer_config:  # diffusers 0.42.1: an int from `..._layers`
                    cfg.indices = [cfg.indices] if isinstance(cfg.indices, int) else cfg.indices
                for _ in range(3):  # conditional, unconditional, perturbed: the third is hooked
                    ref_guider.prepare_models(den)
                ref = den(*c_args, **c_kw)
            ref = ref[0] if isinstance(ref, tuple) else ref.sample
        assert bitwise(out, ref), f"step {step}: dlx's perturbed pass is diffusers' hooked denoiser"
        cond, uncond, guided = calls.steps[step]
        want = ref_guider.forward(cond, uncond, ref).pred
        torch.testing.assert_close(guided, want, rtol=0, atol=1e-6)
        assert (ref - cond).abs().max() > 1e-4, "the perturbation changes the prediction"


AUTO = {
    "sd": lambda: G.AutoGuidance(guidance_scale=4.0, auto_guidance_config={"indices": [0], "fqn": MID, "dropout": 1.0}),
    "sdxl": lambda: G.AutoGuidance(guidance_scale=4.0, auto_guidance_config={"indices": [0], "fqn": MID, "dropout": 1.0}),
    "sd3": lambda: G.AutoGuidance(guidance_scale=4.0, auto_guidance_layers=[0], dropout=1.0, stop=0.75),
}


@pytest.mark.parametrize("family", sorted(AUTO))
def test_autoguidance_runs_the_unconditional_pass_through_diffusers_weaker_model(family):
    pipe = pipe_for(family)
    den = getattr(pipe, "unet" if family != "sd3" else "transformer")
    run(pipe, family, steps=1, guidance_scale=4.0)
    before = pipeline_state(pipe)
    spy, calls, part = _Spy(den), _Calls(), dlx.Guider(AUTO[family]())
    den.forward = spy
    try:
        with dlx.record(pipe, part, calls) as trace:
            run(pipe, family, steps=4, guidance_scale=4.0)
    finally:
        del den.forward
    assert pipeline_state(pipe) == before
    guided = part.report["guided_steps"][0]
    assert guided == ([0, 1, 2] if family == "sd3" else [0, 1, 2, 3])  # diffusers' window int(.75·4) = 3
    assert trace.nfe == [4.0 + len(guided)], "one unconditional pass per guided step, as CFG"
    hooked = [c for c in spy.calls if c[0]]
    plain = [c for c in spy.calls if not c[0]]
    assert len(hooked) == len(guided) and len(plain) == 4
    if family == "sd":  # the weaker model sees the negative prompt: the pipeline's unconditional rows
        _, neg = pipe.encode_prompt("a red circle", "cpu", 1, True)
        assert all(bitwise(kw["encoder_hidden_states"], neg) for _, _, kw, _ in hooked)
    ref_guider = AUTO[family]()
    for step, (_, args, kwargs, out) in zip(guided, hooked):
        ref_guider.set_state(step, 4, None)
        with modules_restored(list(den.modules())):
            for cfg in ref_guider.auto_guidance_config:  # diffusers 0.42.1: an int from `auto_guidance_layers`
                cfg.indices = [cfg.indices] if isinstance(cfg.indices, int) else cfg.indices
            if family == "sd3":  # its block-skip hook returns SD3's pair reversed (0.42.1): the model's own skip
                ref = den(*args, **kwargs, skip_layers=[0])
            else:
                for _ in range(2):  # conditional, then unconditional: the second is hooked
                    ref_guider.prepare_models(den)
                ref = den(*args, **kwargs)
            ref = ref[0] if isinstance(ref, tuple) else ref.sample
        assert bitwise(out, ref), f"step {step}: the weaker model is diffusers' hooked denoiser"
        cond, uncond, g = calls.steps[step]
        assert bitwise(uncond, out)
        torch.testing.assert_close(g, ref_guider.forward(cond, ref).pred, rtol=0, atol=1e-6)


def test_autoguidance_with_random_dropout_is_refused_when_built():
    with pytest.raises(DlxError, match="dropout"):
        dlx.Guider(G.AutoGuidance(auto_guidance_layers=[0], dropout=0.5))


def _identity_block(block):
    """A Flux transformer block replaced by the identity: (encoder_hidden_states, hidden_states) in,
    out in the block's own order (the reference for a skipped block)."""
    def forward(*args, **kwargs):
        return kwargs["encoder_hidden_states"], kwargs["hidden_states"]
    return forward


@pytest.mark.parametrize("kind", ["slg", "auto"])
def test_flux_skip_layer_and_autoguidance_equal_the_model_with_the_block_removed(kind):
    pipe = pipe_for("flux")
    den = pipe.transformer
    if kind == "slg":
        make = lambda: G.SkipLayerGuidance(  # noqa: E731
            guidance_scale=4.0, skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.0,
            skip_layer_guidance_stop=1.0, skip_layer_config={"indices": [0], "fqn": "transformer_blocks"})
    else:
        make = lambda: G.AutoGuidance(  # noqa: E731
            guidance_scale=4.0, auto_guidance_config={"indices": [0], "fqn": "transformer_blocks", "dropout": 1.0})
    run(pipe, "flux", steps=1, guidance_scale=4.0)
    before = pipeline_state(pipe)
    spy, calls, part = _Spy(den), _Calls(), dlx.Guider(make())
    den.forward = spy
    try:
        with dlx.record(pipe, part, calls) as trace:
            run(pipe, "flux", steps=4, guidance_scale=4.0)
    finally:
        del den.forward
    assert pipeline_state(pipe) == before
    hooked = [c for c in spy.calls if c[0]]
    steps = part.report["perturbed_steps"][0] if kind == "slg" else part.report["guided_steps"][0]
    assert steps == ([1, 2, 3] if kind == "slg" else [0, 1, 2, 3]) and len(hooked) == len(steps)
    assert trace.nfe == [4.0 + 4 + len(steps) if kind == "slg" else 8.0]
    block = den.transformer_blocks[0]
    for step, (_, args, kwargs, out) in zip(steps, hooked):
        block.forward = _identity_block(block)
        try:
            ref = den(*args, **kwargs)
        finally:
            del block.forward
        ref = ref[0] if isinstance(ref, tuple) else ref.sample
        assert bitwise(out, ref), f"step {step}: the perturbed pass is the model without the block"
        cond, uncond, g = calls.steps[step]
        want = make()
        want.set_state(step, 4, None)
        want = want.forward(cond, uncond, ref).pred if kind == "slg" else want.forward(cond, ref).pred
        torch.testing.assert_close(g, want, rtol=0, atol=1e-6)


def test_an_ambiguous_auto_fqn_is_refused_on_flux():
    pipe = pipe_for("flux")
    with pytest.raises(DlxError, match="ambiguous") as e:
        with dlx.attach(pipe, dlx.Guider(G.SkipLayerGuidance(skip_layer_guidance_layers=[0]))):
            run(pipe, "flux", steps=2, guidance_scale=4.0)
    assert "single_transformer_blocks" in str(e.value)


def test_slg_on_sd3_is_the_pipelines_own_skip_layer_guidance_bitwise():
    pipe = pipe_for("sd3")
    native = run(pipe, "sd3", steps=4, guidance_scale=3.0, skip_guidance_layers=[0], skip_layer_guidance_scale=2.0,
                 skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.75)
    part = dlx.Guider(G.SkipLayerGuidance(guidance_scale=3.0, skip_layer_guidance_scale=2.0,
                                          skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.75,
                                          skip_layer_guidance_layers=[0]))
    with dlx.record(pipe, part) as trace:
        ours = run(pipe, "sd3", steps=4, guidance_scale=3.0)
    assert bitwise(ours, native)
    assert part.report["perturbed_steps"] == [[1, 2]] and part.report["guided_steps"] == [[0, 1, 2, 3]]
    assert trace.nfe == [10.0], "4 conditional + 4 unconditional + 2 perturbed passes"
    assert not bitwise(ours, run(pipe, "sd3", steps=4, guidance_scale=3.0))


def test_a_cutoff_cuts_the_unconditional_pass_and_the_perturbed_pass_keeps_its_window():
    pipe = pipe_for("sd3")
    make = CASES["sd3-slg"][1]
    part, calls = dlx.Guider(make()), _Calls()
    den = pipe.transformer
    spy = _Spy(den)
    den.forward = spy
    try:
        with dlx.record(pipe, part, dlx.CFGCutoff(0.5), calls) as trace:
            run(pipe, "sd3", steps=4, guidance_scale=4.0)
    finally:
        del den.forward
    assert part.report["guided_steps"] == [[0, 1]]
    assert part.report["perturbed_steps"] == [[1, 2, 3]], "diffusers' window: int(0·4) < i < int(1·4)"
    assert trace.nfe == [4.0 + 2 + 3]
    assert [s.nfe for s in trace.steps] == [[2.0], [3.0], [2.0], [2.0]]
    skips = [out for hooked, _, _, out in spy.calls if hooked]
    assert len(skips) == 3
    # past the cutoff: no unconditional pass, and the guider's own perturbed-only branch,
    # skip + s·(c − skip), where its own window alone would still have guided with CFG
    for step, skip in zip((2, 3), skips[1:]):
        cond, uncond, guided = calls.steps[step]
        assert uncond is None
        torch.testing.assert_close(guided, skip + 2.0 * (cond - skip), rtol=0, atol=1e-6)
        g = make()
        g.set_state(step, 4, None)
        assert g._is_cfg_enabled(), "the cutoff, not the guider's window, cut the unconditional pass"


def test_mixed_perturbation_and_combination_guiders_in_one_batch_equal_each_sample_alone():
    pipe = pipe_for("sd")
    gs = [CASES["sd-pag"][1](), G.ClassifierFreeGuidance(guidance_scale=4.0), CASES["sd-slg"][1](), AUTO["sd"]()]
    batch = None
    with dlx.attach(pipe, dlx.Guider(gs)):
        batch = run(pipe, "sd", steps=4, guidance_scale=4.0, batch=4)
    for j, g in enumerate(gs):
        with dlx.attach(pipe, dlx.Guider(g)):
            alone = run(pipe, "sd", steps=4, guidance_scale=4.0, batch=4)[j]
        torch.testing.assert_close(batch[j], alone, **BATCH_TOL)


def test_hooks_are_undone_when_the_perturbed_pass_fails_and_a_users_own_hooks_survive():
    pipe = pipe_for("sd")
    den = pipe.unet
    block = den.get_submodule(MID)[0]

    class Noop(ModelHook):
        pass

    HookRegistry.check_if_exists_or_initialize(block.attn1).register_hook(Noop(), "user")
    ref = run(pipe, "sd", steps=4, guidance_scale=4.0)
    before = pipeline_state(pipe)

    def boom(module, args):  # raises inside the perturbed pass only: PAG's hook is on attn1 then
        if len(block.attn1._diffusers_hook.hooks) > 1:
            raise RuntimeError("boom")

    handle = block.norm1.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with dlx.attach(pipe, dlx.Guider(CASES["sd-pag"][1]())):
                run(pipe, "sd", steps=4, guidance_scale=4.0)
    finally:
        handle.remove()
    assert pipeline_state(pipe) == before
    assert list(block.attn1._diffusers_hook.hooks) == ["user"]
    assert bitwise(run(pipe, "sd", steps=4, guidance_scale=4.0), ref)
    block.attn1._diffusers_hook.remove_hook("user", recurse=False)


def test_per_sample_parts_see_what_a_sample_stepped_with_where_only_its_perturbed_pass_ran():
    pipe = pipe_for("sd3")
    whole, own = _Calls(), _Calls()
    with dlx.attach(pipe, dlx.Guider(CASES["sd3-slg"][1]()), dlx.CFGCutoff(0.5), whole):
        run(pipe, "sd3", steps=4, guidance_scale=4.0)
    with dlx.attach(pipe, per_sample=[[dlx.Guider(CASES["sd3-slg"][1]()), dlx.CFGCutoff(0.5), own]]):
        run(pipe, "sd3", steps=4, guidance_scale=4.0)
    for step in (2, 3):  # past the cutoff: no unconditional pass, the perturbed pass still runs
        assert whole.steps[step][1] is None and own.steps[step][1] is None
        assert bitwise(own.steps[step][2], whole.steps[step][2])
        assert not torch.equal(own.steps[step][2], own.steps[step][0])


def test_a_sample_at_scale_one_gets_no_perturbed_pass_as_when_run_alone():
    pipe = pipe_for("sd")
    with dlx.record(pipe, dlx.Guider(CASES["sd-slg"][1]()), scales=[4.0, 1.0]) as trace:
        run(pipe, "sd", steps=4, guidance_scale=4.0, batch=2)
    assert trace.nfe == [4.0 + 4 + 2, 4.0]


def test_perturbation_guiders_record_and_rebuild_through_the_one_config_format():
    for make in [m for _, m in CASES.values()] + list(AUTO.values()):
        part = dlx.Guider(make())
        cfg = part.config()
        back = dlx.part_from_config(json.loads(json.dumps(cfg)))
        assert back.config() == cfg
    obj = G.SkipLayerGuidance(skip_layer_config=LayerSkipConfig([0], fqn=MID))
    cfg = dlx.Guider(obj).config()
    assert cfg["args"]["config"]["skip_layer_config"]["fqn"] == MID
    assert dlx.part_from_config(json.loads(json.dumps(cfg))).config() == cfg


def test_sweep_rows_with_a_perturbation_guider_equal_the_config_run_alone(tmp_path):
    import numpy as np
    from PIL import Image

    pipe = pipe_for("sd")
    slg = dlx.Guider(CASES["sd-slg"][1]())
    configs = {"cfg": None, "slg": slg, "slg@0.5": [slg, dlx.CFGCutoff(0.5)], "pag": dlx.Guider(CASES["sd-pag"][1]()),
               "auto@0.5": [dlx.Guider(AUTO["sd"]()), dlx.CFGCutoff(0.5)],
               "apg": dlx.Guider(G.AdaptiveProjectedGuidance(guidance_scale=4.0, eta=0.0)),
               "apg@0.5": [dlx.Guider(G.AdaptiveProjectedGuidance(guidance_scale=4.0, eta=0.0)), dlx.CFGCutoff(0.5)]}
    res = dlx.sweep(pipe, prompts=["a red circle"], seeds=[0, 1], steps=4, guidance_scale=4.0, configs=configs,
                    out=tmp_path, progress=False, metrics=[])
    f = res.frame
    assert (f.status == "ok").all()
    cfgs = {c.name: c for c in res.spec.configs}
    nfe = {}
    for r in f.itertuples():
        with dlx.record(pipe, *cfgs[r.config].parts()) as alone:
            img = pipe(r.prompt, num_inference_steps=4, guidance_scale=4.0, output_type="pt",
                       generator=torch.Generator().manual_seed(r.seed)).images[0]
        assert r.nfe == alone.nfe[0], (r.config, r.nfe, alone.nfe)
        nfe[r.config] = r.nfe
        want = (img.permute(1, 2, 0).float().numpy() * 255).round().clip(0, 255).astype("int16")
        with Image.open(r.image) as im:
            got = np.asarray(im.convert("RGB")).astype("int16")
        assert np.abs(got - want).max() <= 1, r.config
    # 4 conditional; unconditional at every guided step; perturbed at int(0·4) < i < int(.75·4)
    assert nfe == {"cfg": 8.0, "slg": 10.0, "slg@0.5": 8.0, "pag": 11.0, "auto@0.5": 6.0, "apg": 8.0, "apg@0.5": 6.0}
    # rows of one guider share their guided prefix (dlx.Share groups equal rules by config): slg and
    # slg@0.5 at steps 0-1 (2 + 3 rows), apg and apg@0.5 at steps 0-1 (2 + 2), per seed
    assert f.nfe.sum() - f.evaluations.sum() == pytest.approx(2 * (5 + 4))
    # the predicted standalone time counts the perturbed passes (one conditional call each)
    from dlx.sweeps.cost import predict_ms

    c = res.costs("eager")[(4, 4.0)]
    for r in f.itertuples():
        passes = {"cfg": 0, "slg": 2, "slg@0.5": 2, "pag": 3, "auto@0.5": 0, "apg": 0, "apg@0.5": 0}[r.config]
        assert r.time_eager_s == pytest.approx(predict_ms(c, r.guided_steps, 4, passes) / 1e3)
    s = res.summary().set_index("config")
    assert s.loc["pag", "time_eager_vs_full"] > s.loc["cfg", "time_eager_vs_full"] == 1.0


@pytest.mark.parametrize("family,make,match", [
    ("sd3", lambda: _pag(), "JointAttnProcessor2_0"),
    ("flux", lambda: _pag(), "PerturbedAttentionGuidance is not supported on flux"),
    ("sd-controlnet", lambda: G.SkipLayerGuidance(skip_layer_config={"indices": [0], "fqn": MID}),
     "not supported on sd-controlnet"),
    ("sd", lambda: G.PerturbedAttentionGuidance(perturbed_guidance_layers=[0]), "transformer-block lists"),
    ("sd", lambda: G.SkipLayerGuidance(skip_layer_config={"indices": [99], "fqn": MID}), "indices"),
    ("sd", lambda: G.SkipLayerGuidance(skip_layer_config={"indices": [0, 5], "fqn": MID}), r"indices \[5\]"),
    ("sd", lambda: G.PerturbedAttentionGuidance(perturbed_guidance_config={
        "indices": [0], "fqn": "up_blocks", "skip_attention": False, "skip_attention_scores": True, "skip_ff": False}),
     "perturbed_guidance_config.*nothing to perturb"),
    ("sd", lambda: G.SkipLayerGuidance(skip_layer_config={"indices": [0], "fqn": MID, "skip_attention": False,
                                                          "skip_ff": False}), "skip_layer_config.*nothing to perturb"),
    ("sd", lambda: G.AutoGuidance(auto_guidance_layers=[0], dropout=1.0), "auto_guidance_config="),
])
def test_perturbation_guiders_that_cannot_run_are_refused_before_the_loop(family, make, match):
    pipe = pipe_for(family)
    run(pipe, family, steps=1)
    before = pipeline_state(pipe)
    steps = []
    with pytest.raises(DlxError, match=match) as e:
        with dlx.attach(pipe, dlx.Guider(make())):
            run(pipe, family, steps=2, callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert steps == [], "refused before any step"
    assert type(make()).__name__ in str(e.value)
    assert pipeline_state(pipe) == before


def test_a_compiled_denoiser_is_refused_for_a_perturbation_guider():
    pipe = pipe_for("sd")
    unet = pipe.unet
    block = unet.get_submodule(MID)[0]

    def refused():
        with pytest.raises(DlxError, match="compiled"):
            with dlx.attach(pipe, dlx.Guider(CASES["sd-pag"][1]())):
                run(pipe, "sd", steps=2)

    pipe.unet = torch.compile(unet)
    try:
        refused()
    finally:
        pipe.unet = unet
    block.compile()  # in place, one region: not an OptimizedModule
    try:
        refused()
    finally:
        block._compiled_call_impl = None


# -- the diffusers 0.42.1 faults dlx wraps: pinned, so a fixed diffusers tells us to drop each -----

def test_diffusers_faults_wrapped_for_perturbation_guiders_are_still_there():
    from diffusers.hooks.layer_skip import TransformerBlockSkipHook, _apply_layer_skip_hook

    # 1. `..._layers=[7]` makes LayerSkipConfig(7): an int `indices` the hook helper cannot take
    g = G.SkipLayerGuidance(skip_layer_guidance_layers=[0])
    assert g.skip_layer_config[0].indices == 0
    pipe = pipe_for("sd3")
    den = pipe.transformer
    with modules_restored(list(den.modules())):
        with pytest.raises(TypeError):
            _apply_layer_skip_hook(den, g.skip_layer_config[0], name="x")
    # 2. SmoothedEnergyGuidance's prepare_models never counts its batches, so never hooks
    seg = G.SmoothedEnergyGuidance(seg_guidance_layers=[0], seg_guidance_start=0.0)
    seg.set_state(2, 4, None)
    with modules_restored(list(den.modules())):
        for _ in range(3):
            seg.prepare_models(den)
        assert not any(getattr(m.__dict__.get("_diffusers_hook"), "hooks", None) for m in den.modules())
    # 3. a skipped JointTransformerBlock returns (hidden, encoder), the reverse of the block's order
    assert "return_hidden_states_index" not in TransformerBlockSkipHook.new_forward.__code__.co_names
