"""Trace: tables, comparison, and files that round-trip exactly and fail loudly."""

import json
import math
import os
import re
import stat

import pytest
import torch
from safetensors.torch import save_file

import dlx
from dlx.trace import Step, Trace
from dlx.trace_file import FORMAT_VERSION

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
    assert list(df["guidance_scale"]) == [5.0] * 4, "every sample at the call's scale: that scale"
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
    # issue 11 item 8: unguided steps hold NaN rows, so a cutoff trace stacks its uncond
    u = trace.stack("uncond")
    assert u.shape[:2] == (4, 2) and u[2:].isnan().all() and u[:2].isfinite().all()


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


# -- files: any layout, modes, links, directories (issue 11, items 12, 17, 18, 22) -------------

def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN rows included, which torch.equal calls unequal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _bitwise_round_trip(t: Trace, back: Trace):
    assert [s.scalars() for s in back] == json.loads(json.dumps([s.scalars() for s in t])) or len(back) == len(t)
    for a, b in zip(t, back):
        assert a.tensors().keys() == b.tensors().keys()
        for k, v in a.tensors().items():
            assert _same_bits(v, b.tensors()[k]), (a.index, k)
    for a, b in zip(t.conditioning, back.conditioning):
        assert a.keys() == b.keys() and all(_same_bits(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["sd-img2img", "sdxl-img2img"])
def test_img2img_trace_saves_and_round_trips_exactly(family, tmp_path):
    pipe = pipe_for(family)
    with dlx.record(pipe) as t:
        run(pipe, family, steps=2)
    assert any(not v.is_contiguous() for s in t for v in s.tensors().values()), \
        "the img2img latents are expected non-contiguous (channels-last): the case that failed"
    back = Trace.load(t.save(tmp_path / "i2i.safetensors"))
    _bitwise_round_trip(t, back)


def test_any_tensor_layout_round_trips(tmp_path):
    base = torch.randn(2, 4, 6, 6)
    steps = [
        Step(index=0, timestep=1.0, sigma=1.0, guidance_scale=[5.0] * 2, cfg_active=[True] * 2, nfe=[2.0] * 2,
             latents=base.to(memory_format=torch.channels_last),  # strides (144, 1, 24, 4)
             x0=base.transpose(2, 3),  # a transposed view
             cond=base[:, :, ::2, ::2]),  # a strided slice
        Step(index=1, timestep=0.5, sigma=0.5, guidance_scale=[5.0] * 2, cfg_active=[False] * 2, nfe=[1.0] * 2,
             latents=torch.randn(6, 4, 2).permute(2, 1, 0), x0=base.expand(2, 4, 6, 6)[:, :1]),
    ]
    t = Trace(steps=steps, conditioning=[{"prompt_embeds": torch.randn(3, 2).t()}])
    back = Trace.load(t.save(tmp_path / "layouts.safetensors"))
    _bitwise_round_trip(t, back)


def test_save_keeps_the_mode_of_an_existing_file(trace, tmp_path):
    path = tmp_path / "run.safetensors"
    path.write_bytes(b"old")
    for mode in (0o644, 0o640, 0o604):
        os.chmod(path, mode)
        trace.save(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert len(Trace.load(path)) == len(trace)


def test_a_new_file_gets_the_umask_default_like_open(trace, tmp_path):
    old = os.umask(0o027)
    try:
        trace.save(tmp_path / "new.safetensors")
        with open(tmp_path / "by_open", "w"):
            pass
    finally:
        os.umask(old)
    got = stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode)
    assert got == stat.S_IMODE(os.stat(tmp_path / "by_open").st_mode) == 0o640


def test_save_writes_through_a_symlink(trace, tmp_path):
    real = tmp_path / "store" / "run.safetensors"
    real.parent.mkdir()
    real.write_bytes(b"old")
    os.chmod(real, 0o644)
    link = tmp_path / "latest.safetensors"
    link.symlink_to(real)
    assert trace.save(link) == link
    assert link.is_symlink() and os.readlink(link) == str(real), "the link was replaced"
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o644
    assert len(Trace.load(real)) == len(trace)
    assert sorted(p.name for p in real.parent.iterdir()) == ["run.safetensors"]


def test_save_onto_a_directory_names_it(trace, tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    with pytest.raises(dlx.DlxError, match=r"`path` names a directory.*runs'") as e:
        trace.save(folder)
    assert ".tmp" not in str(e.value)
    assert list(folder.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["runs"]


def test_load_of_a_directory_says_it_is_one(tmp_path):
    with pytest.raises(dlx.DlxError, match=r"`path` names a directory, not a trace file"):
        Trace.load(tmp_path)


def test_save_refuses_steps_whose_tensors_would_overwrite_each_other(trace, tmp_path):
    import copy

    t = Trace(steps=[copy.copy(trace[0]), copy.copy(trace[1])], meta=dict(trace.meta))
    t.steps[1].index = 0
    with pytest.raises(dlx.DlxError, match="two steps have index 0"):
        t.save(tmp_path / "dup.safetensors")
    assert list(tmp_path.iterdir()) == []


def _parts(trace, tmp_path):
    """The tensors and header of the fixture trace as written, to damage one thing at a time."""
    from safetensors import safe_open

    path = trace.save(tmp_path / "good.safetensors")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["dlx.trace"])


def _write(tmp_path, tensors, header, raw=None):
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path), metadata={"dlx.trace": raw if raw is not None else json.dumps(header)})
    return path


