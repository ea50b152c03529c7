"""What a sweep computes: named configs × prompts × seeds, as data that can be stored and compared.

A ``Config`` is a name, the guidance controls one row runs with (each as ``part.config()``, the
one serialisation of a part: ``{"type": "CFGCutoff", "args": {"ratio": 0.4}}``), and the call's
guidance scale and step count. A ``SweepSpec`` is
the grid plus the pipeline keyword arguments every row shares and the metrics asked for. Both are
plain dataclasses with a canonical JSON form: the store keeps it, a resumed sweep compares it
key by key, and every result row carries its config (nothing needs re-running to regroup).

Everything here is checked before any model work: an empty grid, a ratio out of range, an
unknown control or a pipeline argument the sweep sets itself is a ``DlxError`` naming the
argument and its value.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import asdict, dataclass, field

from ..errors import DlxError
from ..families import CALL_DEFAULTS
from ..guidance import CFGCutoff
from ..parts import part_from_config
from ..protocol import Part
from ..run import overrides
from ..share import Share

__all__ = ["Config", "SweepSpec", "build_spec", "control_config", "control_from_config", "row_key"]

#: pipeline arguments the sweep sets per row or per call: not accepted as pass-through kwargs
RESERVED = ("prompt", "generator", "latents", "output_type", "callback_on_step_end",
            "callback_on_step_end_tensor_inputs", "num_images_per_prompt", "return_dict", "prompt_embeds",
            "negative_prompt_embeds")
_JSON_SCALARS = (str, int, float, bool, type(None))


def control_config(part) -> dict:
    """A control's configuration for a sweep spec: ``part.config()``, the one serialisation of a
    part (``{"type": "CFGCutoff", "args": {"ratio": 0.4}}``), refused where it cannot be rebuilt
    (a callable schedule) or where the part is not a control."""
    if not isinstance(part, Part) or not overrides(part, "guidance") or isinstance(part, Share):
        raise DlxError(f"sweep configs take guidance controls (CFGCutoff, GuidanceInterval, GuidanceSchedule, "
                       f"AdaptiveCutoff, ...); got {part!r}")
    cfg = part.config()
    if cfg.get("rebuildable", True) is False:
        raise DlxError(f"a sweep stores its configs as data; {type(part).__name__}{cfg['args']} cannot be stored "
                       f"(it holds a callable or an object): use a named schedule ('linear', 'cosine', 'constant')")
    return _canon(cfg)


def control_from_config(cfg: dict):
    """Rebuild a control from its configuration (``part_from_config``; the flat form of stores
    written before it, ``{"type": "CFGCutoff", "ratio": 0.4}``, is read too)."""
    return part_from_config(cfg)


def upgrade(cfg: dict) -> dict:
    """A stored control configuration in today's form: the flat form becomes ``{"type", "args"}``
    with arguments at their defaults left out, so a resume compares like with like."""
    if isinstance(cfg, dict) and "args" not in cfg and isinstance(cfg.get("type"), str):
        try:
            return control_config(part_from_config(cfg))
        except DlxError:
            return cfg  # compared as it is; the resume says what differs
    return cfg


def _canon(obj):
    """JSON round trip: tuples become lists, floats stay floats."""
    return json.loads(json.dumps(obj, sort_keys=True))


def is_full_guidance(controls: list[dict]) -> bool:
    """Whether a config guides every step at the call's scale (the fidelity reference)."""
    for c in controls:
        t, a = c.get("type"), c.get("args", {})
        if t == "CFGCutoff" and a.get("ratio") == 1 and a.get("compat", "dlx") == "dlx":
            continue
        if t == "GuidanceInterval" and a.get("start", 0) == 0 and a.get("stop", 1) == 1:
            continue
        return False
    return True


@dataclass
class Config:
    """One column of the grid: a name, its controls (JSON), scale and step count (None: the call's)."""

    name: str
    controls: list = field(default_factory=list)
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    cutoff: float | None = None  # the CFGCutoff ratio, for plots against the cutoff

    def parts(self) -> list:
        """Fresh control instances for one run of this config."""
        return [control_from_config(c) for c in self.controls]

    def to_json(self) -> dict:
        return _canon(asdict(self))


