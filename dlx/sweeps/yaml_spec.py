"""A sweep described in YAML, for ``python -m dlx sweep spec.yaml`` (read with ``yaml.safe_load``).

    model: shapes                  # 'shapes', a folder saved by save_pretrained, or a hub id
    dtype: float32                 # optional
    out: runs/cutoffs              # relative paths (out, a model folder) are from this file's folder
    prompts: ["a red circle on the left and a blue square on the right"]
    seeds: 8                       # an int n means seeds 0 .. n-1; or a list
    # pairs: [["a red circle", 3], ...]   instead of prompts x seeds
    cutoffs: [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    # or named configs; a control is {type: CFGCutoff, ratio: 0.4} or {CFGCutoff: {ratio: 0.4}}
    # configs: {full: [], late: {GuidanceInterval: {start: 0.2, stop: 0.8}}}
    guidance_scales: [3, 6]        # optional axes crossed into the grid
    steps: [10, 25]
    metrics: [psnr, ssim, adherence]
    call: {num_inference_steps: 25, guidance_scale: 6.0}   # pipeline keyword arguments
    max_batch: 64                  # optional; also timing: [eager, compiled], timing_batch, keep_previews,
                                   # retry_failed, share, pad
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DlxError

__all__ = ["read_yaml", "run_yaml"]

KEYS = {"model", "dtype", "device", "out", "prompts", "seeds", "pairs", "cutoffs", "configs", "guidance_scales", "steps",
        "metrics", "call", "max_batch", "timing", "timing_batch", "timing_repeats", "keep_previews", "share",
        "retry_failed", "pad"}
#: dlx.sweep's own settings: never pipeline arguments, so not allowed under `call`
SWEEP_SETTINGS = KEYS | {"pipe", "networks", "progress"}


def _control(name, c):
    if isinstance(c, dict) and "type" in c:
        return dict(c)
    if isinstance(c, dict) and len(c) == 1:
        (t, kw), = c.items()
        if kw is None:
            kw = {}
        if not isinstance(kw, dict):
            raise DlxError(f"spec `configs.{name}`: arguments of {t} must be a mapping; got {kw!r}")
        return {"type": t, **kw}
    raise DlxError(f"spec `configs.{name}`: a control is {{type: CFGCutoff, ratio: 0.4}} or "
                   f"{{CFGCutoff: {{ratio: 0.4}}}}; got {c!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of(ok, v, single: bool = True) -> bool:
    """``v`` is a list whose items pass ``ok`` (or, where ``single``, one such item)."""
    return (isinstance(v, list) and all(ok(x) for x in v)) or (single and ok(v))


def _nonempty_str(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _pair(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and _nonempty_str(v[0]) and _is_int(v[1]) and v[1] >= 0


#: each key's check and what it takes (YAML gives strings, numbers, booleans, lists, mappings:
#: a key is refused unless it has exactly the type it needs; "no" and "false" are strings, not
#: booleans, and a mapping is not a list of prompts)
_TYPES = {
    "model": (_nonempty_str, "'shapes', a pipeline folder or a hub id (a string)"),
    "dtype": (lambda v: v is None or _nonempty_str(v), "a dtype name such as float32 or float16"),
    "device": (lambda v: v is None or _nonempty_str(v), "a device name such as cpu or cuda"),
    "out": (lambda v: v is None or _nonempty_str(v), "a folder path (a non-empty string)"),
    "prompts": (lambda v: _list_of(_nonempty_str, v) and v != [], "a list of prompts (non-empty strings)"),
    "seeds": (lambda v: (_is_int(v) and 1 <= v <= 10 ** 6) or (isinstance(v, list) and v != [] and all(_is_int(x) and x >= 0 for x in v)),
              "a count n in [1, 10**6] (seeds 0 .. n-1) or a list of seeds (ints >= 0)"),
    "pairs": (lambda v: isinstance(v, list) and v != [] and all(_pair(x) for x in v),
              "a list of [prompt, seed] pairs"),
    "cutoffs": (lambda v: _list_of(_is_num, v), "a list of ratios in [0, 1]"),
    "configs": (lambda v: isinstance(v, dict), "a mapping of config names to controls"),
    "guidance_scales": (lambda v: _list_of(_is_num, v), "a list of numbers"),
    "steps": (lambda v: _list_of(_is_int, v), "a list of step counts (ints)"),
    "metrics": (lambda v: _list_of(_nonempty_str, v), "a list of metric names (psnr, ssim, lpips, clip, adherence)"),
    "call": (lambda v: v is None or isinstance(v, dict), "a mapping of pipeline arguments"),
    "max_batch": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive int"),
    "timing": (lambda v: v is None or _list_of(_nonempty_str, v), "a list of eager and/or compiled"),
    "timing_batch": (lambda v: _is_int(v) and v >= 1, "a positive int"),
    "timing_repeats": (lambda v: _is_int(v) and v >= 1, "a positive int"),
    "keep_previews": (lambda v: isinstance(v, bool), "true or false"),
    "share": (lambda v: isinstance(v, bool), "true or false"),
    "retry_failed": (lambda v: isinstance(v, bool), "true or false"),
    "pad": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
}
assert set(_TYPES) == KEYS


def _check_types(d: dict, p: Path) -> None:
    for key, v in d.items():
        ok, what = _TYPES[key]
        if not ok(v):
            raise DlxError(f"spec {str(p)!r}: `{key}` must be {what}; got {v!r}"
                           + (" (a string, not a boolean: write true or false without quotes)"
                              if what.startswith("true") and isinstance(v, str) else ""))


def read_yaml(path) -> dict:
    """The spec file as ``dlx.sweep`` keyword arguments (checked: unknown keys are refused)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DlxError(f"argument `spec`: no such file {str(p)!r}")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise DlxError(f"argument `spec`: {str(p)!r} is not valid YAML ({e})") from None
    if not isinstance(d, dict):
        raise DlxError(f"argument `spec`: {str(p)!r} must hold a mapping of sweep settings; got {type(d).__name__}")
    unknown = sorted(set(d) - KEYS)
    if unknown:
        raise DlxError(f"spec {str(p)!r}: unknown key(s) {unknown}; known: {sorted(KEYS)}")
    if "model" not in d:
        raise DlxError(f"spec {str(p)!r}: `model` is required ('shapes', a pipeline folder or a hub id)")
    _check_types(d, p)
    kw = {k: v for k, v in d.items() if not (v is None and k in ("dtype", "device", "out", "max_batch", "pad"))}
    for key in ("prompts", "metrics"):  # one string is a list of one
        if isinstance(kw.get(key), str):
            kw[key] = [kw[key]]
    call = kw.pop("call", None) or {}
    if not isinstance(call, dict):
        raise DlxError(f"spec `call` must be a mapping of pipeline arguments; got {call!r}")
    clash = sorted(set(call) & SWEEP_SETTINGS)
    if clash:
        raise DlxError(f"spec `call.{clash[0]}`: {clash} are sweep settings, not pipeline arguments; "
                       f"put them at the top level of the spec")
    if "pairs" in kw:
        kw["pairs"] = [tuple(x) if isinstance(x, list) else x for x in (kw["pairs"] or [])]
    else:
        seeds = kw.get("seeds", 8)
        if _is_int(seeds):
            kw["seeds"] = list(range(seeds))
    if "configs" in kw:
        cfgs = kw["configs"]
        if not isinstance(cfgs, dict):
            raise DlxError(f"spec `configs` must map names to controls; got {cfgs!r}")
        out = {}
        for name, v in cfgs.items():
            if v is None or v == []:
                out[str(name)] = None
            elif isinstance(v, list):
                out[str(name)] = [_control(name, c) for c in v]
            else:
                out[str(name)] = _control(name, v)
        kw["configs"] = out
    model = kw.pop("model")
    if isinstance(model, str) and model != "shapes" and not model.count("/") == 1:
        rel = (p.parent / model)
        if rel.is_dir():
            model = str(rel)
    elif isinstance(model, str) and (p.parent / model).is_dir():
        model = str(p.parent / model)
    from .api import _check_model

    _check_model(model, "model")
    kw["pipe"] = model
    if isinstance(kw.get("out"), str) and not Path(kw["out"]).expanduser().is_absolute():
        kw["out"] = str(p.parent / Path(kw["out"]).expanduser())  # relative to the file, as `model`
    kw.update(call)
    return kw


def run_yaml(path, out=None, device=None, progress: bool = True):
    from .api import sweep

    kw = read_yaml(path)
    if out is not None:
        kw["out"] = out
    if kw.get("out") is None:
        raise DlxError(f"spec {str(path)!r} has no `out`; give one in the file or --out")
    if device is not None:
        kw["device"] = device
    pipe = kw.pop("pipe")
    return sweep(pipe, progress=progress, **kw)
