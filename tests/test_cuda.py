"""The recorder's CUDA paths, run where a GPU is present (CI has none: these tests skip there).

On CUDA the recorder queues its end-of-run work behind the run instead of waiting for it: x0 of
all steps in a few kernels fed through page-locked, non-blocking copies, then every kept tensor
moved to the CPU in one flat, non-blocking copy per dtype into page-locked memory, waited for
once. None of that may change a value: everything here is compared bitwise against the same run
kept on the device (``storage="device"``) or against x0 computed at each step.
"""

import pytest
import torch

import dlx
import dlx.recorder
from dlx.testing import tiny_pipeline

from .helpers import bitwise, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on CI)")

CASES = [
    ("sd", "dpm++", {"batch": 2}),
    ("sd", "euler", {}),
    ("sdxl", None, {"batch": 2}),
    ("sd3", None, {}),
    ("flux", None, {"batch": 2}),
]


def _cuda_pipe(family, scheduler):
    return tiny_pipeline(family, seed=0, scheduler=scheduler).to("cuda")


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    a, b = a.cpu(), b.cpu()
    nan = a.isnan() if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
    return bitwise(nan, b.isnan() if b.is_floating_point() else nan) and bitwise(a.masked_fill(nan, 0),
                                                                                b.masked_fill(nan, 0))


@pytest.mark.parametrize("family,scheduler,kw", CASES)
def test_end_of_run_copy_to_cpu_is_exact_and_pinned(family, scheduler, kw):
    pipe = _cuda_pipe(family, scheduler)
    with dlx.record(pipe, dlx.CFGCutoff(ratio=0.5)) as host:
        out = run(pipe, family, **kw)
    with dlx.record(pipe, dlx.CFGCutoff(ratio=0.5), storage="device") as dev:
        out2 = run(pipe, family, **kw)
    assert bitwise(out, out2)
    assert bitwise(host[-1].latents, out.cpu()), "recorded final latents differ from the pipeline's output"
    for a, b in zip(host, dev):
        for name in ("latents", "x0", "cond", "uncond"):
            va, vb = getattr(a, name), getattr(b, name)
            assert _same(va, vb), f"step {a.index} {name}"
            if va is not None:
                assert va.is_cpu and va.is_pinned() and vb.is_cuda
        assert a.step_ms > 0
    assert len(host.conditioning) == len(dev.conditioning)
    for ca, cb in zip(host.conditioning, dev.conditioning):
        assert ca.keys() == cb.keys() and all(_same(ca[k], cb[k]) and ca[k].is_cpu for k in ca)


def test_big_traces_go_through_pageable_memory(monkeypatch):
    pipe = _cuda_pipe("sd", None)
    with dlx.record(pipe) as pinned:
        run(pipe, "sd")
    monkeypatch.setattr(dlx.recorder, "PIN_LIMIT", 0)
    with dlx.record(pipe) as pageable:
        run(pipe, "sd")
    for a, b in zip(pinned, pageable):
        assert a.latents.is_pinned() and not b.latents.is_pinned()
        assert bitwise(a.latents, b.latents) and _same(a.x0, b.x0) and _same(a.uncond, b.uncond)


@pytest.mark.parametrize("family,scheduler,kw", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deferred_x0_is_bitwise_the_per_step_x0_on_cuda(monkeypatch, family, scheduler, kw, dtype):
    pipe = _cuda_pipe(family, scheduler).to(dtype=dtype)
    with dlx.record(pipe) as deferred:
        run(pipe, family, **kw)
    monkeypatch.setattr(dlx.recorder, "BATCHED_X0", ())  # every x0 computed at its step
    with dlx.record(pipe) as per_step:
        run(pipe, family, **kw)
    for a, b in zip(deferred, per_step):
        assert _same(a.x0, b.x0), f"step {a.index}: deferred x0 differs from the per-step x0 on CUDA"


def test_trace_survives_refused_page_locked_memory(monkeypatch):
    pipe = _cuda_pipe("sd", None)
    with dlx.record(pipe) as ref:
        run(pipe, "sd")
    empty = torch.empty

    def no_pinned(*a, pin_memory=False, **k):
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return empty(*a, **k)
    monkeypatch.setattr(torch, "empty", no_pinned)
    with dlx.record(pipe) as t:
        run(pipe, "sd")
    for a, b in zip(t, ref):
        assert not a.latents.is_pinned() and bitwise(a.latents, b.latents) and _same(a.x0, b.x0)
