"""Bad input, tried systematically (issue 11, Deliver): every public entry point, each argument
given the wrong type, a value out of range, NaN and an empty value, must raise a ``DlxError``
that names the argument (and, for a plain value, shows it), before any expensive work.

The table is the test. A new entry point is one line in ``ENTRY`` (how to call it, and arguments
that are fine) and one line per bad value in ``BAD``; ``EXPENSIVE`` names the work (building,
loading, opening a store) that is made to fail, so a row also proves the check comes first. A row that fails today because the fix lives
in another module is marked ``xfail(strict=True)`` with the module named: it turns into a failure
once fixed, and the mark must then go.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import dlx
import dlx.testing
import dlx.timing
import dlx.zoo
from dlx import DlxError
from dlx.trace import Trace

from .helpers import pipe_for

NAN = float("nan")
INF = float("inf")


# -- how to call each entry point ----------------------------------------------------------------

def _pipe():
    return pipe_for("sd")


def _record(**kw):
    with dlx.record(kw.pop("pipe"), **kw):
        pass


def _attach(pipe, parts=()):
    with dlx.attach(pipe, *parts):
        pass


def _save(path):
    return Trace().save(path)


def _image():
    return [dlx.testing._image(0, "image")]


#: entry point -> (call, arguments that are fine); each row replaces one of them
ENTRY = {
    "Recorder": (dlx.Recorder, lambda: dict(pipe=_pipe())),
    "record": (_record, lambda: dict(pipe=_pipe())),
    "attach": (_attach, lambda: dict(pipe=_pipe(), parts=())),
    "CFGCutoff": (dlx.CFGCutoff, lambda: dict(ratio=0.5)),
    "GuidanceInterval": (dlx.GuidanceInterval, lambda: dict(start=0.0, stop=1.0)),
    "GuidanceSchedule": (dlx.GuidanceSchedule, lambda: dict(schedule="linear", low=1.0)),
    "AdaptiveCutoff": (dlx.AdaptiveCutoff, lambda: dict(threshold=0.99)),
    "Guider": (dlx.Guider, lambda: dict(guider="ClassifierFreeGuidance", config=None)),
    "IPAdapterCutoff": (dlx.IPAdapterCutoff, lambda: dict(ratio=0.5)),
    "Interrupt": (dlx.Interrupt, lambda: dict(after_step=1)),
    "Share": (dlx.Share, lambda: dict(keys=["a"])),
    "part_from_config": (dlx.part_from_config, lambda: dict(cfg={"type": "CFGCutoff", "args": {"ratio": 0.5}})),
    "Trace.load": (Trace.load, lambda: dict()),
    "Trace.save": (_save, lambda: dict()),
    "timing.regime": (dlx.timing.regime, lambda: dict()),
    "zoo.load": (dlx.zoo.load, lambda: dict(name="shapes")),
    "zoo.info": (dlx.zoo.info, lambda: dict()),
    "zoo.path": (dlx.zoo.path, lambda: dict()),
    "zoo.adherence": (dlx.zoo.adherence, lambda: dict(images=torch.zeros(1, 3, 64, 64), prompts=["a red circle"])),
    "zoo.latent_rgb": (dlx.zoo.latent_rgb, lambda: dict(vae=_pipe().vae)),
    "testing.add_tiny_ip_adapter": (dlx.testing.add_tiny_ip_adapter, lambda: dict(pipe=_pipe())),
    "testing.tiny_pipeline": (dlx.testing.tiny_pipeline, lambda: dict(family="sd")),
    "testing.example_inputs": (dlx.testing.example_inputs, lambda: dict(family="sd")),
    "testing.latent_shape": (dlx.testing.latent_shape, lambda: dict(family="sd")),
    "fit_latent_rgb": (dlx.fit_latent_rgb, lambda: dict(vae=_pipe().vae, images=_image())),
    "latents_to_rgb": (dlx.latents_to_rgb, lambda: dict(latents=torch.zeros(1, 4, 8, 8), factors="sd15")),
    "Preview": (dlx.Preview, lambda: dict(fn=lambda step, image: None)),
    "sweep": (dlx.sweep, lambda tmp: dict(pipe="shapes", prompts=["a red circle"], seeds=[0], cutoffs=[0, 1.0],
                                          out=str(tmp / "sweep"), progress=False)),
    "sweep.load_pipeline": (dlx.sweeps.load_pipeline, lambda: dict(model="shapes")),
    "sweep.weights_fingerprint": (dlx.sweeps.weights_fingerprint, lambda: dict(pipe=_pipe())),
}

#: entry point -> the expensive work it must not start on bad input: (module, attribute) patched to fail
EXPENSIVE = {
    "testing.tiny_pipeline": [("dlx.testing", "_build")],
    "zoo.load": [("diffusers", "StableDiffusionPipeline")],
    "zoo.latent_rgb": [("dlx.zoo", "load"), ("dlx.zoo.shapes_data", "render")],
    "sweep": [("dlx.sweeps.api", "Store"), ("dlx.sweeps.api", "load_pipeline"), ("dlx.zoo", "load")],
    "sweep.load_pipeline": [("dlx.zoo", "load"), ("diffusers", "DiffusionPipeline")],
}



class _Dir:
    """A placeholder for a temporary directory (made per test)."""

    def __repr__(self):
        return "<a directory>"


class _Missing:
    def __repr__(self):
        return "<a missing file>"


DIR, MISSING = _Dir(), _Missing()


def bad(entry, arg, value, label, xfail=None, match=None):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(entry, arg, value, match, id=f"{entry}-{arg}-{label}", marks=marks)


BAD = [
    # Recorder(pipe, keep, dtype, downsample, storage)
    bad("Recorder", "pipe", None, "none"),
    bad("Recorder", "pipe", "sd", "type"),
    bad("Recorder", "keep", "latent", "unknown"),
    bad("Recorder", "keep", None, "none"),
    bad("Recorder", "keep", 5, "type"),
    bad("Recorder", "keep", ["x0", "x0"], "twice"),
    bad("Recorder", "keep", [1], "entry-type"),
    bad("Recorder", "dtype", torch.int8, "int8"),
    bad("Recorder", "dtype", torch.bool, "bool"),
    bad("Recorder", "dtype", "float99", "name"),
    bad("Recorder", "dtype", "", "empty"),
    bad("Recorder", "dtype", 16, "type"),
    bad("Recorder", "downsample", 0, "zero"),
    bad("Recorder", "downsample", -2, "negative"),
    bad("Recorder", "downsample", 2.5, "float"),
    bad("Recorder", "downsample", NAN, "nan"),
    bad("Recorder", "downsample", True, "bool"),
    bad("Recorder", "downsample", "2", "type"),
    bad("Recorder", "storage", "gpu", "unknown"),
    bad("Recorder", "storage", "", "empty"),
    bad("Recorder", "storage", None, "none"),
    bad("Recorder", "storage", ["cpu"], "unhashable"),
    # record(pipe, *parts, **recorder arguments)
    bad("record", "pipe", None, "none"),
    bad("record", "keep", "nope", "unknown"),
    bad("record", "dtype", torch.int8, "int8"),
    bad("record", "downsample", 0, "zero"),
    bad("record", "storage", "x", "unknown"),
    # attach(pipe, *parts)
    bad("attach", "pipe", None, "none"),
    bad("attach", "pipe", "sd", "type"),
    bad("attach", "parts", ["not a part"], "type"),
    # CFGCutoff(ratio, *, step, sigma, compat)
    bad("CFGCutoff", "ratio", -0.1, "below"),
    bad("CFGCutoff", "ratio", 1.5, "above"),
    bad("CFGCutoff", "ratio", NAN, "nan"),
    bad("CFGCutoff", "ratio", "0.5", "type"),
    bad("CFGCutoff", "ratio", True, "bool"),
    bad("CFGCutoff", "ratio", [], "empty"),
    bad("CFGCutoff", "step", -1, "negative"),
    bad("CFGCutoff", "step", 1.5, "float"),
    bad("CFGCutoff", "step", NAN, "nan"),
    bad("CFGCutoff", "step", "1", "type"),
    bad("CFGCutoff", "sigma", -1.0, "negative"),
    bad("CFGCutoff", "sigma", NAN, "nan"),
    bad("CFGCutoff", "sigma", "1", "type"),
    bad("CFGCutoff", "compat", "x", "unknown"),
    bad("CFGCutoff", "compat", "", "empty"),
    bad("CFGCutoff", "compat", None, "none"),
    # GuidanceInterval(start, stop)
    bad("GuidanceInterval", "start", -0.1, "below"),
    bad("GuidanceInterval", "start", 1.5, "above"),
    bad("GuidanceInterval", "start", NAN, "nan"),
    bad("GuidanceInterval", "start", "0", "type"),
    bad("GuidanceInterval", "stop", -0.1, "below"),
    bad("GuidanceInterval", "stop", 1.5, "above"),
    bad("GuidanceInterval", "stop", NAN, "nan"),
    bad("GuidanceInterval", "stop", None, "none"),
    # GuidanceSchedule(schedule, *, low, high)
    bad("GuidanceSchedule", "schedule", "nope", "unknown"),
    bad("GuidanceSchedule", "schedule", "", "empty"),
    bad("GuidanceSchedule", "schedule", 5, "type"),
    bad("GuidanceSchedule", "low", -1.0, "negative"),
    bad("GuidanceSchedule", "low", NAN, "nan"),
    bad("GuidanceSchedule", "low", INF, "inf"),
    bad("GuidanceSchedule", "low", "1", "type"),
    bad("GuidanceSchedule", "high", -1.0, "negative"),
    bad("GuidanceSchedule", "high", NAN, "nan"),
    bad("GuidanceSchedule", "high", INF, "inf"),
    bad("GuidanceSchedule", "high", "1", "type"),
    # Guider(guider, config)
    bad("Guider", "guider", None, "none"),
    bad("Guider", "guider", "NoSuchGuidance", "unknown"),
    bad("Guider", "guider", [], "empty"),
    bad("Guider", "guider", 5, "type"),
    bad("Guider", "config", 5, "type"),
    bad("Guider", "config", {"no_such_arg": 1}, "unknown-arg"),
    # AdaptiveCutoff(threshold)
    bad("AdaptiveCutoff", "threshold", 0.0, "zero"),
    bad("AdaptiveCutoff", "threshold", 1.5, "above"),
    bad("AdaptiveCutoff", "threshold", NAN, "nan"),
    bad("AdaptiveCutoff", "threshold", "0.9", "type"),
    bad("AdaptiveCutoff", "threshold", None, "none"),
    # IPAdapterCutoff(ratio, *, step)
    bad("IPAdapterCutoff", "ratio", -0.1, "below"),
    bad("IPAdapterCutoff", "ratio", 1.5, "above"),
    bad("IPAdapterCutoff", "ratio", NAN, "nan"),
    bad("IPAdapterCutoff", "ratio", "0.5", "type"),
    bad("IPAdapterCutoff", "step", -1, "negative"),
    bad("IPAdapterCutoff", "step", NAN, "nan"),
    # Share(keys)
    bad("Share", "keys", None, "none"),
    bad("Share", "keys", "abc", "str"),
    bad("Share", "keys", [], "empty"),
    bad("Share", "keys", 3, "type"),
    # part_from_config(cfg, pipe)
    bad("part_from_config", "cfg", None, "none"),
    bad("part_from_config", "cfg", "CFGCutoff", "type"),
    bad("part_from_config", "cfg", {"type": "Nope", "args": {}}, "unknown"),
    # Interrupt(after_step, *, seconds, on_nonfinite, event)
    bad("Interrupt", "after_step", -1, "negative"),
    bad("Interrupt", "after_step", 1.5, "float"),
    bad("Interrupt", "after_step", NAN, "nan"),
    bad("Interrupt", "after_step", "1", "type"),
    bad("Interrupt", "seconds", 0, "zero"),
    bad("Interrupt", "seconds", -1.0, "negative"),
    bad("Interrupt", "seconds", NAN, "nan"),
    bad("Interrupt", "seconds", "1", "type"),
    bad("Interrupt", "on_nonfinite", "yes", "type"),
    bad("Interrupt", "on_nonfinite", 1, "int"),
    bad("Interrupt", "event", "set", "type"),
    # Trace.load(path) and trace.save(path)
    bad("Trace.load", "path", None, "none"),
    bad("Trace.load", "path", 5, "type"),
    bad("Trace.load", "path", "", "empty"),
    bad("Trace.load", "path", DIR, "directory"),
    bad("Trace.load", "path", MISSING, "missing", match="does not exist"),
    bad("Trace.save", "path", None, "none"),
    bad("Trace.save", "path", 5, "type"),
    bad("Trace.save", "path", "", "empty"),
    bad("Trace.save", "path", DIR, "directory"),
    # dlx.timing.regime(trace)
    bad("timing.regime", "trace", None, "none"),
    bad("timing.regime", "trace", "run.safetensors", "type"),
    # dlx.zoo
    bad("zoo.load", "name", "nope", "unknown"),
    bad("zoo.load", "name", "", "empty"),
    bad("zoo.load", "name", None, "none"),
    bad("zoo.load", "name", ["shapes"], "unhashable"),
    bad("zoo.load", "device", "", "empty"),
    bad("zoo.load", "device", "warp-drive", "unknown"),
    bad("zoo.load", "device", 3.5, "type"),
    bad("zoo.load", "dtype", "float16x", "name"),
    bad("zoo.load", "dtype", torch.int8, "int8"),
    bad("zoo.load", "dtype", "", "empty"),
    bad("zoo.load", "folder", 5, "type"),
    bad("zoo.load", "folder", "", "empty"),
    bad("zoo.load", "folder", DIR, "not-a-pipeline"),
    bad("zoo.info", "name", "nope", "unknown"),
    bad("zoo.info", "name", None, "none"),
    bad("zoo.path", "name", "", "empty"),
    bad("zoo.path", "name", 5, "type"),
    bad("zoo.adherence", "images", [], "empty"),
    bad("zoo.adherence", "images", "img.png", "type"),
    bad("zoo.adherence", "images", 5, "int"),
    bad("zoo.adherence", "images", torch.full((1, 3, 64, 64), NAN), "nan"),
    bad("zoo.adherence", "images", torch.zeros(1, 2, 8, 8), "shape"),
    bad("zoo.adherence", "prompts", [], "empty"),
    bad("zoo.adherence", "prompts", 5, "type"),
    bad("zoo.adherence", "prompts", [5], "entry-type"),
    bad("zoo.adherence", "prompts", ["a red elephant"], "not-a-caption"),
    bad("zoo.adherence", "prompts", ["a red circle", "a blue star"], "length"),
    bad("zoo.adherence", "as_frame", "yes", "type"),
    bad("zoo.latent_rgb", "name", "nope", "unknown"),
    bad("zoo.latent_rgb", "n", 0, "zero"),
    bad("zoo.latent_rgb", "n", NAN, "nan"),
    bad("zoo.latent_rgb", "n", "32", "type"),
    bad("zoo.latent_rgb", "seed", 1.5, "float"),
    bad("zoo.latent_rgb", "vae", "vae", "type"),
    # dlx.testing
    bad("testing.add_tiny_ip_adapter", "pipe", None, "none"),
    bad("testing.add_tiny_ip_adapter", "seed", "0", "type"),
    bad("testing.add_tiny_ip_adapter", "seed", NAN, "nan"),
    bad("testing.tiny_pipeline", "family", "sd4", "unknown"),
    bad("testing.tiny_pipeline", "family", "", "empty"),
    bad("testing.tiny_pipeline", "family", None, "none"),
    bad("testing.tiny_pipeline", "seed", "0", "type"),
    bad("testing.tiny_pipeline", "seed", 1.5, "float"),
    bad("testing.tiny_pipeline", "seed", NAN, "nan"),
    bad("testing.tiny_pipeline", "dtype", "float16x", "name"),
    bad("testing.tiny_pipeline", "dtype", torch.int64, "int64"),
    bad("testing.tiny_pipeline", "device", "", "empty"),
    bad("testing.tiny_pipeline", "device", "warp-drive", "unknown"),
    bad("testing.tiny_pipeline", "scheduler", "nope", "unknown"),
    bad("testing.tiny_pipeline", "scheduler", "", "empty"),
    bad("testing.tiny_pipeline", "scheduler", 5, "type"),
    bad("testing.example_inputs", "family", "sd4", "unknown"),
    bad("testing.example_inputs", "prompt", None, "none"),
    bad("testing.example_inputs", "prompt", 5, "type"),
    bad("testing.example_inputs", "batch", 0, "zero"),
    bad("testing.example_inputs", "batch", NAN, "nan"),
    bad("testing.example_inputs", "batch", "2", "type"),
    bad("testing.example_inputs", "num_images_per_prompt", 0, "zero"),
    bad("testing.example_inputs", "num_images_per_prompt", 1.5, "float"),
    bad("testing.example_inputs", "steps", 0, "zero"),
    bad("testing.example_inputs", "steps", -3, "negative"),
    bad("testing.example_inputs", "steps", NAN, "nan"),
    bad("testing.example_inputs", "steps", "4", "type"),
    bad("testing.example_inputs", "seed", "0", "type"),
    bad("testing.example_inputs", "seed", NAN, "nan"),
    bad("testing.example_inputs", "guidance_scale", NAN, "nan"),
    bad("testing.example_inputs", "guidance_scale", INF, "inf"),
    bad("testing.example_inputs", "guidance_scale", -1.0, "negative"),
    bad("testing.example_inputs", "guidance_scale", "5", "type"),
    bad("testing.example_inputs", "output_type", "png", "unknown"),
    bad("testing.example_inputs", "output_type", "", "empty"),
    bad("testing.example_inputs", "ip_adapter_image", "yes", "type"),
    bad("testing.latent_shape", "family", "sd4", "unknown"),
    bad("testing.latent_shape", "batch", 0, "zero"),
    bad("testing.latent_shape", "batch", NAN, "nan"),
    # preview: fit_latent_rgb(vae, images, *, scaling_factor, shift_factor, name)
    bad("fit_latent_rgb", "vae", None, "none"),
    bad("fit_latent_rgb", "vae", "vae", "type"),
    bad("fit_latent_rgb", "images", [], "empty"),
    bad("fit_latent_rgb", "images", None, "none"),
    bad("fit_latent_rgb", "images", torch.full((1, 3, 32, 32), NAN), "nan"),
    bad("fit_latent_rgb", "scaling_factor", NAN, "nan"),
    bad("fit_latent_rgb", "scaling_factor", 0.0, "zero"),
    bad("fit_latent_rgb", "scaling_factor", "1", "type"),
    bad("fit_latent_rgb", "shift_factor", NAN, "nan"),
    bad("fit_latent_rgb", "shift_factor", "0", "type"),
    # latents_to_rgb(latents, factors, *, packed, height, width, vae_scale_factor, space)
    bad("latents_to_rgb", "latents", None, "none"),
    bad("latents_to_rgb", "latents", "x", "type"),
    bad("latents_to_rgb", "latents", torch.zeros(0, 4, 8, 8), "empty"),
    bad("latents_to_rgb", "factors", "nope", "unknown"),
    bad("latents_to_rgb", "factors", 5, "type"),
    bad("latents_to_rgb", "factors", "", "empty"),
    bad("latents_to_rgb", "space", "x", "unknown"),
    bad("latents_to_rgb", "packed", "yes", "type"),
    # Preview(fn, kind, *, size, sample, factors, taesd, every)
    bad("Preview", "fn", None, "none"),
    bad("Preview", "fn", 5, "type"),
    bad("Preview", "kind", "noise", "unknown"),
    bad("Preview", "kind", "", "empty"),
    bad("Preview", "kind", None, "none"),
    bad("Preview", "size", 0, "zero"),
    bad("Preview", "size", NAN, "nan"),
    bad("Preview", "size", "128", "type"),
    bad("Preview", "sample", -1, "negative"),
    bad("Preview", "sample", 1.5, "float"),
    bad("Preview", "factors", "nope", "unknown"),
    bad("Preview", "taesd", "taesd", "type"),
    bad("Preview", "every", 0, "zero"),
    bad("Preview", "every", NAN, "nan"),
    # sweep(pipe, prompts, seeds, cutoffs, configs, metrics, out, max_batch, timing, ...): before any model work
    bad("sweep", "pipe", None, "none"),
    bad("sweep", "pipe", "no/such/thing/here", "unknown-model"),
    bad("sweep", "prompts", [], "empty"),
    bad("sweep", "prompts", [""], "empty-prompt"),
    bad("sweep", "seeds", [], "empty"),
    bad("sweep", "seeds", [NAN], "nan"),
    bad("sweep", "cutoffs", [], "empty"),
    bad("sweep", "cutoffs", [1.5], "range"),
    bad("sweep", "cutoffs", [NAN], "nan"),
    bad("sweep", "configs", {}, "empty"),
    bad("sweep", "metrics", ["fid"], "unknown"),
    bad("sweep", "metrics", ["lpips"], "no-network"),
    bad("sweep", "max_batch", 0, "range"),
    bad("sweep", "max_batch", NAN, "nan"),
    bad("sweep", "timing", ["fast"], "unknown"),
    bad("sweep", "timing_batch", 0, "range"),
    bad("sweep", "out", "", "empty"),
    bad("sweep", "share", "no", "string-not-bool"),
    bad("sweep", "keep_previews", "yes", "string-not-bool"),
    bad("sweep", "retry_failed", 1, "int-not-bool"),
    bad("sweep", "progress", None, "none-not-bool"),
    bad("sweep", "pad", "false", "string-not-bool"),
    bad("sweep.load_pipeline", "device", "cuda:99", "no-such-card"),
    bad("sweep", "device", "gpu9", "unknown"),
    bad("sweep", "dtype", "int8", "int8"),
    bad("sweep", "dtype", torch.int8, "int8-dtype"),
    bad("sweep", "dtype", "float99", "name"),
    # sweep.load_pipeline(model, device, dtype)
    bad("sweep.load_pipeline", "model", None, "none"),
    bad("sweep.load_pipeline", "model", "", "empty"),
    bad("sweep.load_pipeline", "model", 5, "type"),
    bad("sweep.load_pipeline", "model", "a/b/c", "unknown"),
    bad("sweep.load_pipeline", "device", "warp-drive", "unknown"),
    bad("sweep.load_pipeline", "device", "", "empty"),
    bad("sweep.load_pipeline", "dtype", "float99", "name"),
    bad("sweep.load_pipeline", "dtype", "", "empty"),
    bad("sweep.load_pipeline", "dtype", "int8", "int8"),
    bad("sweep.load_pipeline", "dtype", torch.int8, "int8-dtype"),
    bad("sweep.load_pipeline", "dtype", 16, "type"),
    # sweep.weights_fingerprint(pipe, per_tensor)
    bad("sweep.weights_fingerprint", "pipe", None, "none"),
    bad("sweep.weights_fingerprint", "pipe", "shapes", "name"),
    bad("sweep.weights_fingerprint", "per_tensor", 0, "zero"),
    bad("sweep.weights_fingerprint", "per_tensor", 2.5, "float"),
    bad("sweep.weights_fingerprint", "per_tensor", True, "bool"),
]


def _shown(value) -> str | None:
    """How a plain value appears in a message (None: not checked, e.g. tensors and objects)."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype)):
        return repr(value)
    return None


