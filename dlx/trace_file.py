"""The trace file format: one ``.safetensors`` file per trace, written atomically and read with
every part of it checked.

Tensors are stored under ``steps.<i>.<field>`` and ``cond.<j>.<name>``; the metadata is JSON in
the safetensors header under ``dlx.trace``: format version, ``meta``, each step's scalars,
conditioning names and the list of the file's tensors (its manifest). Loading validates all of it
against the step type's fields; nothing in the file is executed, dropped or guessed. Format 2 keeps
the per-sample lists in the step scalars; format 1 files (per-step means beside ``cfg_mask`` and
``scale`` tensors) are converted as they load.

This module knows the file, not the class: :func:`write` reads any trace-like object (``steps``
with ``index``, ``tensors()`` and ``scalars()``; ``conditioning``; ``meta``) and :func:`read`
builds steps of the ``step_type`` it is handed (``dlx.trace.Step``, whose ``TENSOR_FIELDS`` and
``PER_SAMPLE`` name its tensor and per-sample fields). ``Trace.save`` / ``Trace.load`` call them.

Over 400 lines because most of it checks a file as it is read (header, steps, manifest, format-1
conversion): kept in one module so one place answers what a valid trace file is.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

import torch

from . import _args
from ._io import atomic_write
from .errors import DlxError

__all__ = ["FORMAT_VERSION", "write", "read"]

FORMAT_VERSION = 2


def write(path, trace, step_type) -> Path:
    """Write ``trace`` to ``path`` (a ``.safetensors`` file) atomically; return the path.

    Any tensor layout is saved (channels-last, strided views, views of one stacked tensor) and
    loads back bitwise equal. The file is written beside its target and renamed over it, so a
    crash leaves the old file or the new one, never a mix. An existing file keeps its
    permission bits; a new one gets the umask's, as ``open()`` gives; a symlink stays a
    symlink and its target is replaced.
    """
    from safetensors import torch as st

    path = _args.path("path", path)
    tensors = _tensors_to_save(trace, step_type)
    header = {
        "format_version": FORMAT_VERSION,
        "meta": trace.meta,
        "steps": [s.scalars() for s in trace.steps],  # per-sample tuples are written as lists
        "conditioning": [sorted(c) for c in trace.conditioning],
        "tensors": sorted(tensors),  # the file's manifest: a tensor removed or added is seen on load
    }
    try:
        text = json.dumps(header, default=_json_default, allow_nan=True)
    except (TypeError, ValueError, RecursionError) as e:
        raise DlxError(f"trace metadata cannot be written as JSON ({type(e).__name__}: {e})") from None
    atomic_write(path, lambda tmp: st.save_file(tensors, tmp, metadata={"dlx.trace": text}))
    return path


def read(path, step_type) -> tuple[list, list[dict[str, torch.Tensor]], dict]:
    """``(steps, conditioning, meta)`` of the trace file at ``path``, steps built as ``step_type``;
    a damaged or foreign file gives a DlxError naming it and saying what is wrong.

    Files of format 1 (dlx before per-sample step lists) are converted as they load: each
    step's per-sample ``cfg_active`` and ``guidance_scale`` come from its ``cfg_mask`` and
    ``scale`` tensors, and its per-sample ``nfe`` from the step's mean moved by the sample's
    own mask (``nfe − mean(mask) + mask[j]``: the unconditional row is the only evaluation
    that differs between samples). A format-1 step without those tensors (a trace built by
    hand) had no per-sample values: its single values are repeated for each sample of the
    run's batch (``meta["batch"]``, else the first dimension of a recorded tensor, else 1).
    """
    from safetensors import safe_open

    path = _args.path("path", path)
    where = repr(str(path))
    if path.is_dir():
        raise DlxError(f"argument `path` names a directory, not a trace file: {where}")
    if not path.is_file():
        raise DlxError(f"trace file {where} does not exist" if not path.exists()
                       else f"argument `path` is not a regular file: {where}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers/data
        raise DlxError(
            f"{where} is not a readable dlx trace (truncated or corrupt safetensors file: {e})"
        ) from None
    if "dlx.trace" not in meta:
        raise DlxError(f"{where} is a safetensors file but not a dlx trace (no 'dlx.trace' metadata)")
    header = _parse_header(meta["dlx.trace"], where)
    if header["format_version"] == 1:
        _upgrade_v1(header, tensors, where)
    steps_by_index, conditioning = _check_header(header, tensors, where, step_type)
    steps = []
    for sc in header["steps"]:
        s = step_type(**sc)
        for k, v in steps_by_index[sc["index"]].items():
            setattr(s, k, v)
        steps.append(s)
    return steps, conditioning, header["meta"]


# -- files: writing ----------------------------------------------------------------------------


def _tensors_to_save(trace, step_type) -> dict[str, torch.Tensor]:
    """Every tensor of the trace under its file name, dense and on the CPU.

    A copy per tensor: safetensors refuses non-contiguous tensors (channels-last img2img latents,
    strided views) and tensors sharing storage (steps may be views of one stacked tensor);
    ``clone(contiguous_format)`` gives an independent row-major copy with the same bits.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set = set()
    for n, s in enumerate(trace.steps):
        i = s.index
        if isinstance(i, bool) or not isinstance(i, int):
            raise DlxError(f"cannot save: step {n} has index {i!r}; step indices must be ints")
        if i in seen:
            raise DlxError(f"cannot save: two steps have index {i}; their tensors would overwrite each other")
        seen.add(i)
        for k in step_type.PER_SAMPLE:  # one value per sample: a file of another shape would not load
            v = getattr(s, k)
            if not isinstance(v, (list, tuple)):
                raise DlxError(f"cannot save: steps[{n}].{k} is {v!r}; it must be a list with one value per sample")
        for k, v in s.tensors().items():
            tensors[f"steps.{i}.{k}"] = _dense_cpu(v, f"steps[{n}].{k}")
    for j, c in enumerate(trace.conditioning):
        if not isinstance(c, dict):
            raise DlxError(f"cannot save: conditioning[{j}] must be a dict of tensors; got {type(c).__name__}")
        for k, v in c.items():
            if not isinstance(k, str) or not k:
                raise DlxError(f"cannot save: conditioning[{j}] has a key {k!r}; keys must be non-empty strings")
            tensors[f"cond.{j}.{k}"] = _dense_cpu(v, f"conditioning[{j}][{k!r}]")
    return tensors


