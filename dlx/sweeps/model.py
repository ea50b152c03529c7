"""The model a sweep runs: loading it by name, what the store records of it (identity, weights
fingerprint), and the check of the pipeline arguments against its ``__call__``."""

from __future__ import annotations

import difflib
import inspect
import json
import os
from pathlib import Path

import torch

from .. import _args
from ..errors import DlxError
from ..families import CALL_DEFAULTS
from ..fingerprint import weights_fingerprint
from .store import Store

__all__ = ["load_pipeline", "model_identity", "weights_fingerprint", "check_weights", "check_call"]


def _check_device(device):
    if device is None:
        return None
    return _args.available_device("device", device)


def _check_model(model: str, arg: str = "model") -> dict:
    if not isinstance(model, str) or not model.strip():
        raise DlxError(f"argument `{arg}` must be 'shapes', a pipeline folder or a hub id; got {model!r}")
    if model == "shapes":
        return {"name": "shapes"}
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise DlxError(f"argument `{arg}`: {model!r} is a folder without model_index.json (not a saved pipeline)")
        return {"folder": str(p.resolve())}
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return {"hub": model}
    raise DlxError(f"argument `{arg}`: {model!r} is neither 'shapes', a pipeline folder nor a hub id (org/name)")


def _check_dtype(dtype):
    """None, a floating torch dtype or its name ('float16', 'bfloat16', ...)."""
    return _args.float_dtype("dtype", dtype, allow_none=True)


def load_pipeline(model: str, device=None, dtype=None):
    """The pipeline a spec names: 'shapes' (dlx.zoo), a folder saved by ``save_pretrained`` (offline),
    or a hub id (only when the hub is reachable; otherwise the local cache)."""
    import os

    ident = _check_model(model)
    dev = _check_device(device) or torch.device("cpu")
    dtype = _check_dtype(dtype)
    if "name" in ident:
        from .. import zoo

        return zoo.load("shapes", device=dev, dtype=dtype or torch.float32)
    from diffusers import DiffusionPipeline

    from .._quiet import no_load_bars

    offline = "folder" in ident or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        with no_load_bars():
            pipe = DiffusionPipeline.from_pretrained(ident.get("folder") or ident["hub"], dtype=dtype or torch.float32,
                                                     local_files_only=offline)
    except (OSError, ValueError, EnvironmentError) as e:
        raise DlxError(f"argument `model`: could not load {model!r} ({'offline' if offline else 'hub'}): {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def model_identity(pipe) -> dict:
    """What the store records about a pipeline object (compared on resume)."""
    from ..families import family_of

    fam = family_of(pipe)
    den = getattr(pipe, fam.denoiser)
    name = str(getattr(getattr(pipe, "config", {}), "_name_or_path", "") or getattr(pipe, "name_or_path", "") or "")
    try:
        dtype = str(next(den.parameters()).dtype)
    except StopIteration:  # pragma: no cover
        dtype = "?"
    from .. import zoo

    if name and Path(name).resolve() == zoo.path("shapes").resolve():
        name = "shapes"
    sched = getattr(pipe, "scheduler", None)
    conf = _public_config(getattr(sched, "config", {}))
    if name == "shapes" and type(pipe).__name__ == "StableDiffusionPipeline" and _is_shipped_scheduler(sched, conf):
        # dlx.zoo.load("shapes") as shipped: the same sweep as dlx.sweep("shapes", ...) at this dtype
        # (the weights' fingerprint still tells a changed model apart)
        return {"name": "shapes", "dtype": dtype}
    return {"pipeline": type(pipe).__name__, "name_or_path": name, "dtype": dtype,
            "scheduler": type(sched).__name__,
            # its config too: the same class with another timestep_spacing or beta schedule
            # makes other images
            "scheduler_config": conf}


def _public_config(config) -> dict:
    """A diffusers config without its private ``_`` keys, as JSON stores it (tuples as lists)."""
    conf = {k: v for k, v in dict(config or {}).items() if not k.startswith("_")}
    return json.loads(json.dumps(conf, sort_keys=True, default=str))


def _is_shipped_scheduler(sched, conf: dict) -> bool:
    """Whether ``sched`` is the embedded model's scheduler as shipped (class and config)."""
    from .. import zoo

    try:
        shipped = json.loads((zoo.path("shapes") / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):  # pragma: no cover - the package's own file
        return False
    if type(sched).__name__ != shipped.get("_class_name"):
        return False
    return _public_config(type(sched).from_config(shipped).config) == conf


def check_weights(out: Path, fp: str | None) -> None:
    """Record the weights' fingerprint in ``out``, or refuse weights that differ from the stored."""
    if fp is None:
        return
    s = Store(out)
    try:
        old = s.meta("weights")
        if old is None:
            s.set_meta("weights", fp)
        elif old != fp:
            raise DlxError(f"argument `pipe`: its weights differ from those that made the rows in {str(out)!r} "
                           f"(fingerprint stored {old}, given {fp}: another checkpoint, fine-tuned or "
                           f"LoRA-fused weights, or an added adapter); use another `out` folder")
    finally:
        s.close()


def _pipeline_class(pipe, ident: dict):
    """The pipeline's class, without loading weights where the model is given by name (its
    model_index.json); None where that cannot be read (the call is then checked once loaded)."""
    if not isinstance(pipe, str):
        return type(pipe)
    if "name" in ident:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline  # dlx.zoo.load
    import diffusers

    try:
        if "folder" in ident:
            name = json.loads((Path(ident["folder"]) / "model_index.json").read_text())["_class_name"]
        else:  # a hub id: its model_index.json (the local cache when offline), no weights
            name = diffusers.DiffusionPipeline.load_config(
                ident["hub"], local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")["_class_name"]
    except Exception:  # noqa: BLE001 - unknown here; the load says why, and the call is checked then
        return None
    return getattr(diffusers, name, None)




def check_call(cls, call: dict, *, guidance_scales=None, steps=None) -> dict:
    """``call`` checked against ``cls.__call__``'s parameters (a misspelt argument would be
    swallowed by diffusers' ``**kwargs`` and the call would run with the default), with the
    pipeline's own defaults of ``guidance_scale`` and ``num_inference_steps`` filled in where
    they differ from ``families.CALL_DEFAULTS`` and none was given (SDXL's 5.0, SD3's 7.0 and 28)."""
    if cls is None:
        return call
    try:
        params = inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):  # pragma: no cover - not introspectable
        return call
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
    if "num_inference_steps" not in named:  # not a diffusers signature (a wrapper passing **kwargs on)
        return call
    for k in call:
        if k not in named:
            near = difflib.get_close_matches(k, sorted(named), n=1)
            raise DlxError(f"pipeline argument `{k}` is not a parameter of {cls.__name__}.__call__"
                           + (f"; did you mean `{near[0]}`?" if near else ""))
    out = dict(call)
    given = {"guidance_scale": guidance_scales is not None, "num_inference_steps": steps is not None}
    for k, fallback in CALL_DEFAULTS.items():
        d = params[k].default if k in params else None
        if k not in out and not given[k] and isinstance(d, (int, float)) and not isinstance(d, bool) and d != fallback:
            out[k] = d
    return out


def _is_shapes(ident: dict) -> bool:
    return ident.get("name") == "shapes" or ident.get("name_or_path") == "shapes"