class _Started:
    """Stands in for expensive work: calling it or anything on it fails the test."""

    def __init__(self, what):
        self.what = what

    def __call__(self, *a, **k):
        raise AssertionError(f"{self.what} started before the bad argument was reported")

    def __getattr__(self, name):
        raise AssertionError(f"{self.what}.{name} started before the bad argument was reported")


@pytest.mark.parametrize("entry,arg,value,match", BAD)
def test_bad_argument_is_a_dlx_error_naming_it(entry, arg, value, match, tmp_path, monkeypatch):
    import importlib

    for module, name in EXPENSIVE.get(entry, []):
        monkeypatch.setattr(importlib.import_module(module), name, _Started(f"{module}.{name}"))
    call, good = ENTRY[entry]
    kwargs = good(tmp_path) if good.__code__.co_argcount else good()
    if value is DIR:
        value = tmp_path
    elif value is MISSING:
        value = tmp_path / "missing.safetensors"
    if entry == "attach" and arg == "parts":
        kwargs["parts"] = value
    else:
        kwargs[arg] = value
    with pytest.raises(DlxError) as e:
        call(**kwargs)
    msg = str(e.value)
    if match is not None:
        assert re.search(match, msg) and str(value) in msg, msg
        return
    assert re.search(rf"(?<![\w]){re.escape(arg)}(?![\w])", msg), f"the message does not name `{arg}`: {msg}"
    shown = _shown(value)
    if shown is not None and shown not in ("''",):
        assert shown in msg or str(value) in msg, f"the message does not show the value {shown}: {msg}"


