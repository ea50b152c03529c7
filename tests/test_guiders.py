"""dlx.Guider: diffusers' guiders on the classic pipelines.

The maths is diffusers' own: each test compares dlx's combination with the guider's ``forward``
on the same conditional and unconditional tensors (float32, within 1e-6, or bitwise where dlx
calls the very same code), and pins the diffusers 0.42.1 faults dlx wraps so that a fixed
diffusers tells us to drop the workaround.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

import dlx
from dlx import DlxError
from dlx.families import FAMILIES, PERTURBATION_GUIDERS, guider_support
from dlx.guiders import COMBINATION, _Rule, _copy, _identity_apg_as_cfg, guider_from_config

G = pytest.importorskip("diffusers.guiders")
logging.getLogger("diffusers.guiders.guider_utils").setLevel(logging.ERROR)

TOL = dict(rtol=0, atol=1e-6)


def _pair(b=3, shape=(4, 16, 16), seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(b, *shape, generator=gen)
    u = c + 0.3 * torch.randn(b, *shape, generator=gen)
    return c, u


def _run(n=10):
    return SimpleNamespace(num_steps=n, t_of=lambda i: float(1000 - 100 * i))


def _diffusers_pred(guider, step, n, c, u):
    """The guider's own forward at ``step`` of ``n`` (a fresh copy, state set as diffusers does).
    MAMBO-G fails on 4-D tensors in diffusers 0.42.1 (see the test below): on the (B, −1) view."""
    g = guider.new()
    g.set_state(step, n, None)
    if type(g).__name__ == "MagnitudeAwareGuidance":
        return g.forward(c.flatten(1), u.flatten(1)).pred.view_as(c)
    return g.forward(c, u).pred


#: one instance of every covered guider, with non-default arguments where they matter
CASES = {
    "cfg": lambda: G.ClassifierFreeGuidance(guidance_scale=5.0),
    "cfg-rescale": lambda: G.ClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=0.7),
    "cfg-original": lambda: G.ClassifierFreeGuidance(guidance_scale=4.0, use_original_formulation=True),
    "apg": lambda: G.AdaptiveProjectedGuidance(guidance_scale=7.5, eta=0.0),
    "apg-threshold": lambda: G.AdaptiveProjectedGuidance(guidance_scale=7.5, eta=0.5,
                                                         adaptive_projected_guidance_rescale=2.0),
    "apg-norm-dim": lambda: G.AdaptiveProjectedGuidance(guidance_scale=7.5, eta=0.0,
                                                        adaptive_projected_guidance_norm_dim=(2, 3)),
    "cfg-zero-star": lambda: G.ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=0),
    "tcfg": lambda: G.TangentialClassifierFreeGuidance(guidance_scale=5.0),
    "fdg": lambda: G.FrequencyDecoupledGuidance(guidance_scales=[10.0, 5.0]),
    "fdg-parallel": lambda: G.FrequencyDecoupledGuidance(guidance_scales=[10.0, 5.0], parallel_weights=0.5,
                                                         guidance_rescale=0.5),
    "mambo": lambda: G.MagnitudeAwareGuidance(guidance_scale=8.0, alpha=2.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_guider_equals_its_diffusers_forward_on_the_same_tensors(case):
    guider = CASES[case]()
    c, u = _pair()
    rule = _Rule(_copy(guider), type(guider).__name__)
    for step in (0, 4, 9):
        ours = rule.combine(_run(), step, (0, 1, 2), c, u, 1.0)
        ref = _diffusers_pred(guider, step, 10, c, u)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, ref, **TOL)
        assert not torch.equal(ours, c), "the guider guided"


@pytest.mark.parametrize("name", ["AdaptiveProjectedGuidance", "AdaptiveProjectedMixGuidance"])
def test_momentum_is_diffusers_own_over_a_run_and_kept_per_sample(name):
    kw = dict(guidance_scale=6.0, adaptive_projected_guidance_momentum=-0.5, eta=0.0)
    if name == "AdaptiveProjectedMixGuidance":
        kw.update(adaptive_projected_guidance_start_step=2, adaptive_projected_guidance_scale=8.0)
    guider = getattr(G, name)(**kw)
    n = 6
    pairs = [_pair(seed=s) for s in range(n)]
    # diffusers: one buffer for the batch, made at step 0 by prepare_inputs
    ref_g = guider.new()
    refs = []
    for i, (c, u) in enumerate(pairs):
        ref_g.set_state(i, n, None)
        ref_g.prepare_inputs({})
        refs.append(ref_g.forward(c, u).pred)
    rule = _Rule(_copy(guider), name)
    for i, (c, u) in enumerate(pairs):
        torch.testing.assert_close(rule.combine(_run(n), i, (0, 1, 2), c, u, 1.0), refs[i], **TOL)
    # per sample: sample 1 alone, asked in another order and with other samples around it
    rule.reset()
    for i, (c, u) in enumerate(pairs):
        rows = (2, 1) if i % 2 else (1,)
        idx = torch.tensor(rows)
        out = rule.combine(_run(n), i, rows, c[idx], u[idx], 1.0)
        alone = out[rows.index(1)]
        torch.testing.assert_close(alone, refs[i][1], **TOL)


def test_momentum_starts_afresh_after_reset():
    guider = G.AdaptiveProjectedGuidance(guidance_scale=6.0, adaptive_projected_guidance_momentum=0.7, eta=0.0)
    c, u = _pair()
    rule = _Rule(_copy(guider), "AdaptiveProjectedGuidance")
    first = rule.combine(_run(), 0, (0, 1, 2), c, u, 1.0)
    again = rule.combine(_run(), 1, (0, 1, 2), c, u, 1.0)
    assert not torch.equal(first, again), "momentum carried over"
    rule.reset()
    assert torch.equal(rule.combine(_run(), 0, (0, 1, 2), c, u, 1.0), first)


def test_apg_with_eta_one_no_momentum_no_threshold_is_cfg_bitwise():
    apg = G.AdaptiveProjectedGuidance(guidance_scale=5.0, eta=1.0, adaptive_projected_guidance_rescale=0.0)
    cfg = G.ClassifierFreeGuidance(guidance_scale=5.0)
    c, u = _pair()
    work = _identity_apg_as_cfg(_copy(apg))
    assert type(work).__name__ == "ClassifierFreeGuidance"
    a = _Rule(work, "AdaptiveProjectedGuidance").combine(_run(), 3, (0, 1, 2), c, u, 1.0)
    b = _Rule(_copy(cfg), "ClassifierFreeGuidance").combine(_run(), 3, (0, 1, 2), c, u, 1.0)
    assert torch.equal(a, b)
    assert torch.equal(a, u + 5.0 * (c - u)), "the tap's own CFG expression"
    # diffusers' projection rounds its two parts apart: equal within float32 rounding, not bitwise
    torch.testing.assert_close(_diffusers_pred(apg, 3, 10, c, u), a, rtol=1e-5, atol=1e-5)
    # anything else keeps diffusers' projection
    for kw in (dict(eta=0.9, adaptive_projected_guidance_rescale=0.0),
               dict(eta=1.0, adaptive_projected_guidance_rescale=15.0),
               dict(eta=1.0, adaptive_projected_guidance_rescale=0.0, adaptive_projected_guidance_momentum=0.5)):
        assert _identity_apg_as_cfg(G.AdaptiveProjectedGuidance(**kw)) is None, kw


def test_cfg_zero_star_with_no_zero_init_steps_is_its_formula():
    s = 5.0
    c, u = _pair()
    out = _Rule(_copy(G.ClassifierFreeZeroStarGuidance(guidance_scale=s, zero_init_steps=0)),
                "ClassifierFreeZeroStarGuidance").combine(_run(), 0, (0, 1, 2), c, u, 1.0)
    cf, uf = c.flatten(1).double(), u.flatten(1).double()
    alpha = ((cf * uf).sum(1) / ((uf * uf).sum(1) + 1e-8)).view(-1, 1, 1, 1)  # Fan et al. 2025, eq. 7
    ref = (alpha * u.double() + s * (c.double() - alpha * u.double())).float()
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)


def test_guider_window_is_diffusers_floor_rule():
    """int(start·N) ≤ i < int(stop·N); dlx's windows round half up instead."""
    from dlx.guidance import boundary
    from dlx.guiders import _needs_uncond

    g = _copy(G.ClassifierFreeGuidance(guidance_scale=5.0, start=0.15, stop=0.79))
    n = 10
    on = []
    for i in range(n):
        g.set_state(i, n, None)
        on.append(_needs_uncond(g))
    assert on == [int(0.15 * n) <= i < int(0.79 * n) for i in range(n)] == [i in range(1, 7) for i in range(n)]
    assert (boundary(0.15, n), boundary(0.79, n)) == (2, 8), "dlx's GuidanceInterval(0.15, 0.79) guides 2..7"


