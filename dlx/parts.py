"""Every part dlx ships, by name, and ``part_from_config``: rebuild a part from ``part.config()``.

The top of the parts floor: it imports each part module, so a configuration written by any of
them (a trace's ``meta["parts"]``, a sweep's stored spec) rebuilds here.
"""

from __future__ import annotations

import inspect

from . import guidance, guiders, interrupt, preview, recorder, share  # noqa: F401  (each registers its parts)
from .config import from_json
from .errors import DlxError
from .protocol import REGISTRY, Part

__all__ = ["part_from_config", "known"]


def known() -> list[str]:
    """The part types a configuration may name."""
    return sorted(REGISTRY)


def part_from_config(cfg: dict, pipe=None) -> Part:
    """Rebuild a part from ``part.config()`` (``pipe`` for parts built on a pipeline: ``Recorder``).
    An entry of ``trace.meta["parts"]`` works as it is (its ``"report"`` is ignored); so does the
    flat form ``{"type": "CFGCutoff", "ratio": 0.2}`` of sweep stores written before dlx 0.2."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("type"), str) or not isinstance(cfg.get("args", {}), dict):
        raise DlxError(f"argument `cfg` must be a part configuration {{'type': ..., 'args': {{...}}}}; got {cfg!r}")
    cls = REGISTRY.get(cfg["type"])
    if cls is None:
        raise DlxError(f"argument `cfg` names an unknown part type {cfg['type']!r}; known: {known()}")
    if cfg.get("rebuildable", True) is False:
        raise DlxError(f"{cfg['type']} configuration {cfg.get('args')!r} cannot be rebuilt (it holds a callable or an object)")
    args = {k: from_json(v) for k, v in args_of(cfg).items()}
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in args if k not in params]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise DlxError(f"argument `cfg`: {cfg['type']} has no argument(s) {unknown}; it takes "
                       f"{[k for k in params if k not in ('self', 'pipe')]}")
    if "pipe" in params:
        if pipe is None:
            raise DlxError(f"argument `pipe` is needed to rebuild a {cfg['type']}")
        return cls(pipe, **args)
    return cls(**args)


def args_of(cfg: dict) -> dict:
    """The arguments of a configuration, ``{"type", "args"}`` or the older flat form."""
    if "args" in cfg:
        return dict(cfg["args"])
    return {k: v for k, v in cfg.items() if k not in ("type", "rebuildable", "report")}