@dataclass
class SweepSpec:
    """The grid: configs × prompts × seeds, the shared call arguments and the metrics."""

    configs: list
    prompts: list
    seeds: list
    call: dict
    metrics: list
    model: dict = field(default_factory=dict)
    pairs: list | None = None  # explicit (prompt, seed) pairs instead of prompts x seeds

    def to_json(self) -> dict:
        d = {"configs": [c.to_json() for c in self.configs], "prompts": self.prompts,
             "seeds": self.seeds, "call": self.call, "metrics": self.metrics, "model": self.model}
        if self.pairs is not None:
            d["pairs"] = [list(p) for p in self.pairs]
        return _canon(d)

    @classmethod
    def from_json(cls, d: dict) -> "SweepSpec":
        configs = [Config(**{**c, "controls": [upgrade(x) for x in c.get("controls", [])]}) for c in d["configs"]]
        return cls(configs=configs, prompts=d["prompts"], seeds=d["seeds"],
                   call=d["call"], metrics=d["metrics"], model=d.get("model", {}),
                   pairs=[tuple(p) for p in d["pairs"]] if d.get("pairs") is not None else None)

    def pair_list(self) -> list[tuple[str, int]]:
        """The (prompt, seed) pairs every config runs on."""
        if self.pairs is not None:
            return [(p, int(s)) for p, s in self.pairs]
        return [(p, int(s)) for p in self.prompts for s in self.seeds]

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def steps_of(self, cfg: Config) -> int:
        return int(cfg.num_inference_steps if cfg.num_inference_steps is not None else self.call.get("num_inference_steps", CALL_DEFAULTS["num_inference_steps"]))

    def scale_of(self, cfg: Config) -> float:
        return float(cfg.guidance_scale if cfg.guidance_scale is not None else self.call.get("guidance_scale", CALL_DEFAULTS["guidance_scale"]))

    def rows(self) -> list[dict]:
        """Every (config, prompt, seed) row, in grid order, with a stable id."""
        out = []
        index = {p: i for i, p in enumerate(self.prompts)}
        for cfg in self.configs:
            for p, s in self.pair_list():
                out.append({"row_id": row_key(cfg.name, p, s), "config": cfg.name, "prompt": p,
                            "prompt_index": index[p], "seed": int(s)})
        return out

    def guided_scale_of(self, cfg: Config) -> float:
        """The scale the config's samples are guided at: its guidance rule's own (a ``Guider``
        guides at its guider's ``guidance_scale``), else the call's (``scale_of``). What a row's
        ``guidance_scale`` shows, as the run's record has it."""
        cache = self.__dict__.setdefault("_guided_scales", {})
        if cfg.name not in cache:
            own = next((p.own_scale() for p in cfg.parts() if p.sets_rule and hasattr(p, "own_scale")), None)
            cache[cfg.name] = own if own is not None else self.scale_of(cfg)
        return cache[cfg.name]

    def reference_of(self, cfg: Config) -> Config:
        """The full-guidance config with the same scale and steps (PSNR/SSIM/LPIPS compare to it)."""
        key = (self.scale_of(cfg), self.steps_of(cfg))
        for c in self.configs:
            if is_full_guidance(c.controls) and (self.scale_of(c), self.steps_of(c)) == key:
                return c
        raise DlxError(f"no full-guidance config for scale {key[0]} and {key[1]} steps")  # build_spec adds one

    def diff(self, other: "SweepSpec") -> list[str]:
        """What differs between two specs, one line per top-level key, at the first place the
        stored and the given value part (an index or key path), so long values stay readable."""
        a, b = self.to_json(), other.to_json()
        out = []
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                where, old, new = _first_difference(b.get(k), a.get(k))
                out.append(f"{k}{where}: stored {_short(old)}, given {_short(new)}")
        return out