def test_zero_init_steps_are_planned_as_zero_not_as_two_passes():
    from dlx.guiders import _needs_uncond, _zero_init

    g = _copy(G.ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=2))
    flags = []
    for i in range(4):
        g.set_state(i, 10, None)
        flags.append((_zero_init(g), _needs_uncond(g)))
    # diffusers asks for both passes on its zero-init steps (0.42.1); dlx plans none there
    assert flags == [(True, True), (True, True), (False, True), (False, True)]
    c, u = _pair()
    g.set_state(0, 10, None)
    assert torch.equal(g.forward(c, u).pred, torch.zeros_like(c))


# -- diffusers 0.42.1 faults that dlx wraps: each test fails once diffusers fixes it ----------------

def test_fdg_disabled_level_is_broken_in_diffusers_and_right_in_dlx():
    import kornia

    c, u = _pair(shape=(4, 32, 32))
    for scales in ([1.0, 5.0], [10.0, 1.0]):  # level 0 off, then level 1 off (scale 1: no guidance)
        g = G.FrequencyDecoupledGuidance(guidance_scales=scales)
        g.set_state(0, 10, None)
        with pytest.raises((UnboundLocalError, RuntimeError)):
            g.forward(c, u)
        ours = _Rule(_copy(g), "FrequencyDecoupledGuidance").combine(_run(), 0, (0, 1, 2), c, u, 1.0)
        pc = kornia.geometry.transform.build_laplacian_pyramid(c, 2)
        pu = kornia.geometry.transform.build_laplacian_pyramid(u, 2)
        lv = [pc[k] if s == 1.0 else pu[k] + s * (pc[k] - pu[k]) for k, s in enumerate(scales)]
        ref = kornia.geometry.pyrup(lv[1]) + lv[0]
        torch.testing.assert_close(ours, ref, **TOL)
    # per-level windows: level 1 stops at 0.5; both levels on before it (diffusers' own path)
    g = G.FrequencyDecoupledGuidance(guidance_scales=[10.0, 5.0], start=[0.0, 0.0], stop=[1.0, 0.5])
    rule = _Rule(_copy(g), "FrequencyDecoupledGuidance")
    torch.testing.assert_close(rule.combine(_run(), 2, (0, 1, 2), c, u, 1.0), _diffusers_pred(g, 2, 10, c, u), **TOL)
    late = rule.combine(_run(), 7, (0, 1, 2), c, u, 1.0)
    g2 = G.FrequencyDecoupledGuidance(guidance_scales=[10.0, 1.0])
    ref = _Rule(_copy(g2), "FrequencyDecoupledGuidance").combine(_run(), 7, (0, 1, 2), c, u, 1.0)
    assert torch.equal(late, ref)


