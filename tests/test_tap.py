"""The denoiser tap: what it hands observers, what it returns to the pipeline, and that it is
gone after the call."""

import pytest
import torch

import dlx
from dlx._tap import DenoiserCall, _batch_tensors, _take_rows

from .helpers import bitwise, pipe_for, pipeline_state, run


def test_take_rows_takes_only_doubled_batch_tensors_at_any_depth():
    n = 4
    x = torch.arange(n * 2.0).view(n, 2)
    other = torch.zeros(3, 2)
    obj = {"a": x, "b": [x, other], "c": (1, "s"), "d": None}
    idx = torch.tensor([0, 2])
    got = _take_rows(obj, n, idx)
    assert bitwise(got["a"], x[[0, 2]]) and bitwise(got["b"][0], x[[0, 2]]) and got["b"][1] is other
    assert got["c"] == (1, "s") and got["d"] is None
    assert _take_rows(x, n, slice(2, 4)).data_ptr() == x[2:].data_ptr(), "a slice is a view"
    assert [t.shape for t in _batch_tensors(obj, n)] == [x.shape, x.shape]


def test_guided_is_the_pipelines_combination_computed_when_read():
    u, c = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    call = DenoiserCall(0, None, c, c, u, None, (True, True), 5.0)
    assert call.lerp_guided and bitwise(call.guided, torch.lerp(u, c, 5.0))
    from dlx._diffusers import rescale_noise_cfg

    call = DenoiserCall(0, None, c, c, u, None, (True, True), 5.0, rescale=0.7)
    assert not call.lerp_guided
    assert bitwise(call.guided, rescale_noise_cfg(torch.lerp(u, c, 5.0), c, 0.7))


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux", "sd-controlnet"])
def test_observers_see_cond_and_uncond_and_the_pipeline_its_own_output(family):
    pipe = pipe_for(family)
    ref = run(pipe, family, batch=2)
    seen = []

    class Spy(dlx.Part):
        wants_calls = True

        def on_denoiser(self, run_, call):
            seen.append((call.step, call.cond.shape[0], None if call.uncond is None else call.uncond.shape[0]))

    before = pipeline_state(pipe)
    with dlx.attach(pipe, Spy()):
        out = run(pipe, family, batch=2)
    assert bitwise(out, ref) and pipeline_state(pipe) == before
    assert seen == [(i, 2, 2) for i in range(4)]


def test_unguided_rows_return_the_conditional_prediction_to_the_pipeline():
    # steps the tap guides nobody on: the pipeline's u + s·(c − u) gets [c, c] and keeps c
    pipe = pipe_for("sd")
    got = []

    class Last(dlx.Part):
        wants_calls = True

        def on_denoiser(self, run_, call):
            got.append(call.guided is call.cond or bitwise(call.guided, call.cond))

    class Nobody(dlx.Part):
        def guidance(self, run_, step):
            return dlx.session.Guide(mask=(False,) * run_.batch)

    with dlx.attach(pipe, Nobody(), Last()):
        a = run(pipe, "sd")
    b = run(pipe, "sd", guidance_scale=1.0)
    assert all(got) and bitwise(a, b)


def test_the_tap_is_removed_when_the_denoiser_raises():
    pipe = pipe_for("sd")
    run(pipe, "sd")  # the state a plain call of these arguments leaves
    before = pipeline_state(pipe)

    class Boom(dlx.Part):
        wants_calls = True

        def on_denoiser(self, run_, call):
            raise RuntimeError("observer failed")

    with pytest.raises(RuntimeError, match="observer failed"):
        with dlx.attach(pipe, Boom()):
            run(pipe, "sd")
    assert pipeline_state(pipe) == before