def test_every_public_entry_point_has_rows():
    """A public callable added to dlx, dlx.zoo, dlx.testing or dlx.sweep without a line here fails."""
    import inspect

    covered = set(ENTRY)
    public = {n for n in dlx.__all__ if n not in ("DlxError", "Part", "Guide", "RunInfo", "DenoiserCall", "Step", "Trace", "family_of")
              and callable(getattr(dlx, n)) and not inspect.ismodule(getattr(dlx, n))}
    public |= {f"testing.{n}" for n in dlx.testing.__all__ if callable(getattr(dlx.testing, n))}
    public |= {f"zoo.{n}" for n, v in vars(dlx.zoo).items()
               if inspect.isfunction(v) and not n.startswith("_") and v.__module__ == "dlx.zoo"}
    public |= {"sweep" if n == "sweep" else f"sweep.{n}" for n in dlx.sweeps.__all__
               if inspect.isfunction(getattr(dlx.sweeps, n))}
    assert public <= covered, sorted(public - covered)
    rows = {p.values[0] for p in BAD}
    assert rows == set(ENTRY), sorted(set(ENTRY) ^ rows)


# -- the cases of issue 11 behind the table ------------------------------------------------------

def test_keep_takes_one_name_as_a_string():
    """Issue 11, item 22: ``keep="latents"`` listed its letters as unknown entries."""
    from .helpers import run

    pipe = _pipe()
    rec = dlx.Recorder(pipe, keep="latents")
    assert rec.keep == ("latents",)
    with dlx.attach(pipe, rec):
        run(pipe, "sd", steps=2)
    fields = rec.trace.fields()
    assert "latents" in fields and not {"x0", "cond", "uncond"} & set(fields)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64, torch.uint8])