def test_mambo_fails_on_4d_latents_in_diffusers_and_dlx_runs_it_flat():
    g = G.MagnitudeAwareGuidance(guidance_scale=8.0, alpha=2.0)
    g.set_state(0, 10, None)
    c, u = _pair()
    with pytest.raises(RuntimeError, match="matrix_norm"):
        g.forward(c, u)
    out = _Rule(_copy(g), "MagnitudeAwareGuidance").combine(_run(), 0, (0, 1, 2), c, u, 1.0)
    diff = (c - u).flatten(1)
    ratio = (diff.norm(dim=1) / u.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)  # MAMBO-G, eq. in arXiv 2508.03442
    ref = u + (1.0 + 7.0 * torch.exp(-2.0 * ratio)) * (c - u)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_tcfg_is_conditional_still_raises_and_dlx_never_reads_it():
    g = G.TangentialClassifierFreeGuidance()
    with pytest.raises(AttributeError):
        g.is_conditional  # noqa: B018 - diffusers 0.42.1 reads a missing _num_outputs_prepared
    c, u = _pair()
    _Rule(_copy(g), "TangentialClassifierFreeGuidance").combine(_run(), 0, (0, 1), c[:2], u[:2], 1.0)


def test_docstring_defaults_differ_from_the_code_and_dlx_records_the_code():
    doc = G.ClassifierFreeZeroStarGuidance.__doc__
    assert "defaults to `0.01`" in doc and "defaults to `0.2`" in doc
    cfg = dlx.Guider(G.ClassifierFreeZeroStarGuidance()).config()["args"]["config"]
    assert (cfg["start"], cfg["stop"]) == (0.0, 1.0)


