"""Part configurations: a part's constructor arguments as JSON, the one serialisation of a part.

``part.config()`` gives ``{"type": "CFGCutoff", "args": {"ratio": 0.2, "compat": "dlx"}}``: enough to
rebuild it with ``dlx.part_from_config``. Traces, sweep specs and stores, labels in widgets and
reports all use this one form. An argument that cannot be written as JSON (a callable schedule, an
event object) is recorded by description (a callable by its qualified name) and the configuration
is marked ``"rebuildable": False``.
"""

from __future__ import annotations

import inspect
import math
import numbers

__all__ = ["default_config", "defaults", "to_json", "from_json"]


def to_json(v):
    """``(value as JSON, rebuildable)``: whether the JSON value rebuilds the argument."""
    if v is None or isinstance(v, (bool, str)):
        return v, True
    if isinstance(v, numbers.Integral):
        return int(v), True
    if isinstance(v, numbers.Real):
        f = float(v)
        return (f if math.isfinite(f) else str(f)), math.isfinite(f)
    if isinstance(v, (list, tuple)):
        items = [to_json(x) for x in v]
        return [x for x, _ in items], all(ok for _, ok in items)
    if type(v).__module__ == "torch" and type(v).__name__ == "dtype":
        return {"dtype": str(v).removeprefix("torch.")}, True
    if callable(v):
        name = f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', type(v).__name__)}"
        return {"callable": name}, False
    return {"repr": repr(v)}, False


def defaults(cls) -> dict:
    """A class's constructor defaults, as JSON (what ``default_config`` leaves out, and what a
    label leaves out of a configuration written before it did)."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return {}
    out = {}
    for name, p in params.items():
        if p.default is not p.empty:
            j, ok = to_json(p.default)
            if ok:
                out[name] = j
    return out


def default_config(part) -> dict:
    """A part's configuration from ``_config_args()`` or, failing that, from the constructor's
    parameters read back from attributes of the same name. Arguments at their constructor
    default are left out: one configuration per behaviour (a sweep compares them on resume), and
    the label ``CFGCutoff(ratio=0.2)`` reads it as it stands."""
    getter = getattr(part, "_config_args", None)
    if getter is not None:
        args = getter()
    else:
        args = {}
        try:
            params = inspect.signature(type(part).__init__).parameters
        except (TypeError, ValueError):
            params = {}
        for name, p in params.items():
            if name in ("self", "pipe") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if hasattr(part, name):
                args[name] = getattr(part, name)
    dflt = defaults(type(part))
    out, ok = {}, True
    for k, v in args.items():
        j, good = to_json(v)
        ok = ok and good
        if not (k in dflt and good and dflt[k] == j):  # an argument at its default is left out
            out[k] = j
    cfg = {"type": type(part).__name__, "args": out}
    if not ok:
        cfg["rebuildable"] = False
    return cfg


def from_json(v):
    """A JSON argument back to its value (``{"dtype": "float16"}`` → ``torch.float16``)."""
    if isinstance(v, dict) and set(v) == {"dtype"}:
        import torch

        return getattr(torch, v["dtype"])
    if isinstance(v, list):
        return [from_json(x) for x in v]
    return v
