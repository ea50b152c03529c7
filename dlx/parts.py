"""``dlx.Share`` (prefix sharing) and part configurations (``part.config()``, ``part_from_config``).

A part's configuration is ``{"type": "CFGCutoff", "args": {...}}``: its constructor arguments as
JSON, enough to rebuild it with ``dlx.part_from_config``. An argument that cannot be written as
JSON (a callable schedule, an event object) is recorded by description (a callable by its
qualified name) and the configuration is marked ``"rebuildable": False``.
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch

from . import _diffusers as D
from .errors import DlxError
from .session import Part, Run

__all__ = ["Share", "part_from_config", "default_config"]


class Share(Part):
    """Prefix sharing: evaluate samples that are provably identical once.

    ``keys`` holds one hashable per sample; equal keys promise identical inputs (same prompt,
    negative prompt and initial noise). On every step the tap evaluates each group of samples
    whose keys are equal *and* whose guidance plans (mask, scale) have been identical at every
    step so far only once: the representative's rows go to the denoiser and every member gets
    the result. Identical rows then stay identical through the scheduler's step. For 6 cutoff
    ratios {0, .2, …, 1} over 25 steps of one prompt and seed that is 125 sample-evaluations
    instead of 225 (``trace.meta["evaluations"]``; per-sample ``nfe`` stays nominal).

    Checked: the promise, on the first step (the members' denoiser inputs and conditioning must
    equal their representative's: one device sync); a scheduler that draws fresh noise per step
    (ancestral, SDE, DDPM, ``eta > 0``) is refused, as identical rows would not stay identical.
    Batch-CFG families only (not Flux's two calls per step). Results equal the unshared batched
    run within the tolerance of evaluating the denoiser at another batch size.
    """

    is_share = True

    def __init__(self, keys):
        if isinstance(keys, (str, bytes)) or not isinstance(keys, (list, tuple)) or not keys:
            raise DlxError(f"argument `keys` must be a non-empty list with one hashable key per sample; got {keys!r}")
        for i, k in enumerate(keys):
            try:
                hash(k)
            except TypeError:
                raise DlxError(f"argument `keys[{i}]` must be hashable; got {k!r}") from None
        self.keys = list(keys)
        self.report: dict = {}

    def __repr__(self):
        return f"Share(keys={self.keys!r})"

    def _config_args(self) -> dict:
        return {"keys": self.keys}

    def on_run_start(self, run: Run):
        self.report = {}
        if D.is_stochastic(run.pipe.scheduler, run.call):
            raise DlxError(
                f"dlx.Share needs a deterministic scheduler: {type(run.pipe.scheduler).__name__} "
                f"(eta={run.call.get('eta')!r}) draws fresh noise per step, so equal samples would not stay equal"
            )

    def initial_groups(self, run: Run) -> list:
        if len(self.keys) != run.batch:
            raise DlxError(
                f"argument `keys` has {len(self.keys)} values (one per sample) but the run has {run.batch} samples"
            )
        ids: dict = {}
        return [ids.setdefault(k, len(ids)) for k in self.keys]

    def on_loop_start(self, run: Run):
        self._checked = False

    def check_rows(self, run: Run, tensors, n: int) -> None:
        """The first step's promise: every tensor with the (doubled) batch's rows has equal rows
        within each group of equal keys."""
        b = run.batch
        first: dict = {}
        pairs = []
        for j, k in enumerate(self.keys):
            r = first.setdefault(k, j)
            if r != j:
                pairs.append((r, j))
        if not pairs:
            return
        halves = n // b
        rows_r = [h * b + r for h in range(halves) for r, _ in pairs]
        rows_j = [h * b + j for h in range(halves) for _, j in pairs]
        for t in tensors:
            idx_r = torch.tensor(rows_r, device=t.device)
            idx_j = torch.tensor(rows_j, device=t.device)
            if torch.equal(t.index_select(0, idx_r), t.index_select(0, idx_j)):
                continue  # one comparison (one device sync) per tensor
            for r, j in pairs:
                for h in range(halves):
                    if not torch.equal(t[h * b + r], t[h * b + j]):
                        raise DlxError(
                            f"dlx.Share: samples {r} and {j} have the same key {self.keys[j]!r} but different "
                            f"inputs (initial noise, prompt or negative prompt); equal keys must mean equal inputs"
                        )

    def on_run_end(self, run: Run, error):
        self.report["evaluations"] = run.evaluations
        if run.nfe is not None:
            self.report["nominal_evaluations"] = sum(run.nfe)


# --- configurations ------------------------------------------------------------------------------


def _jsonable(v):
    """(value as JSON, rebuildable)."""
    if v is None or isinstance(v, (bool, str)):
        return v, True
    if isinstance(v, numbers.Integral):
        return int(v), True
    if isinstance(v, numbers.Real):
        f = float(v)
        return (f if math.isfinite(f) else str(f)), math.isfinite(f)
    if isinstance(v, (list, tuple)):
        items = [_jsonable(x) for x in v]
        return [x for x, _ in items], all(ok for _, ok in items)
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}, True
    if callable(v):
        name = f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', type(v).__name__)}"
        return {"callable": name}, False
    return {"repr": repr(v)}, False


def default_config(part: Part) -> dict:
    """A part's configuration from ``_config_args()`` or, failing that, from the constructor's
    parameters read back from attributes of the same name."""
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
    out, ok = {}, True
    for k, v in args.items():
        out[k], good = _jsonable(v)
        ok = ok and good
    cfg = {"type": type(part).__name__, "args": out}
    if not ok:
        cfg["rebuildable"] = False
    return cfg


def _registry() -> dict:
    from . import guidance, guiders, interrupt, recorder

    reg = {c.__name__: c for c in (guidance.CFGCutoff, guidance.GuidanceInterval, guidance.GuidanceSchedule,
                                    guidance.AdaptiveCutoff, guidance.IPAdapterCutoff, interrupt.Interrupt,
                                    recorder.Recorder, Share, guiders.Guider)}
    try:
        from . import preview

        reg["Preview"] = preview.Preview
    except ImportError:  # pragma: no cover
        pass
    return reg


def _from_json(v):
    if isinstance(v, dict) and set(v) == {"dtype"}:
        return getattr(torch, v["dtype"])
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def part_from_config(cfg: dict, pipe=None) -> Part:
    """Rebuild a part from ``part.config()`` (``pipe`` for parts built on a pipeline: ``Recorder``).
    An entry of ``trace.meta["parts"]`` works as it is (its ``"report"`` is ignored)."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("type"), str) or not isinstance(cfg.get("args", {}), dict):
        raise DlxError(f"argument `cfg` must be a part configuration {{'type': ..., 'args': {{...}}}}; got {cfg!r}")
    reg = _registry()
    cls = reg.get(cfg["type"])
    if cls is None:
        raise DlxError(f"argument `cfg` names an unknown part type {cfg['type']!r}; known: {sorted(reg)}")
    if cfg.get("rebuildable", True) is False:
        raise DlxError(f"{cfg['type']} configuration {cfg.get('args')!r} cannot be rebuilt (it holds a callable or an object)")
    # ``{"type", "args"}``; also the flat form ``{"type": ..., "ratio": ...}`` (a sweep's rows)
    given = cfg["args"] if "args" in cfg else {k: v for k, v in cfg.items() if k not in ("type", "rebuildable", "report")}
    args = {k: _from_json(v) for k, v in given.items()}
    params = inspect.signature(cls.__init__).parameters
    if "pipe" in params:
        if pipe is None:
            raise DlxError(f"argument `pipe` is needed to rebuild a {cfg['type']}")
        return cls(pipe, **args)
    return cls(**args)