def _dense_cpu(v, what: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise DlxError(f"cannot save: {what} is a {type(v).__name__}, not a torch.Tensor")
    if v.layout != torch.strided:
        v = v.to_dense()
    return v.detach().to("cpu").clone(memory_format=torch.contiguous_format)


# -- files: reading ----------------------------------------------------------------------------

#: deepest nesting of lists and dicts accepted in a file's header (dlx writes fewer than 10 levels)
_MAX_DEPTH = 64
_HEADER_KEYS = ("format_version", "meta", "steps", "conditioning", "tensors")  # "tensors": optional


def _parse_header(text: str, where: str) -> dict:
    if not _depth_ok(text, _MAX_DEPTH):
        raise DlxError(f"{where}: the trace metadata is nested deeper than {_MAX_DEPTH} levels; "
                       "not a header dlx writes (damaged or hostile file)")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DlxError(f"{where}: the trace metadata is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise DlxError(f"{where}: the trace metadata must be a JSON object; got {_jtype(header)}")
    if "format_version" not in header:
        raise DlxError(f"{where}: the trace metadata has no 'format_version' (damaged file?)")
    version = header["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DlxError(f"{where}: 'format_version' must be a positive int; got {version!r} (damaged file?)")
    if version > FORMAT_VERSION:
        raise DlxError(
            f"{where} was written with trace format version {version}, newer than this dlx "
            f"reads ({FORMAT_VERSION}); upgrade dlx"
        )
    return header


def _depth_ok(text: str, limit: int) -> bool:
    """Whether no bracket nests deeper than ``limit`` in JSON ``text`` (strings skipped): checked
    before parsing, since a deep enough nest exhausts the parser's recursion."""
    depth = 0
    i, n = 0, len(text)
    opening, closing = "[{", "]}"
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c in opening:
            depth += 1
            if depth > limit:
                return False
        elif c in closing:
            depth -= 1
        i += 1
    return True


def _jtype(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a bool", int: "an int",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _check_header(header: dict, tensors: dict, where: str, step_type):
    """Validate the header against the fields of ``step_type`` (``dlx.trace.Step``) and the file's tensors; return the tensors
    of each step by index and the conditioning list. Every tensor in the file must be accounted
    for and every tensor the header names must be present."""
    unknown = sorted(set(header) - set(_HEADER_KEYS))
    if unknown:
        raise DlxError(f"{where}: the trace metadata has unknown fields {unknown}; "
                       f"format {header['format_version']} has {list(_HEADER_KEYS)}")
    for key, kind in (("meta", dict), ("steps", list), ("conditioning", list)):
        if key not in header:
            raise DlxError(f"{where}: the trace metadata has no {key!r}")
        if not isinstance(header[key], kind):
            raise DlxError(f"{where}: {key!r} must be {_jtype(kind())}; got {_jtype(header[key])}")
    # conditioning: a list of lists of tensor names, each tensor present
    conditioning = []
    for j, names in enumerate(header["conditioning"]):
        if not isinstance(names, list) or not all(isinstance(k, str) and k for k in names):
            raise DlxError(f"{where}: conditioning[{j}] must be a list of tensor names; got {names!r}")
        if len(set(names)) != len(names):
            raise DlxError(f"{where}: conditioning[{j}] names a tensor twice: {names!r}")
        missing = [k for k in names if f"cond.{j}.{k}" not in tensors]
        if missing:
            raise DlxError(f"{where}: conditioning[{j}] names tensors the file does not hold: "
                           f"{[f'cond.{j}.{k}' for k in missing]}")
        conditioning.append({k: tensors[f"cond.{j}.{k}"] for k in names})
    # steps: exactly Step's scalar fields, with their types; unique int indices
    spec = _step_scalar_spec(step_type)
    required = [k for k, (_, has_default) in spec.items() if not has_default]
    by_index: dict[int, dict] = {}
    samples_of: dict[int, int | None] = {}
    for n, sc in enumerate(header["steps"]):
        if not isinstance(sc, dict):
            raise DlxError(f"{where}: steps[{n}] must be an object; got {_jtype(sc)}")
        extra = sorted(set(sc) - set(spec))
        if extra:
            raise DlxError(f"{where}: steps[{n}] has unknown fields {extra}; a step has {list(spec)}")
        missing = [k for k in required if k not in sc]
        if missing:
            raise DlxError(f"{where}: steps[{n}] lacks the fields {missing}")
        for k, v in sc.items():
            if not _type_ok(spec[k][0], v):
                raise DlxError(f"{where}: steps[{n}].{k} must be {spec[k][0]}; got {v!r}")
        lengths = [len(sc[k]) for k in step_type.PER_SAMPLE if k in sc]
        if len(set(lengths)) > 1:
            raise DlxError(f"{where}: steps[{n}] has {', '.join(f'{len(sc[k])} {k}' for k in step_type.PER_SAMPLE)} "
                           "values; each must hold one value per sample")
        i = sc["index"]
        if i < 0:
            raise DlxError(f"{where}: steps[{n}].index must be >= 0; got {i}")
        if i in by_index:
            raise DlxError(f"{where}: steps[{n}] repeats step index {i}; each step's index must be unique")
        c = sc.get("conditioning", 0)
        if isinstance(c, int) and not isinstance(c, bool) and not 0 <= c < max(len(conditioning), 1):
            raise DlxError(f"{where}: steps[{n}].conditioning is {c}, but the file holds "
                           f"{len(conditioning)} conditioning entries")
        by_index[i] = {}
        samples_of[i] = len(sc["cfg_active"]) if isinstance(sc.get("cfg_active"), list) else None
    # the manifest, where the file has one: every tensor it names is present
    manifest = header.get("tensors")  # absent in files written before it was added
    if manifest is not None:
        if not isinstance(manifest, list) or not all(isinstance(k, str) for k in manifest):
            raise DlxError(f"{where}: 'tensors' must be a list of tensor names; got {_jtype(manifest)}")
        absent = sorted(set(manifest) - set(tensors))
        if absent:
            shown = absent[:8] + (["..."] if len(absent) > 8 else [])
            raise DlxError(f"{where}: {len(absent)} tensor(s) the metadata names are not in the file: {shown} "
                           "(damaged or edited file)")
    # every tensor in the file belongs somewhere
    stray = []
    for name, v in tensors.items():
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "steps" and parts[1].isdigit() and parts[1] == str(int(parts[1])) \
                and int(parts[1]) in by_index and parts[2] in step_type.TENSOR_FIELDS:
            by_index[int(parts[1])][parts[2]] = v
        elif len(parts) == 3 and parts[0] == "cond" and parts[1].isdigit() and int(parts[1]) < len(conditioning) \
                and conditioning[int(parts[1])].get(parts[2]) is v:
            pass
        else:
            stray.append(name)
    if stray:
        shown = stray[:8] + (["..."] if len(stray) > 8 else [])
        raise DlxError(f"{where}: the file holds {len(stray)} tensor(s) its metadata does not describe: "
                       f"{shown} (damaged or edited file)")
    # shapes: a step tensor has one row per sample (a reshaped tensor is refused here, not left to
    # fail later inside torch)
    for i, fields in by_index.items():
        n = samples_of.get(i)
        for field, v in fields.items():
            if v.ndim == 0 or (n is not None and v.shape[0] != n):
                raise DlxError(f"{where}: steps.{i}.{field} has shape {tuple(v.shape)}, but the step holds "
                               f"{n} sample(s) (damaged or edited file)")
    return by_index, conditioning


#: format 1's per-step values of the fields that are per-sample lists since format 2
_V1_SCALARS = {"guidance_scale": "float", "cfg_active": "bool", "nfe": "float"}


def _upgrade_v1(header: dict, tensors: dict, where: str) -> None:
    """Turn a format-1 header (and its ``cfg_mask`` / ``scale`` step tensors) into format 2's, in
    place; what is not format 1's to convert is left for ``_check_header`` to judge."""
    steps = header.get("steps")
    if not isinstance(steps, list):
        return
    batch = _v1_batch(header, tensors)
    moved = []
    for n, sc in enumerate(steps):
        if not isinstance(sc, dict):
            continue
        for k, ann in _V1_SCALARS.items():
            if k in sc and not _type_ok(ann, sc[k]):
                raise DlxError(f"{where}: steps[{n}].{k} must be {ann} (format 1); got {sc[k]!r}")
        i = sc.get("index")
        per = {}
        if isinstance(i, int) and not isinstance(i, bool):
            for name in ("cfg_mask", "scale"):
                key = f"steps.{i}.{name}"
                if key in tensors:
                    v = tensors.pop(key)
                    moved.append(key)
                    if v.ndim != 1 or (name == "cfg_mask" and v.dtype != torch.bool) \
                            or (name == "scale" and not v.dtype.is_floating_point):
                        raise DlxError(f"{where}: {key} must be a 1-D {'bool' if name == 'cfg_mask' else 'float'} "
                                       f"tensor (format 1); got {v.dtype} of shape {tuple(v.shape)}")
                    per[name] = v.tolist()
        if "cfg_mask" in per and "scale" in per and len(per["cfg_mask"]) != len(per["scale"]):
            raise DlxError(f"{where}: steps.{i}.cfg_mask and steps.{i}.scale differ in length "
                           f"({len(per['cfg_mask'])} vs {len(per['scale'])})")
        b = len(per["cfg_mask"]) if "cfg_mask" in per else len(per["scale"]) if "scale" in per else batch
        if "cfg_active" in sc:
            sc["cfg_active"] = [bool(m) for m in per["cfg_mask"]] if "cfg_mask" in per else [sc["cfg_active"]] * b
        if "guidance_scale" in sc:
            sc["guidance_scale"] = [float(v) for v in per["scale"]] if "scale" in per else [sc["guidance_scale"]] * b
        if "nfe" in sc:
            mean = sc["nfe"]
            if "cfg_mask" in per and per["cfg_mask"]:
                m = per["cfg_mask"]
                sc["nfe"] = [_whole(mean - sum(m) / len(m) + mj) for mj in m]
            else:
                sc["nfe"] = [mean] * b
    manifest = header.get("tensors")
    if isinstance(manifest, list) and moved:
        gone = set(moved)
        header["tensors"] = [k for k in manifest if k not in gone]


def _v1_batch(header: dict, tensors: dict) -> int:
    """The batch of a format-1 file whose steps lack ``cfg_mask``: ``meta["batch"]``, else the
    first dimension of a step tensor, else 1."""
    meta = header.get("meta")
    b = meta.get("batch") if isinstance(meta, dict) else None
    if isinstance(b, int) and not isinstance(b, bool) and b > 0:
        return b
    for k, v in tensors.items():
        if k.startswith("steps.") and not k.endswith((".cfg_mask", ".scale")) and v.ndim > 0:
            return int(v.shape[0])
    return 1


def _whole(x: float) -> float:
    """A per-sample evaluation count recovered from format 1's mean: the counts are whole numbers,
    so the rounding error of the mean (2.0000000000000004) is removed."""
    if not math.isfinite(x):
        return x
    r = round(x)
    return float(r) if abs(x - r) < 1e-9 else x


def _step_scalar_spec(step_type) -> dict[str, tuple[str, bool]]:
    """The step's scalar fields: name -> (annotation, has a default), read off the dataclass."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(step_type):
        if f.name in step_type.TENSOR_FIELDS:
            continue
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        out[f.name] = (str(f.type) if not isinstance(f.type, type) else f.type.__name__, has_default)
    return out


def _split_top(s: str, sep: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == sep and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


def _type_ok(ann: str, v) -> bool:
    """Whether JSON value ``v`` fits annotation ``ann`` (``int``, ``float``, ``bool``, ``str``,
    ``X | None``, ``list[X]``, ``dict``); an annotation it does not know accepts anything."""
    ann = ann.replace(" ", "")
    alts = _split_top(ann, "|")
    if len(alts) > 1:
        return any(_type_ok(a, v) for a in alts)
    a = alts[0]
    if a in ("None", "NoneType"):
        return v is None
    if a == "bool":
        return isinstance(v, bool)
    if a == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if a == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if a == "str":
        return isinstance(v, str)
    if a.startswith(("list[", "tuple[")) and a.endswith("]"):
        inner = a[a.index("[") + 1:-1]
        items = _split_top(inner, ",")
        return isinstance(v, list) and all(_type_ok(items[0], x) for x in v)
    if a in ("list", "tuple"):
        return isinstance(v, list)
    if a == "dict" or a.startswith("dict["):
        return isinstance(v, dict)
    return True


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, numbers.Integral):  # numpy and other non-builtin numbers
        return int(o)
    if isinstance(o, numbers.Real):
        return float(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)
