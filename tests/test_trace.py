"""Trace: tables, comparison, and files that round-trip exactly and fail loudly."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import dlx
from dlx.trace import FORMAT_VERSION, Trace

from .helpers import bitwise, pipe_for, run


@pytest.fixture(scope="module")
def trace():
    pipe = pipe_for("sdxl")
    with dlx.record(pipe, dlx.CFGCutoff(ratio=0.5)) as t:
        run(pipe, "sdxl", batch=2)
    return t


def test_round_trip_is_exact(trace, tmp_path):
    path = trace.save(tmp_path / "run.safetensors")
    back = Trace.load(path)
    assert len(back) == len(trace) and back.meta == json.loads(json.dumps(trace.meta, default=str))
    for a, b in zip(trace, back):
        assert a.scalars() == b.scalars() or all(
            (x == y) or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
            for x, y in zip(a.scalars().values(), b.scalars().values())
        )
        assert a.tensors().keys() == b.tensors().keys()
        for k, v in a.tensors().items():
            got = b.tensors()[k]
            assert v.dtype == got.dtype and v.shape == got.shape
            assert torch.equal(torch.nan_to_num(v.float(), nan=7.0), torch.nan_to_num(got.float(), nan=7.0))
            assert v.view(-1).view(torch.uint8 if v.element_size() == 1 else torch.int32 if v.element_size() == 4 else torch.int16).equal(
                got.view(-1).view(torch.uint8 if v.element_size() == 1 else torch.int32 if v.element_size() == 4 else torch.int16)
            ), f"{k} is not bitwise equal"
    assert len(back.conditioning) == len(trace.conditioning)
    for a, b in zip(trace.conditioning, back.conditioning):
        assert a.keys() == b.keys() and all(bitwise(a[k], b[k]) for k in a)
    assert back.last_guided_step == trace.last_guided_step == 1


def test_to_frame_has_one_row_per_step_and_the_promised_columns(trace):
    df = trace.to_frame()
    assert list(df["step"]) == [0, 1, 2, 3]
    for col in ("timestep", "sigma", "guidance_scale", "cfg_active", "nfe", "step_ms",
                "latent_std", "x0_std", "cond_uncond_l2", "cond_uncond_cos"):
        assert col in df.columns, col
    assert list(df["cfg_active"]) == [True, True, False, False]
    assert list(df["nfe"]) == [2, 2, 1, 1]
    assert df["cond_uncond_cos"][:2].between(-1, 1).all() and df["cond_uncond_cos"][2:].isna().all()
    c, u = trace[0].cond[1].double().flatten(), trace[0].uncond[1].double().flatten()
    per = trace.to_frame(per_sample=True)
    row = per[(per.step == 0) & (per["sample"] == 1)].iloc[0]
    assert row.cond_uncond_l2 == pytest.approx(float((c - u).norm()), rel=1e-12)
    assert (df["sigma"].diff().dropna() < 0).all(), "noise must fall step by step"


def test_compare_is_zero_against_itself_and_positive_against_another_seed(trace):
    same = trace.compare(trace)
    assert (same["latents_rmse"] == 0).all() and (same["latents_cos"] > 0.999999).all()
    pipe = pipe_for("sdxl")
    with dlx.record(pipe, dlx.CFGCutoff(ratio=0.5)) as other:
        run(pipe, "sdxl", batch=2, seed=1)
    diff = trace.compare(other)
    assert (diff["latents_rmse"] > 0).all() and list(diff["step"]) == [0, 1, 2, 3]
    with pytest.raises(dlx.DlxError, match="compare\\(\\) takes a Trace"):
        trace.compare("run.safetensors")


def test_stack(trace):
    assert trace.stack("latents").shape[:2] == (4, 2)
    with pytest.raises(dlx.DlxError, match="'uncond' was not recorded on every step"):
        trace.stack("uncond")


def test_truncated_file_names_the_file(trace, tmp_path):
    path = trace.save(tmp_path / "run.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(dlx.DlxError, match=r"run\.safetensors.*truncated or corrupt"):
        Trace.load(path)


def test_corrupt_header_names_the_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(dlx.DlxError, match=r"bad\.safetensors.*truncated or corrupt"):
        Trace.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(dlx.DlxError, match="does not exist"):
        Trace.load(tmp_path / "nope.safetensors")


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(dlx.DlxError, match="not a dlx trace"):
        Trace.load(path)


def test_newer_format_version_says_so(trace, tmp_path):
    path = tmp_path / "future.safetensors"
    header = {"format_version": FORMAT_VERSION + 1, "meta": {}, "steps": [], "conditioning": []}
    save_file({"x": torch.zeros(1)}, str(path), metadata={"dlx.trace": json.dumps(header)})
    with pytest.raises(dlx.DlxError, match=f"format version {FORMAT_VERSION + 1}, newer"):
        Trace.load(path)


def test_save_is_atomic(trace, tmp_path, monkeypatch):
    path = trace.save(tmp_path / "run.safetensors")
    good = path.read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        trace.save(path)
    assert path.read_bytes() == good, "a failed save damaged the previous file"
    assert [p.name for p in tmp_path.iterdir()] == ["run.safetensors"], "temporary file left behind"


def test_timing_names_the_regime_from_step_times():
    from dlx.trace import Step

    def tr(guided_ms, unguided_ms):
        steps = [Step(index=i, timestep=0.0, sigma=1.0, guidance_scale=5.0, cfg_active=i < 3, nfe=2.0,
                      step_ms=(guided_ms if i < 3 else unguided_ms)) for i in range(6)]
        steps[0].step_ms = 500.0  # warm-up outlier, left out
        return Trace(steps=steps, meta={"timing": "cuda-events"})

    host = tr(29.2, 29.1).timing()
    assert host["regime"] == "host-bound" and host["guided_ms"] == 29.2 and host["saving"] == pytest.approx(1 - 29.1 / 29.2)
    dev = tr(7.15, 5.28).timing()
    assert dev["regime"] == "denoiser-bound" and dev["saving"] == pytest.approx(1 - 5.28 / 7.15)
    only = Trace(steps=tr(1, 1).steps[:3], meta={}).timing()
    assert only["regime"] == "unknown" and math.isnan(only["unguided_ms"])


def test_timing_of_a_real_cpu_run(trace):
    t = trace.timing()  # the module's fixture: CFG cut at half the run on a CPU
    assert t["timer"] == "perf_counter" and t["guided_ms"] > 0 and t["unguided_ms"] > 0