def _drop(key):
    def f(h, t):
        del h[key]
    return f


def _set(key, value):
    def f(h, t):
        h[key] = value
    return f


def _step(field, value):
    def f(h, t):
        if value is _MISSING:
            del h["steps"][1][field]
        else:
            h["steps"][1][field] = value
    return f


_MISSING = object()


def _dup_index(h, t):
    h["steps"][1]["index"] = 0


def _swap_in_stray(h, t):
    t["steps.9.latents"] = t["steps.0.latents"].clone()


def _drop_cond_tensor(h, t):
    del t[next(k for k in t if k.startswith("cond.0."))]


def _unknown_tensor_field(h, t):
    t["steps.0.noise"] = torch.zeros(1)


# Each row damages one thing; the load must name the file and say what is wrong.
DAMAGED = [
    ("no steps", _drop("steps"), r"has no 'steps'"),
    ("no meta", _drop("meta"), r"has no 'meta'"),
    ("no conditioning", _drop("conditioning"), r"has no 'conditioning'"),
    ("steps not a list", _set("steps", {"0": {}}), r"'steps' must be a list; got an object"),
    ("meta not an object", _set("meta", []), r"'meta' must be an object; got a list"),
    ("conditioning not a list", _set("conditioning", "x"), r"'conditioning' must be a list; got a string"),
    ("step not an object", lambda h, t: h["steps"].__setitem__(1, 7), r"steps\[1\] must be an object"),
    ("string index", _step("index", "1"), r"steps\[1\]\.index must be int; got '1'"),
    ("float index", _step("index", 1.0), r"steps\[1\]\.index must be int; got 1\.0"),
    ("bool index", _step("index", True), r"steps\[1\]\.index must be int; got True"),
    ("negative index", _step("index", -1), r"steps\[1\]\.index must be >= 0"),
    ("duplicated index", _dup_index, r"steps\[1\] repeats step index 0"),
    ("missing field", _step("sigma", _MISSING), r"steps\[1\] lacks the fields \['sigma'\]"),
    ("wrong-typed field", _step("cfg_active", "yes"), r"steps\[1\]\.cfg_active must be list\[bool\]; got 'yes'"),
    ("a format-1 scalar in a format-2 file", _step("guidance_scale", 5.0),
     r"steps\[1\]\.guidance_scale must be list\[float\]; got 5\.0"),
    ("ints for per-sample bools", _step("cfg_active", [1, 0]), r"steps\[1\]\.cfg_active must be list\[bool\]; got \[1, 0\]"),
    ("a string among per-sample numbers", _step("nfe", [2.0, "2"]), r"steps\[1\]\.nfe must be list\[float\]"),
    ("per-sample lists of different lengths", _step("nfe", [2.0, 2.0, 2.0]),
     r"steps\[1\] has 2 guidance_scale, 2 cfg_active, 3 nfe values; each must hold one value per sample"),
    ("unknown step field", _step("colour", 3), r"steps\[1\] has unknown fields \['colour'\]"),
    ("unknown header field", _set("extra", 1), r"unknown fields \['extra'\]"),
    ("no format version", _drop("format_version"), r"has no 'format_version'"),
    ("string format version", _set("format_version", "1"), r"'format_version' must be a positive int; got '1'"),
    ("zero format version", _set("format_version", 0), r"'format_version' must be a positive int; got 0"),
    ("named tensor absent", _drop_cond_tensor, r"conditioning\[0\] names tensors the file does not hold"),
    ("conditioning names not a list", lambda h, t: h["conditioning"].__setitem__(0, 5),
     r"conditioning\[0\] must be a list of tensor names"),
    ("stray step tensor", _swap_in_stray, r"1 tensor\(s\) its metadata does not describe: \['steps\.9\.latents'\]"),
    ("unknown tensor field", _unknown_tensor_field, r"does not describe: \['steps\.0\.noise'\]"),
    ("step tensor removed", lambda h, t: t.pop("steps.1.latents"),
     r"1 tensor\(s\) the metadata names are not in the file: \['steps\.1\.latents'\]"),
    ("manifest not a list", _set("tensors", "all"), r"'tensors' must be a list of tensor names"),
    ("conditioning index out of range", _step("conditioning", 5), r"steps\[1\]\.conditioning is 5"),
    ("conditioning index without conditioning", lambda h, t: (
        h.__setitem__("conditioning", []), [t.pop(k) for k in list(t) if k.startswith("cond.")],
        h["steps"][1].__setitem__("conditioning", 2)), r"steps\[1\]\.conditioning is 2, but the file holds 0"),
]