def _first_difference(old, new, where: str = ""):
    """(path, old part, new part) at the first place two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                if k in old and k in new:
                    return _first_difference(old[k], new[k], f"{where}.{k}")
                return f"{where}.{k}", old.get(k, "(absent)"), new.get(k, "(absent)")
    if (isinstance(old, list) and isinstance(new, list) and old and new
            and all(isinstance(x, dict) and "name" in x for x in old + new)):
        # named items (configs): matched by name, so an added or removed one is shown as such
        a, b = {x["name"]: x for x in old}, {x["name"]: x for x in new}
        for n in [*b, *a]:
            if a.get(n) != b.get(n):
                if n in a and n in b:
                    return _first_difference(a[n], b[n], f"{where}[{n!r}]")
                return f"{where}[{n!r}]", a.get(n, "(absent)"), b.get(n, "(absent)")
    if isinstance(old, list) and isinstance(new, list):
        for i, (x, y) in enumerate(zip(old, new)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
        if len(old) != len(new) and max(len(_short(old, 10 ** 9)), len(_short(new, 10 ** 9))) > 160:
            # one is the other plus items at its end, too long to show whole: show the first of them
            i = min(len(old), len(new))
            return f"{where}[{i}]", old[i] if i < len(old) else "(absent)", new[i] if i < len(new) else "(absent)"
    return where, old, new


def _short(v, n: int = 160) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= n else s[: n - 3] + "..."


def row_key(config: str, prompt: str, seed: int) -> str:
    """Stable id of a row (also its image's file name)."""
    return hashlib.sha1(f"{config}\x1f{prompt}\x1f{int(seed)}".encode()).hexdigest()[:12]


def _number_list(name: str, values, *, lo=None, hi=None, integer=False) -> list:
    if values is None:
        return []
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        values = [values]
    out = []
    for v in values:
        ok = not isinstance(v, bool) and isinstance(v, numbers.Integral if integer else numbers.Real)
        if ok and not integer:
            ok = math.isfinite(float(v))
        if ok and lo is not None:
            ok = v >= lo
        if ok and hi is not None:
            ok = v <= hi
        if not ok:
            rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
            raise DlxError(f"argument `{name}` must hold {'ints' if integer else 'finite numbers'}{rng}; got {v!r}")
        out.append(int(v) if integer else float(v))
    return out


def _fmt(v: float) -> str:
    return f"{v:g}"


def _as_controls(name: str, value) -> list[dict]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [control_config(control_from_config(value))]  # validates by building it
    if isinstance(value, Part):
        return [control_config(value)]
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            out += _as_controls(name, v)
        return out
    raise DlxError(f"argument `configs`: config {name!r} must be a dlx control, a list of them, a control "
                   f"config dict or None (full guidance); got {value!r}")


def _pairs(pairs) -> list[tuple[str, int]]:
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, (list, tuple)) or not pairs:
        raise DlxError(f"argument `pairs` must be a non-empty list of (prompt, seed); got {pairs!r}")
    out = []
    for x in pairs:
        if not (isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], str) and x[0].strip()
                and not isinstance(x[1], bool) and isinstance(x[1], numbers.Integral) and x[1] >= 0):
            raise DlxError(f"argument `pairs` must hold (prompt, seed) with a non-empty prompt and a seed >= 0; got {x!r}")
        out.append((x[0], int(x[1])))
    if len(set(out)) != len(out):
        raise DlxError(f"argument `pairs` holds duplicates: {sorted({p for p in out if out.count(p) > 1})}")
    return out


