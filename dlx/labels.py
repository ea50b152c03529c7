"""The words and sizes every view shows: config labels, step labels, tile captions, tile sizes.

One module, imported by the widgets, the live view and the report alike (none of them builds a
label of its own), so a config reads the same in a notebook and in a report. Numbers are read from
the trace (its per-step record and ``meta``) or a sweep's frame, never recounted here. Text only:
nothing here renders an image.
"""

from __future__ import annotations

import math
import numbers

from . import parts as _parts  # noqa: F401  (every shipped part registered)
from .config import defaults
from .protocol import REGISTRY

__all__ = ["KIND_LABEL", "tile_size", "columns", "fmt", "part_label", "config_label", "step_label",
           "short_step_label", "sample_prompt", "sample_label", "prompt_of", "prompt_of_call", "trace_caption", "sweep_caption",
           "steps_shown"]

KIND_LABEL = {"x0": "x0 (denoised estimate)", "latent": "x_t (noisy latent)"}
#: parts that observe or stop a run without changing its guidance: not part of a config's label
_OBSERVERS = {"Recorder", "Preview", "Interrupt", "Share"}


def tile_size(n: int) -> int:
    """Pixels per tile side for ``n`` tiles: large for one, smaller as the grid grows."""
    return 256 if n <= 1 else 192 if n <= 4 else 128 if n <= 16 else 96


def columns(n: int) -> int:
    """Grid columns for ``n`` tiles: one row up to 3, then a square-ish grid (2×2, 3×3, 4×4), at most 8."""
    return max(1, n) if n <= 3 else min(8, math.ceil(math.sqrt(n)))


def steps_shown(n: int, at_most: int = 8) -> list[int]:
    """Up to ``at_most`` step indices spread over ``n`` steps, the first and last included."""
    return sorted({round(i * (n - 1) / (at_most - 1)) for i in range(at_most)}) if n > at_most else list(range(n))


def fmt(v, spec=".3g"):
    """A number for a label: ``spec``-formatted, "–" for None or NaN, anything else as ``str``."""
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return format(v, spec) if isinstance(v, numbers.Real) and not isinstance(v, bool) else str(v)


# --- configs -------------------------------------------------------------------------------------


def _defaults(type_name: str) -> dict | None:
    """Constructor defaults of a part type, as JSON (None: a type this process does not know)."""
    cls = REGISTRY.get(type_name)
    return None if cls is None else defaults(cls)


def _arg(v) -> str:
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return format(v, "g")
    if isinstance(v, list):
        return "[" + ", ".join(_arg(x) for x in v) + "]"
    if isinstance(v, dict) and len(v) == 1:  # {"callable": "mod.fn"}, {"dtype": ...}, {"repr": ...}
        return str(next(iter(v.values())))
    return fmt(v, "g") if isinstance(v, numbers.Real) else str(v)


def part_label(cfg: dict) -> str:
    """``CFGCutoff(ratio=0.2)`` from a part's configuration (``part.config()`` or an entry of
    ``trace.meta["parts"]``): its type and every argument that differs from the constructor's
    default (``compat='dlx'`` is left out, ``compat='diffusers'`` is shown). A part class with
    ``label_from_args(args, fmt_arg)`` labels itself (``dlx.Guider``: the guider's class and its
    arguments that differ from diffusers' defaults)."""
    args = cfg.get("args")
    if not isinstance(args, dict):  # the flat form {"type": ..., "ratio": ...}
        args = {k: v for k, v in cfg.items() if k not in ("type", "rebuildable", "report")}
    own = getattr(REGISTRY.get(str(cfg.get("type"))), "label_from_args", None)
    if own is not None:  # a part whose arguments nest (a Guider's diffusers guider and its config)
        return own(args, _arg)
    defaults = _defaults(str(cfg.get("type"))) or {}
    shown = [f"{k}={_arg(v)}" for k, v in args.items() if not (k in defaults and defaults[k] == v)]
    return f"{cfg.get('type', '?')}({', '.join(shown)})"