def test_fdg_int_window_from_yaml_is_made_float():
    g = guider_from_config("FrequencyDecoupledGuidance", {"guidance_scales": [10, 5], "start": 0, "stop": 1})
    assert g.config["start"] == 0.0 and isinstance(g.config["start"], float)
    with pytest.raises(TypeError):  # diffusers alone
        G.FrequencyDecoupledGuidance(guidance_scales=[10.0, 5.0], start=0)


def test_the_diffusers_internals_dlx_touches_exist():
    import sys

    for name in ("AdaptiveProjectedGuidance", "AdaptiveProjectedMixGuidance"):
        g = getattr(G, name)(adaptive_projected_guidance_momentum=0.5)
        assert hasattr(sys.modules[type(g).__module__], "MomentumBuffer") and hasattr(g, "momentum_buffer")
    fdg = G.FrequencyDecoupledGuidance()
    mod = sys.modules[type(fdg).__module__]
    for attr in ("build_laplacian_pyramid_func", "build_image_from_pyramid", "project", "rescale_noise_cfg"):
        assert callable(getattr(mod, attr)), attr
    for attr in ("levels", "guidance_scales", "parallel_weights", "guidance_rescale", "guidance_rescale_space",
                 "upcast_to_double", "_is_fdg_enabled_for_level"):
        assert hasattr(fdg, attr), attr
    z = G.ClassifierFreeZeroStarGuidance()
    z.set_state(0, 10, None)
    assert z._enabled is True and z._step == 0 and z.zero_init_steps == 1
    assert logging.getLogger("diffusers.guiders.guider_utils") is logging.getLogger(G.guider_utils.__name__)


# -- configuration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trips_through_json_and_part_from_config(case):
    part = dlx.Guider(CASES[case]())
    cfg = part.config()
    assert cfg["type"] == "Guider" and cfg["args"]["guider"] == type(part.guider).__name__
    back = dlx.part_from_config(json.loads(json.dumps(cfg)))
    assert isinstance(back, dlx.Guider) and back.config() == cfg
    public = lambda g: {k: v for k, v in g.config.items() if not k.startswith("_")}  # noqa: E731
    assert json.dumps(public(back.guider), default=list) == json.dumps(public(part.guider), default=list)
    c, u = _pair()
    a = _Rule(_copy(part.guider), case).combine(_run(), 1, (0, 1, 2), c, u, 1.0)
    b = _Rule(_copy(back.guider), case).combine(_run(), 1, (0, 1, 2), c, u, 1.0)
    assert torch.equal(a, b)


def test_per_sample_config_round_trips():
    part = dlx.Guider([G.ClassifierFreeGuidance(guidance_scale=3.0), "AdaptiveProjectedGuidance"])
    cfg = part.config()
    assert cfg["args"]["guider"] == ["ClassifierFreeGuidance", "AdaptiveProjectedGuidance"]
    assert dlx.part_from_config(json.loads(json.dumps(cfg))).config() == cfg


def test_sweep_spec_takes_guiders():
    from dlx.sweeps.spec import build_spec, control_config, control_from_config

    apg = dlx.Guider(G.AdaptiveProjectedGuidance(guidance_scale=6.0, eta=0.0))
    d = control_config(apg)
    assert d == apg.config()  # the one config format
    assert control_from_config(json.loads(json.dumps(d))).config() == apg.config()
    spec = build_spec(prompts=["a"], seeds=[0],
                      configs={"cfg": None, "apg": apg, "apg@0.4": [apg, dlx.CFGCutoff(0.4)]})
    cfgs = {c.name: c for c in spec.configs}
    assert [p.config() for p in cfgs["apg@0.4"].parts()] == [apg.config(), dlx.CFGCutoff(0.4).config()]
    assert cfgs["cfg"].controls == []