def build_spec(*, prompts=None, seeds=None, pairs=None, cutoffs=None, configs=None, guidance_scales=None,
               steps=None, metrics=(), call=None, model=None) -> SweepSpec:
    """Check the arguments of ``dlx.sweep`` and build its grid (no model work)."""
    pair_list = None
    if pairs is not None:
        if prompts is not None or seeds is not None:
            raise DlxError("give either `pairs` or `prompts` and `seeds`, not both")
        pair_list = _pairs(pairs)
        prompts = list(dict.fromkeys(p for p, _ in pair_list))
        seeds = list(dict.fromkeys(s for _, s in pair_list))
    elif seeds is None:
        seeds = range(8)
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts) if prompts is not None else []
    if not prompts:
        raise DlxError(f"argument `prompts` must hold at least one prompt; got {prompts!r}")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise DlxError(f"argument `prompts` must hold non-empty strings; got {p!r}")
    if len(set(prompts)) != len(prompts):
        raise DlxError(f"argument `prompts` holds duplicates: {sorted({p for p in prompts if prompts.count(p) > 1})}")
    seeds = _number_list("seeds", list(seeds) if seeds is not None else [], lo=0, integer=True)
    big = [x for x in seeds if x >= 2 ** 63]
    if big:  # torch.Generator and SQLite both take signed 64-bit seeds
        raise DlxError(f"argument `seeds` must hold seeds below 2**63; got {big[0]!r}")
    if not seeds:
        raise DlxError(f"argument `seeds` must hold at least one seed; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise DlxError(f"argument `seeds` holds duplicates: {seeds}")
    call = dict(call or {})
    for k, v in call.items():
        if k in RESERVED:
            raise DlxError(f"pipeline argument `{k}` is set by the sweep per row; give prompts= and seeds= instead")
        if "prompt" in k and isinstance(v, (list, tuple)):
            # the sweep batches rows of many configs into one call: a list would be paired with
            # rows by batch position, not with the prompts
            raise DlxError(f"pipeline argument `{k}` must be one string shared by every row; got a list of {len(v)}")
        if not (isinstance(v, _JSON_SCALARS) or (isinstance(v, list) and all(isinstance(x, _JSON_SCALARS) for x in v))):
            raise DlxError(f"pipeline argument `{k}` must be a plain value (str, number, bool, None or a list of them) "
                           f"so the sweep can store it; got {type(v).__name__}")
    if "num_inference_steps" in call:
        _number_list("num_inference_steps", [call["num_inference_steps"]], lo=1, integer=True)
    if "guidance_scale" in call:
        _number_list("guidance_scale", [call["guidance_scale"]], lo=0)
    scales = _number_list("guidance_scales", guidance_scales, lo=0)
    step_list = _number_list("steps", steps, lo=1, integer=True)
    if guidance_scales is not None and not scales:
        raise DlxError(f"argument `guidance_scales` is empty; got {guidance_scales!r}")
    if steps is not None and not step_list:
        raise DlxError(f"argument `steps` is empty; got {steps!r}")

    base: list[Config] = []
    if cutoffs is not None and configs is not None:
        raise DlxError("give either `cutoffs` or `configs`, not both (put CFGCutoff controls into `configs`)")
    if cutoffs is not None:
        rs = _number_list("cutoffs", cutoffs, lo=0, hi=1)
        if not rs:
            raise DlxError(f"argument `cutoffs` must hold at least one ratio in [0, 1]; got {cutoffs!r}")
        # rounded to 12 decimals: np.linspace(0, 1, 6) and [0, .2, .4, .6, .8, 1] are one grid
        # (0.6000000000000001 is 0.6), so a resume with either is the same sweep
        rs = [round(float(r), 12) for r in rs]
        if len(set(rs)) != len(rs):
            raise DlxError(f"argument `cutoffs` holds duplicates: {rs}")
        if len({_fmt(r) for r in rs}) != len(rs):
            raise DlxError(f"argument `cutoffs`: {rs} holds ratios too close to tell apart in a config name "
                           f"({[_fmt(r) for r in rs]}); give ratios that differ in the first 6 digits")
        base = [Config(f"cutoff={_fmt(r)}", [control_config(CFGCutoff(ratio=r))], cutoff=r) for r in rs]
    elif configs is not None:
        if isinstance(configs, dict):
            items = list(configs.items())
        elif isinstance(configs, (list, tuple)):
            items = [(repr(c), c) for c in configs]
        else:
            raise DlxError(f"argument `configs` must be a dict name -> controls (or a list of controls); got {configs!r}")
        if not items:
            raise DlxError(f"argument `configs` is empty; got {configs!r}")
        for name, value in items:
            if not isinstance(name, str) or not name:
                raise DlxError(f"argument `configs`: names must be non-empty strings; got {name!r}")
            ctrls = _as_controls(name, value)
            cut = next((c["args"]["ratio"] for c in ctrls
                        if c["type"] == "CFGCutoff" and "ratio" in c["args"] and len(ctrls) == 1), None)
            base.append(Config(name, ctrls, cutoff=cut))
    else:
        raise DlxError("give `cutoffs=[...]` (CFG cutoff ratios) or `configs={name: controls}`: the grid is empty")

    grid: list[Config] = []
    for c in base:
        for s in (scales or [None]):
            for n in (step_list or [None]):
                name = c.name
                if len(scales) > 1:
                    name += f" scale={_fmt(s)}"
                if len(step_list) > 1:
                    name += f" steps={n}"
                grid.append(Config(name, c.controls, s, n, c.cutoff))
    names = [c.name for c in grid]
    if len(set(names)) != len(names):
        raise DlxError(f"argument `configs`: config names must be unique; got {names}")
    spec = SweepSpec(configs=grid, prompts=prompts, seeds=seeds, call=_canon(call), metrics=list(metrics),
                     model=dict(model or {}), pairs=pair_list)
    # The fidelity reference: a full-guidance config per (scale, steps); added when missing.
    seen = set()
    for c in list(grid):
        key = (spec.scale_of(c), spec.steps_of(c))
        if key in seen:
            continue
        seen.add(key)
        if not any(is_full_guidance(o.controls) and (spec.scale_of(o), spec.steps_of(o)) == key for o in grid):
            name = "full CFG" + (f" scale={_fmt(key[0])}" if len(scales) > 1 else "") + (
                f" steps={key[1]}" if len(step_list) > 1 else "")
            grid.append(Config(name, [], c.guidance_scale, c.num_inference_steps, 1.0 if cutoffs is not None else None))
    for c in grid:  # every control rebuilds (checks its arguments)
        built = c.parts()
        sc = next((p for p in built if p.sets_scale), None)
        ru = next((p for p in built if p.sets_rule), None)
        if sc is not None and ru is not None:
            raise DlxError(f"config {c.name!r}: {type(sc).__name__} sets the guidance scale and {type(ru).__name__} "
                           f"the guidance rule; a rule guides at its own scale, so the schedule would be ignored")
        if ru is not None and spec.scale_of(c) <= 1:
            raise DlxError(f"config {c.name!r}: {type(ru).__name__} needs the pipeline's unconditional batch, "
                           f"so guidance_scale > 1 (it guides at its own scale); got guidance_scale={spec.scale_of(c)!r}")
        if ru is not None and len(scales) > 1:
            raise DlxError(f"config {c.name!r}: {type(ru).__name__} guides at its own scale, so crossing it with "
                           f"guidance_scales={scales} would only relabel it; give one {type(ru).__name__} per scale "
                           f"in `configs` instead")
        steps_c = spec.steps_of(c)
        for ctl in c.controls:
            step = ctl["args"].get("step")
            if ctl["type"] == "CFGCutoff" and step is not None and max(step if isinstance(step, list) else [step]) >= steps_c:
                raise DlxError(f"config {c.name!r}: CFGCutoff step={step} must be less than its "
                               f"{steps_c} steps")
            if ctl["type"] == "GuidanceSchedule" and spec.scale_of(c) <= 1:
                # a standalone call refuses it too (the schedule needs CFG on): say so before any work
                raise DlxError(f"config {c.name!r}: GuidanceSchedule needs guidance_scale > 1 (the call runs "
                               f"without CFG otherwise); got guidance_scale={spec.scale_of(c)!r}")
    return spec