def config_label(trace, sample: int | None = None) -> str:
    """What made this trace (or its sample ``sample``) differ: its guidance controls with their
    arguments, read from ``trace.meta["parts"]`` and, where the samples had their own
    (``attach(per_sample=, scales=)``), ``meta["per_sample_parts"]`` and ``meta["sample_scales"]``;
    ``"full CFG"`` when nothing else acted and the call used CFG."""
    meta = trace.meta
    parts = list(meta.get("parts") or [])
    per = meta.get("per_sample_parts")
    scales = meta.get("sample_scales")
    if per is not None and sample is None and len({repr(p) for p in per}) > 1:
        return f"{len(per)} samples, each its own controls"
    if per:
        parts += per[sample if sample is not None and sample < len(per) else 0]
    out = [part_label(p) for p in parts if isinstance(p, dict) and p.get("type") not in _OBSERVERS]
    scale = (meta.get("call") or {}).get("guidance_scale")
    if scales:
        if sample is None and len(set(scales)) > 1:
            out.append("per-sample scales " + "/".join(fmt(s, "g") for s in scales))
        else:
            scale = scales[sample if sample is not None and sample < len(scales) else 0]
            out.append(f"scale {fmt(scale, 'g')}")
    if out and not (len(out) == 1 and out[0].startswith("scale ")):
        return " + ".join(out)
    if isinstance(scale, numbers.Real) and scale <= 1:
        return "no CFG (scale ≤ 1)"
    return " + ".join(["full CFG", *out])


# --- steps and samples -----------------------------------------------------------------------------


def _cfg_words(k: int, b: int) -> str:
    return (f"CFG on {k}/{b} samples" if b > 1 else "CFG on") if k else "CFG off"


def step_label(trace, i: int, samples=None) -> str:
    """Step (1-based), timestep, sigma, guidance scale and whether CFG ran, for recorded step ``i``,
    over the samples shown (``samples``; default all)."""
    s = trace.steps[i]
    n = trace.meta.get("num_steps") or len(trace.steps)
    idx = range(len(s.cfg_active)) if samples is None else [j for j in samples if j < len(s.cfg_active)]
    b, k = len(idx), sum(bool(s.cfg_active[j]) for j in idx)
    sc = [s.guidance_scale[j] for j in idx if j < len(s.guidance_scale)]
    sc = [v for v in sc if v == v]  # NaN: not known
    if sc and min(sc) != max(sc):  # samples guided at different scales: their range, not a mean
        scale = f"{fmt(min(sc), '.3g')}–{fmt(max(sc), '.3g')} per sample"
    else:
        scale = fmt(sc[0] if sc else None, ".3g")
    return (f"step {s.index + 1}/{n} · t={fmt(s.timestep, '.0f')} · σ={fmt(s.sigma)} · "
            f"scale {scale} · {_cfg_words(k, b)}")


def short_step_label(label: str) -> str:
    """A step label without timestep and scale (for narrow columns)."""
    return " · ".join(p for p in label.split(" · ") if not p.startswith(("t=", "scale")))