# -- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("guider,config,match", [
    (None, None, "guider"),
    ("NoSuchGuidance", None, "NoSuchGuidance"),
    ([], None, "guider"),
    ("ClassifierFreeGuidance", 5, "config"),
    ("ClassifierFreeGuidance", {"no_such_arg": 1}, "config"),
    ("LTX2Guidance", None, "LTX2Guidance"),
])
def test_bad_guider_arguments_are_dlx_errors(guider, config, match):
    with pytest.raises(DlxError, match=match):
        dlx.Guider(guider, config)


def test_every_covered_guider_is_a_combination_guider_and_perturbation_ones_are_named():
    assert set(COMBINATION) <= set(dir(G)) and set(PERTURBATION_GUIDERS) <= set(dir(G))
    runs = {"sd": {"PerturbedAttentionGuidance", "SkipLayerGuidance", "SmoothedEnergyGuidance", "AutoGuidance"},
            "sdxl": {"PerturbedAttentionGuidance", "SkipLayerGuidance", "SmoothedEnergyGuidance", "AutoGuidance"},
            "sd3": {"SkipLayerGuidance", "SmoothedEnergyGuidance", "AutoGuidance"},
            "flux": {"SkipLayerGuidance", "AutoGuidance"}}  # tests/test_perturbation.py runs each
    for fam in FAMILIES.values():
        for name in COMBINATION:
            assert guider_support(fam, name) is None
        for name in PERTURBATION_GUIDERS:
            msg = guider_support(fam, name)
            if name in runs.get(fam.name, ()):
                assert msg is None, (fam.name, name)
            else:
                assert name in msg and f"on {fam.name} pipelines" in msg, (fam.name, name)


# -- on the pipelines (through the core's seam: Guide.rule / Guide.zero) ----------------------------

from .helpers import bitwise, pipe_for, run  # noqa: E402

BATCH_TOL = dict(rtol=1e-5, atol=1e-4)  # a sample alone vs in a batch: the denoiser at another batch size


def _with(pipe, family, parts, **kw):
    with dlx.attach(pipe, *parts):
        return run(pipe, family, **kw)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_guider_cfg_at_the_call_scale_is_the_pipelines_cfg_bitwise(family):
    pipe = pipe_for(family)
    ref = run(pipe, family, steps=4, guidance_scale=5.0)
    out = _with(pipe, family, [dlx.Guider(G.ClassifierFreeGuidance(guidance_scale=5.0))], steps=4, guidance_scale=5.0)
    assert bitwise(out, ref)
    apg = dlx.Guider(G.AdaptiveProjectedGuidance(guidance_scale=5.0, eta=1.0, adaptive_projected_guidance_rescale=0.0))
    assert bitwise(_with(pipe, family, [apg], steps=4, guidance_scale=5.0), ref)


def test_guider_scale_is_its_own_not_the_calls():
    pipe = pipe_for("sd")
    a = _with(pipe, "sd", [dlx.Guider(G.ClassifierFreeGuidance(guidance_scale=3.0))], steps=4, guidance_scale=9.0)
    assert bitwise(a, run(pipe, "sd", steps=4, guidance_scale=3.0))


def test_mixed_guiders_in_one_batch_equal_each_sample_alone():
    pipe = pipe_for("sd")
    gs = [G.AdaptiveProjectedGuidance(guidance_scale=6.0, eta=0.0, adaptive_projected_guidance_momentum=-0.5),
          G.ClassifierFreeZeroStarGuidance(guidance_scale=6.0, zero_init_steps=1),
          G.TangentialClassifierFreeGuidance(guidance_scale=6.0, start=0.25)]
    batch = _with(pipe, "sd", [dlx.Guider(gs)], steps=4, guidance_scale=6.0, batch=3)
    for j, g in enumerate(gs):
        alone = _with(pipe, "sd", [dlx.Guider(g)], steps=4, guidance_scale=6.0, batch=3)[j]
        torch.testing.assert_close(batch[j], alone, **BATCH_TOL)


def test_composition_with_a_cutoff_is_the_guider_inside_the_window():
    pipe = pipe_for("sd")
    apg = G.AdaptiveProjectedGuidance(guidance_scale=6.0, eta=0.0)
    part = dlx.Guider(apg)
    with dlx.record(pipe, part, dlx.CFGCutoff(0.5)) as trace:
        a = run(pipe, "sd", steps=4, guidance_scale=6.0)
    assert part.report["guided_steps"] == [[0, 1]] and trace.nfe == [6.0]
    # the same as the guider's own window [0, 0.5): int(0.5·4) = 2 steps either way
    b = _with(pipe, "sd", [dlx.Guider(G.AdaptiveProjectedGuidance(guidance_scale=6.0, eta=0.0, stop=0.5))],
              steps=4, guidance_scale=6.0)
    assert bitwise(a, b)