def test_recorder_refuses_a_dtype_that_would_round_every_tensor(dtype):
    """Issue 11, item 7: int8 and bool were accepted and the frame reported zeros."""
    with pytest.raises(DlxError, match=rf"argument `dtype`.*{re.escape(str(dtype))}.*not floating"):
        dlx.Recorder(_pipe(), dtype=dtype)


def test_recorder_takes_a_floating_dtype_by_name():
    from .helpers import run

    pipe = _pipe()
    with dlx.record(pipe, dtype="float16") as t:
        run(pipe, "sd", steps=1)
    assert {t[0].latents.dtype, t[0].x0.dtype, t[0].cond.dtype, t[0].uncond.dtype} == {torch.float16}


def _count_denoiser_calls(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


def test_downsample_larger_than_the_latent_is_refused_before_any_denoiser_work():
    """Issue 11, item 19: it crashed the run at step 0 inside avg_pool2d."""
    from .helpers import pipeline_state, run

    pipe = _pipe()
    before = pipeline_state(pipe)
    calls, handle = _count_denoiser_calls(pipe)
    try:
        with pytest.raises(DlxError, match=r"argument `downsample`=32 is larger than the latent \(16x16\)"):
            with dlx.record(pipe, downsample=32):
                run(pipe, "sd", steps=2)  # height and width given: checked before the loop
    finally:
        handle.remove()
    assert calls == [], "the denoiser ran before the bad argument was reported"
    assert pipeline_state(pipe) == before


def test_downsample_larger_than_the_latent_is_refused_at_the_first_step_without_a_size():
    """Without height/width in the call the size shows at the first step: still a DlxError."""
    from dlx.testing import example_inputs

    pipe = _pipe()
    kw = {k: v for k, v in example_inputs("sd", steps=2).items() if k not in ("height", "width")}
    with pytest.raises(DlxError, match=r"argument `downsample`=17 is larger than the recorded tensor \(16x16\)"):
        with dlx.record(pipe, downsample=17):
            pipe(**kw)


def test_downsample_equal_to_the_latent_works():
    from .helpers import run

    pipe = _pipe()
    with dlx.record(pipe, downsample=16) as t:
        run(pipe, "sd", steps=1)
    assert t[0].latents.shape == (1, 4, 1, 1)