def sample_prompt(trace, j: int) -> str | None:
    """The prompt of sample ``j`` of a traced call (None: given as embeddings)."""
    call = trace.meta.get("call") or {}
    p = call.get("prompt")
    if isinstance(p, list) and p:
        per = max(1, int(call.get("num_images_per_prompt") or 1))
        p = p[min(j // per, len(p) - 1)]
    return p if isinstance(p, str) else None


def _short(p: str, n: int = 40) -> str:
    return repr(p if len(p) <= n else p[:n - 1] + "…")


def sample_label(trace, i: int, j: int) -> str:
    """Caption of sample ``j`` at recorded step ``i``: its prompt (when the batch has several), scale
    and whether CFG ran for it."""
    s = trace.steps[i]
    parts = [f"sample {j}"]
    p = sample_prompt(trace, j)
    if p is not None and isinstance((trace.meta.get("call") or {}).get("prompt"), list):
        parts.append(_short(p))
    if j < len(s.guidance_scale):
        parts.append(f"scale {fmt(float(s.guidance_scale[j]), '.3g')}")
    if j < len(s.cfg_active):
        parts.append("CFG ✓" if s.cfg_active[j] else "CFG –")
    return " · ".join(parts)


def prompt_of(trace) -> str:
    """The call's prompt for a title: one prompt quoted, or how many there were."""
    p = (trace.meta.get("call") or {}).get("prompt")
    if isinstance(p, list):
        if len(set(p)) != 1:
            return f"{len(p)} prompts"
        p = p[0]
    return repr(p) if p else "(prompt embeddings)"


def prompt_of_call(prompt) -> str:
    """A call's ``prompt`` argument for a title (quoted; a list: its one prompt or how many)."""
    if isinstance(prompt, (list, tuple)):
        if len(set(prompt)) != 1:
            return f"{len(prompt)} prompts"
        prompt = prompt[0]
    return _short(prompt, 60) if isinstance(prompt, str) and prompt else "(prompt embeddings)"


def trace_caption(name: str, trace, sample: int, i: int) -> str:
    """A compared trace's tile at step ``i``: its config, NFE and guided steps of ``sample`` over the
    run (the trace's own record: never a wall clock of one loop), CFG on or off at that step, prompt
    and seed."""
    nfe = trace.nfe
    nfe = nfe[sample] if isinstance(nfe, list) and len(nfe) > sample else nfe
    steps = trace.steps
    guided = sum(bool(s.cfg_active[sample]) for s in steps if sample < len(s.cfg_active))
    n = trace.meta.get("num_steps") or len(steps)
    bits = [name, f"NFE {fmt(nfe, '.3g')}", f"guided {guided}/{n} steps"]
    if steps:
        s = steps[min(i, len(steps) - 1)]
        on = sample < len(s.cfg_active) and bool(s.cfg_active[sample])
        bits.append(("CFG on" if on else "CFG off") + (f" at step {s.index + 1}" if i < len(steps) else " (ended)"))
    p = sample_prompt(trace, sample)
    if p is not None:
        bits.append(_short(p, 32))
    seed = trace.meta.get("seed")
    if isinstance(seed, list):
        seed = seed[sample] if sample < len(seed) else None
    if seed is not None:
        bits.append(f"seed {seed}")
    return " · ".join(bits)


def _prefix_controls(config_json: str | None) -> bool:
    """Whether a sweep config guides a prefix of the steps (full guidance, CFG cutoffs, adaptive
    cutoffs): then a row's guided steps say which steps ran with CFG."""
    import json

    try:
        controls = json.loads(config_json or "{}").get("controls") or []
    except (ValueError, AttributeError):
        return False
    return all(isinstance(c, dict) and c.get("type") in ("CFGCutoff", "AdaptiveCutoff") and
               (c.get("args") or c).get("compat", "dlx") == "dlx" for c in controls)


def sweep_caption(row, i: int | None, n_steps: int, metric: str | None = None, share: float | None = None) -> str:
    """A sweep row's tile at step ``i`` (None: the final image): its config name, NFE, the cost
    model's predicted time as a share of full guidance's (``share``), CFG on or off at that step
    (for configs that guide a prefix of the steps), and ``metric``'s value."""
    bits = [str(row.config), f"NFE {fmt(row.nfe, '.3g')}"]
    if share is not None and share == share:
        bits.append(f"time {share:.2f}× full (predicted)")
    g = getattr(row, "guided_steps", None)
    if g is not None and g == g:
        if i is not None and _prefix_controls(getattr(row, "config_json", None)):
            bits.append(f"CFG {'on' if i < g else 'off'} at step {i + 1}")
        else:
            bits.append(f"guided {fmt(g, '.3g')}/{fmt(getattr(row, 'steps', n_steps), '.3g')} steps")
    if metric:
        v = getattr(row, metric)
        # PSNR of identical images is infinite (the store keeps 100 dB for it): say so, not "100"
        same = metric == "psnr" and v == v and v >= 100
        bits.append(f"{metric} ∞ (identical)" if same else f"{metric} {fmt(v, '.3g')}")
    return " · ".join(bits)