def test_zero_init_steps_evaluate_nothing_and_count_no_nfe():
    pipe = pipe_for("sd")
    part = dlx.Guider(G.ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=1))
    with dlx.record(pipe, part) as trace:
        run(pipe, "sd", steps=4)
    assert part.report["zero_steps"] == [[0]]
    assert trace.nfe == [6.0], "step 0: no evaluation; steps 1-3: two each"


@pytest.mark.parametrize("kw,match", [
    (dict(guidance_scale=1.0), "guidance_scale > 1"),
    (dict(guidance_rescale=0.7), "guidance_rescale"),
])
def test_calls_a_guider_cannot_act_on_are_refused_before_the_loop(kw, match):
    pipe = pipe_for("sd")
    with pytest.raises(DlxError, match=match):
        _with(pipe, "sd", [dlx.Guider(G.ClassifierFreeGuidance())], steps=2, **kw)


def test_a_schedule_beside_a_guider_is_refused():
    pipe = pipe_for("sd")
    with pytest.raises(DlxError, match="GuidanceSchedule"):
        _with(pipe, "sd", [dlx.Guider(G.ClassifierFreeGuidance()), dlx.GuidanceSchedule("linear")], steps=2)


def test_the_record_shows_each_samples_guider_scale_not_the_calls():
    # one truth: the trace's per-sample scale is the scale the sample was guided at
    from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance

    from .helpers import pipe_for, run

    pipe = pipe_for("sd")
    g = dlx.Guider([ClassifierFreeGuidance(guidance_scale=3.0), AdaptiveProjectedGuidance(guidance_scale=9.0)])
    with dlx.record(pipe, g) as trace:
        run(pipe, "sd", num_images_per_prompt=2, guidance_scale=5.0)
    assert [s.guidance_scale for s in trace.steps] == [[3.0, 9.0]] * 4


def test_a_guiders_label_names_its_class_and_only_what_differs_from_diffusers_defaults():
    from dlx import labels

    apg = dlx.Guider(G.AdaptiveProjectedGuidance(guidance_scale=7.5, eta=0.0, adaptive_projected_guidance_momentum=-0.5))
    assert labels.part_label(apg.config()) == \
        "Guider(AdaptiveProjectedGuidance(adaptive_projected_guidance_momentum=-0.5, eta=0))"
    mixed = dlx.Guider([G.ClassifierFreeGuidance(guidance_scale=3.0), G.ClassifierFreeZeroStarGuidance()])
    assert labels.part_label(mixed.config()) == \
        "Guider([ClassifierFreeGuidance(guidance_scale=3), ClassifierFreeZeroStarGuidance()])"
    # the stored configuration keeps every value (a later diffusers may change a default)
    assert apg.config()["args"]["config"]["guidance_scale"] == 7.5


def test_a_yaml_spec_names_guiders_and_their_arguments(tmp_path):
    from dlx.sweeps.yaml_spec import read_yaml

    (tmp_path / "spec.yaml").write_text(
        "model: shapes\nprompts: [a red circle]\nseeds: 1\nconfigs:\n  cfg: []\n"
        "  apg@0.5: [{Guider: {guider: AdaptiveProjectedGuidance, config: {guidance_scale: 6, eta: 0}}},"
        " {CFGCutoff: {ratio: 0.5}}]\n"
        "  pag: {Guider: {guider: PerturbedAttentionGuidance, config: {perturbed_guidance_scale: 2,"
        " perturbed_guidance_config: {indices: [0], fqn: mid_block.attentions.0.transformer_blocks}}}}\n")
    cfgs = read_yaml(tmp_path / "spec.yaml")["configs"]
    apg = dlx.part_from_config(cfgs["apg@0.5"][0])
    assert isinstance(apg, dlx.Guider) and apg.guider.config["eta"] == 0 and apg.guider.config["guidance_scale"] == 6
    pag = dlx.part_from_config(cfgs["pag"])
    assert pag.guider.skip_layer_config[0].fqn == "mid_block.attentions.0.transformer_blocks"
