"""x0 computed after the run, all steps at once, is bitwise the per-step computation (CPU, fp32).

The recorder keeps a copy of each step's denoiser input and computes the guided prediction and
x0 of every step the pipeline guides itself in a few batched kernels at the end of the run
(``families.denoised_steps``) instead of three small kernels per step. Tolerance: none; the
float32 arithmetic per element is the same (one fused multiply-add, one division), so the
results must be bitwise equal.
"""

import math

import pytest
import torch

import dlx
import dlx.recorder
from dlx.families import denoised_as, denoised_steps

from .helpers import bitwise, pipe_for, run

VP_SIGMAS = [math.inf, 14.6, 3.2, 1.0, 0.31, 0.029, 0.0]  # σ = ∞: zero terminal SNR (x0 = ±inf/NaN)
FLOW_SIGMAS = [1.0, 0.97, 0.5, 0.2, 0.02, 0.0]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN where NaN."""
    nan = a.isnan()
    return bitwise(nan, b.isnan()) and bitwise(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_denoised_steps_is_bitwise_denoised_as_per_step(kind, dtype):
    g = torch.Generator().manual_seed(0)
    sig = FLOW_SIGMAS if kind == "flow" else VP_SIGMAS
    n = len(sig)
    x = (torch.randn(n, 2, 9, 8, 8, generator=g) * 3).to(dtype)  # 9 channels: an inpaint UNet's input
    p = torch.randn(n, 2, 4, 8, 8, generator=g).to(dtype)
    ref = torch.stack([denoised_as(kind, x[i], p[i], sig[i]) for i in range(n)])
    out = denoised_steps(kind, x, p, sig)
    assert out.dtype == torch.float32 and same(out, ref)


def _traces(family, scheduler=None, parts=(), **kw):
    pipe = pipe_for(family, scheduler)
    with dlx.record(pipe, *[p() for p in parts]) as deferred:
        out = run(pipe, family, **kw)
    return pipe, out, deferred


@pytest.mark.parametrize("family,scheduler,parts,kw", [
    ("sd", None, (), {}),
    ("sd", "euler", (), {"batch": 2}),
    ("sd", "dpm++", (lambda: dlx.CFGCutoff(ratio=0.5),), {"batch": 2}),  # deferred and per-step steps
    ("sd-inpaint", None, (), {}),
    ("sdxl", None, (), {}),
    ("sd3", None, (), {}),
    ("sd-controlnet", None, (), {}),
    ("sd", None, (), {"guidance_scale": 1.0}),  # no CFG: x0 from cond
    ("flux", None, (lambda: dlx.CFGCutoff(step=2),), {"batch": 2}),  # true CFG (per step), then cond only
])
def test_recorded_x0_is_bitwise_the_per_step_x0(monkeypatch, family, scheduler, parts, kw):
    pipe, out, deferred = _traces(family, scheduler, parts, **kw)
    with monkeypatch.context() as m:
        m.setattr(dlx.recorder, "BATCHED_X0", ())  # every x0 computed at its step, as before
        with dlx.record(pipe, *[p() for p in parts]) as per_step:
            out2 = run(pipe, family, **kw)
    assert bitwise(out, out2)
    assert len(deferred) == len(per_step) == 4
    for a, b in zip(deferred, per_step):
        assert bitwise(a.x0, b.x0), f"step {a.index}: deferred x0 differs from the per-step x0"
        assert bitwise(a.cond, b.cond) and bitwise(a.latents, b.latents)


def test_x0_only_recorder_defers_without_keeping_predictions(monkeypatch):
    pipe = pipe_for("sd")
    with dlx.record(pipe, keep=("x0",)) as t:
        run(pipe, "sd")
    with monkeypatch.context() as m:
        m.setattr(dlx.recorder, "BATCHED_X0", ())
        with dlx.record(pipe, keep=("x0",)) as ref:
            run(pipe, "sd")
    assert t.fields() == ["x0"]
    for a, b in zip(t, ref):
        assert bitwise(a.x0, b.x0)


def test_x0_is_deferred_for_steps_the_pipeline_or_nobody_guides():
    pipe = pipe_for("sd")
    with dlx.record(pipe, dlx.CFGCutoff(ratio=0.5), storage="device") as t:
        run(pipe, "sd")
    # deferred x0 are rows of one batched result per group (guided steps, then unguided ones)
    assert [s.x0._base is not None for s in t] == [True] * 4
    assert t[0].x0._base is t[1].x0._base and t[2].x0._base is t[3].x0._base is not t[0].x0._base


def test_x0_of_an_interrupted_run_is_complete():
    pipe = pipe_for("sd")
    with dlx.record(pipe, dlx.Interrupt(after_step=1)) as t:
        run(pipe, "sd")
    assert len(t) == 2 and all(s.x0 is not None and torch.isfinite(s.x0).all() for s in t)


@pytest.mark.parametrize("name", ["_fused_sub", "_fused_sub_exact"])  # CPU path, and the one CUDA takes
def test_fused_sub_rounds_once_like_the_per_step_op(name):
    import dlx.families

    fused_sub = getattr(dlx.families, name)
    g = torch.Generator().manual_seed(1)
    for n in (100_000, 1001, 7):  # vectorized loops and their scalar tails
        x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 8)  # wide exponent range
        p = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 8)
        for s in (0.3, 1.0, 0.9999, 1e-3, 7.7):
            assert bitwise(fused_sub(x, p, torch.tensor(s)), torch.sub(x, p, alpha=s))
            near = (torch.tensor(s).double() * p.double()).float()  # x ≈ s·p: cancellation
            assert bitwise(fused_sub(near, p, torch.tensor(s)), torch.sub(near, p, alpha=s))
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, 3.4e38])
    ref = torch.sub(special, special.flip(0), alpha=0.5)
    assert same(fused_sub(special, special.flip(0), torch.tensor(0.5)), ref)