@pytest.mark.parametrize("name,damage,message", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_damaged_header_says_what_is_wrong(trace, tmp_path, name, damage, message):
    tensors, header = _parts(trace, tmp_path)
    damage(header, tensors)
    path = _write(tmp_path, tensors, header)
    with pytest.raises(dlx.DlxError, match=r"damaged\.safetensors") as e:
        Trace.load(path)
    assert re.search(message, str(e.value)), str(e.value)


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_a_deeply_nested_header_is_refused_not_a_recursion_error(tmp_path, opening):
    depth = 100_000
    raw = '{"format_version": 1, "meta": ' + opening * depth + "1" + ("]" if opening == "[" else "}") * depth + "}"
    path = _write(tmp_path, {"x": torch.zeros(1)}, None, raw=raw)
    with pytest.raises(dlx.DlxError, match=r"damaged\.safetensors.*nested deeper than 64"):
        Trace.load(path)


def test_a_file_without_the_tensor_manifest_still_loads(trace, tmp_path):
    """Files written before the header listed its tensors load as before."""
    tensors, header = _parts(trace, tmp_path)
    del header["tensors"]
    back = Trace.load(_write(tmp_path, tensors, header))
    _bitwise_round_trip(trace, back)


def test_a_bracket_inside_a_string_is_not_nesting(trace, tmp_path):
    t = Trace(steps=list(trace.steps), conditioning=list(trace.conditioning),
              meta=dict(trace.meta, prompt='a "quoted" [[[[' * 40 + "\\"))
    back = Trace.load(t.save(tmp_path / "brackets.safetensors"))
    assert back.meta["prompt"] == t.meta["prompt"]


def test_the_conditioning_of_each_step_is_valid_and_loads(trace, tmp_path):
    back = Trace.load(trace.save(tmp_path / "run.safetensors"))
    assert [s.conditioning for s in back] == [s.conditioning for s in trace]


# -- per-sample step values, summarised per step; format 1 files (issue 10, item 6) --------------

def _hand_step(i, scale, active, nfe, b=2):
    return Step(index=i, timestep=float(10 - i), sigma=1.0 / (i + 1), guidance_scale=scale, cfg_active=active,
                nfe=nfe, latents=torch.full((b, 1, 2, 2), float(i)))


def test_to_frame_scale_is_nan_where_samples_differ_and_per_sample_rows_hold_each_value():
    t = Trace(steps=[_hand_step(0, [4.0, 4.0], [True, True], [2.0, 2.0]),
                     _hand_step(1, [2.0, 6.0], [True, False], [2.0, 1.0]),
                     _hand_step(2, [1.0, 1.0], [False, False], [1.0, 1.0])])
    df = t.to_frame()
    assert df["guidance_scale"].iloc[0] == 4.0 and math.isnan(df["guidance_scale"].iloc[1])
    assert df["guidance_scale"].iloc[2] == 1.0, "a uniform scale is shown even where no sample was guided"
    assert list(df["cfg_active"]) == [True, True, False]  # any sample
    assert list(df["nfe"]) == [2.0, 1.5, 1.0]  # mean over the samples
    per = t.to_frame(per_sample=True)
    assert list(per["sample"]) == [0, 1] * 3 and list(per["step"]) == [0, 0, 1, 1, 2, 2]
    assert list(per["guidance_scale"]) == [4.0, 4.0, 2.0, 6.0, 1.0, 1.0]
    assert list(per["cfg_active"]) == [True, True, True, False, False, False]
    assert list(per["nfe"]) == [2.0, 2.0, 2.0, 1.0, 1.0, 1.0]
    assert t.last_guided_step == 1 and [s.guided for s in t] == [True, True, False]


def test_per_sample_lists_round_trip(tmp_path):
    t = Trace(steps=[_hand_step(0, [3.0, 7.5], [True, False], [2.0, 1.0]),
                     _hand_step(1, [math.nan, math.nan], [False, False], [math.nan, math.nan])], meta={"batch": 2})
    back = Trace.load(t.save(tmp_path / "lists.safetensors"))
    assert back[0].guidance_scale == [3.0, 7.5] and back[0].cfg_active == [True, False] and back[0].nfe == [2.0, 1.0]
    assert all(math.isnan(v) for v in back[1].guidance_scale + back[1].nfe) and back[1].cfg_active == [False, False]
    assert json.loads(_header_of(tmp_path / "lists.safetensors"))["format_version"] == FORMAT_VERSION == 2


def test_save_refuses_a_step_without_per_sample_lists(tmp_path):
    t = Trace(steps=[_hand_step(0, 5.0, [True], [2.0], b=1)])
    with pytest.raises(dlx.DlxError, match=r"steps\[0\]\.guidance_scale is 5\.0; it must be a list with one value per sample"):
        t.save(tmp_path / "scalar.safetensors")
    assert list(tmp_path.iterdir()) == []


def _header_of(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["dlx.trace"]


V1 = os.path.join(os.path.dirname(__file__), "data", "trace_v1", "cutoff_b2.safetensors")


def test_a_format_1_file_loads_as_per_sample_lists():
    """The fixture was written by the dlx of 6b7a96e (see tests/data/trace_v1/make_fixture.py):
    CFGCutoff(ratio=[0.75, 0.25]) and GuidanceSchedule("linear", low=[2, 3], high=[4, 7]) on a tiny
    SD pipeline, batch 2, 4 steps; the pipeline left CFG after step 2 (no sample guided after it)."""
    assert json.loads(_header_of(V1))["format_version"] == 1
    t = dlx.Trace.load(V1)
    assert [s.cfg_active for s in t] == [[True, True], [True, False], [True, False], [False, False]]
    assert [s.guidance_scale for s in t] == [[2.0, 3.0], [2.5, 4.0], [3.0, 5.0], [5.0, 5.0]]
    # per sample from format 1's step mean: nfe − mean(mask) + mask[j], whole numbers
    assert [s.nfe for s in t] == [[2.0, 2.0], [2.0, 1.0], [2.0, 1.0], [1.0, 1.0]]
    assert [sum(s.nfe[j] for s in t) for j in range(2)] == t.nfe == [7.0, 5.0]
    assert t.last_guided_step == 2 and t.fields() == ["latents"] and t[0].latents.shape == (2, 4, 16, 16)
    df = t.to_frame()
    assert list(df["nfe"]) == [2.0, 1.5, 1.5, 1.0] and list(df["cfg_active"]) == [True, True, True, False]
    assert df["guidance_scale"].isna().tolist() == [True, True, True, False]
    assert df["guidance_scale"].iloc[3] == 5.0


def test_a_format_1_file_saves_again_as_format_2(tmp_path):
    t = Trace.load(V1)
    back = Trace.load(t.save(tmp_path / "v2.safetensors"))
    assert json.loads(_header_of(tmp_path / "v2.safetensors"))["format_version"] == 2
    assert [s.scalars() for s in back] == [s.scalars() for s in t]
    assert all(_same_bits(a.latents, b.latents) for a, b in zip(t, back))


def _v1_parts():
    from safetensors import safe_open

    with safe_open(V1, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["dlx.trace"])


def test_a_format_1_step_without_mask_tensors_repeats_its_values_per_sample(tmp_path):
    """A format-1 trace built by hand had no per-sample tensors: its values hold for every sample."""
    tensors, header = _v1_parts()
    for k in [k for k in tensors if k.endswith((".cfg_mask", ".scale"))]:
        del tensors[k]
    header["tensors"] = sorted(tensors)
    t = Trace.load(_write(tmp_path, tensors, header))
    assert t[1].cfg_active == [True, True] and t[1].guidance_scale == [3.25, 3.25] and t[1].nfe == [1.5, 1.5]


V1_DAMAGED = [
    ("a float mask", lambda h, t: t.__setitem__("steps.1.cfg_mask", torch.ones(2)),
     r"steps\.1\.cfg_mask must be a 1-D bool tensor \(format 1\); got torch\.float32"),
    ("a 2-D scale", lambda h, t: t.__setitem__("steps.1.scale", torch.ones(2, 1)),
     r"steps\.1\.scale must be a 1-D float tensor \(format 1\)"),
    ("mask and scale of different lengths", lambda h, t: t.__setitem__("steps.1.scale", torch.ones(3)),
     r"steps\.1\.cfg_mask and steps\.1\.scale differ in length \(2 vs 3\)"),
    ("a list where format 1 has a bool", _step("cfg_active", [True]),
     r"steps\[1\]\.cfg_active must be bool \(format 1\); got \[True\]"),
    ("a string nfe", _step("nfe", "1.5"), r"steps\[1\]\.nfe must be float \(format 1\)"),
]


@pytest.mark.parametrize("name,damage,message", V1_DAMAGED, ids=[d[0] for d in V1_DAMAGED])
def test_a_damaged_format_1_file_says_what_is_wrong(tmp_path, name, damage, message):
    tensors, header = _v1_parts()
    damage(header, tensors)
    with pytest.raises(dlx.DlxError, match=r"damaged\.safetensors") as e:
        Trace.load(_write(tmp_path, tensors, header))
    assert re.search(message, str(e.value)), str(e.value)


def test_a_reshaped_tensor_in_a_file_is_refused_at_load(tmp_path):
    # Issue 23, item 10: a tensor edited to another shape loaded and failed later inside torch.
    from safetensors import safe_open
    from safetensors.torch import load_file

    pipe = pipe_for("sd")
    with dlx.record(pipe) as trace:
        run(pipe, "sd", num_images_per_prompt=2)
    p = tmp_path / "t.safetensors"
    trace.save(p)
    with safe_open(str(p), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(p))
    name = next(k for k in tensors if k.startswith("steps.1.latents"))
    tensors[name] = tensors[name].reshape(1, -1)  # 2 samples' rows folded into one
    save_file(tensors, str(p), metadata=meta)
    with pytest.raises(dlx.DlxError, match=r"steps\.1\.latents has shape \(1, .*step holds 2 sample"):
        dlx.Trace.load(p)
