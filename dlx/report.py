"""Export: PNG strips, animated GIFs and a self-contained HTML report of a trace or a sweep.

``report(trace_or_sweep, "report.html")`` writes one file that opens in any browser with no
kernel and no network: tables, plots (PNG, inline) and galleries (inline PNG tiles and a step
slider in a few lines of plain JavaScript; no CDN, no external file). A sweep's report opens with
the answer: the recommendation (``res.recommend()``), speed against quality for every metric that
varies between configs, and the key columns as "mean [lo, hi]" narrow enough for a 1000 px page;
then the paired differences to the reference, the full summary, the per-step previews of every
prompt and seed (one collapsible gallery each), the provenance of the numbers and every row.

The pictures and captions are :mod:`dlx.tiles`' (the widgets show the same), the words
:mod:`dlx.labels`', the plots :mod:`dlx.plots`'.

(Over 400 lines: one file format, the self-contained HTML report; its sections share one page's
style and script.)
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from . import labels as L
from ._io import atomic_write as _atomic_write
from .errors import DlxError
from .tiles import save_gif, strip_image, sweep_tiles, trace_tiles, traces_tiles

__all__ = ["strip_image", "strip", "save_gif", "report"]

#: metrics that measure closeness to the reference config's image: its own row shows "reference"
_FIDELITY = ("psnr", "ssim", "lpips")


def strip(trace, kind: str = "x0", *, samples=None, steps=None, size: int | None = None, decoder="auto"):
    """A PNG strip of a trace (``steps × samples``, PIL image): a column per step (default: up to 8
    spread over the run, the last included), a row per sample, labels above. ``.save("strip.png")``."""
    from .render import _check_size

    _check_size(size)
    tiles = trace_tiles(trace, samples, decoder)
    if kind not in tiles.kinds:
        raise DlxError(f"argument `kind` must be one of {list(tiles.kinds)} for this trace; got {kind!r}")
    return tiles.strip(kind, size or 128, steps)


# --- HTML ----------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:20px;color:#222;max-width:1400px}
h1{font-size:21px;margin:0 0 4px} h2{font-size:17px;margin-top:26px;border-bottom:1px solid #ddd}
p.sub{color:#555;margin:0 0 10px;font-size:13px}
.answer{font-size:16px;background:#f3f7ff;border-left:4px solid #3b6fd8;padding:8px 12px;margin:10px 0}
table.dlx{border-collapse:collapse;font-size:12px;font-family:ui-monospace,monospace}
table.dlx td,table.dlx th{border:1px solid #ddd;padding:2px 6px;text-align:right;white-space:nowrap}
table.dlx th{background:#f4f4f4} table.dlx td:first-child{text-align:left}
.scroll{max-height:360px;overflow:auto;display:inline-block;max-width:100%}
.wide{overflow-x:auto;max-width:100%} .note{font-size:12px;color:#555;max-width:900px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:8px;max-width:1400px}
img.plot{width:100%;max-width:660px;border:1px solid #eee}
.dlx-gal{margin:8px 0 18px} .dlx-grid{display:grid;gap:6px}
details.group{margin:4px 0} details.group summary{cursor:pointer;font:13px ui-monospace,monospace}
.dlx-tile figcaption{font:12px ui-monospace,monospace;line-height:1.2;margin-bottom:2px;overflow-wrap:anywhere}
.dlx-tile img{image-rendering:pixelated;image-rendering:crisp-edges;display:block;background:#eee}
.dlx-label{font:13px ui-monospace,monospace;margin:4px 0} table.dlx.meta td{text-align:left;white-space:normal}
table.dlx.meta td pre{margin:0;white-space:pre-wrap;font-size:11px;max-height:200px;overflow:auto}
"""

# The whole of the report's script: each gallery's frames are in a JSON <script> beside it.
_JS = """
document.querySelectorAll('.dlx-gal').forEach(function (g) {
  var d = JSON.parse(g.querySelector('script.dlx-data').textContent);
  var s = g.querySelector('input.dlx-step'), k = g.querySelector('select.dlx-kind');
  var lab = g.querySelector('.dlx-label'), imgs = g.querySelectorAll('img.dlx-img');
  var caps = g.querySelectorAll('figcaption');
  var p = g.querySelector('button.dlx-play'), timer = null;
  function show() {
    var kind = k ? k.value : d.kinds[0], i = +s.value;
    imgs.forEach(function (im, j) { var f = d.frames[kind][i][j]; im.src = f ? 'data:image/png;base64,' + f : ''; });
    caps.forEach(function (c, j) { c.textContent = d.captions[i][j]; });
    lab.textContent = d.labels[i];
  }
  s.addEventListener('input', show);
  if (k) k.addEventListener('change', show);
  if (p) p.addEventListener('click', function () {
    if (timer) { clearInterval(timer); timer = null; p.textContent = 'play'; return; }
    p.textContent = 'pause';
    timer = setInterval(function () { s.value = (+s.value + 1) % (+s.max + 1); show(); }, 250);
  });
  show();
});
"""


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _png_b64(t) -> str | None:
    from ._io import png_bytes

    # zlib level 6: a tenth of level 9's time (1.8 against 19 ms a 128-px frame) for 3 % more bytes
    return None if t is None else _b64(png_bytes(t, compress_level=6))


def _fig_html(fig, alt: str) -> str:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return f"<img class='plot' alt='{html.escape(alt)}' src='data:image/png;base64,{_b64(buf.getvalue())}'>"


def _table(df, max_rows: int = 200, scroll: bool = True, float_format=None) -> str:
    body = df.head(max_rows).to_html(classes="dlx", index=False, border=0, na_rep="–", escape=True,
                                     float_format=float_format or (lambda v: f"{v:.4g}"))
    more = f"<p>… {len(df) - max_rows} more rows</p>" if len(df) > max_rows else ""
    # a wide table scrolls inside its box, never the page
    return f"<div class='{'scroll' if scroll else 'wide'}'>{body}</div>" + more


def _gallery_html(gid: str, tiles, size: int, title: str | None = None) -> str:
    """One gallery of ``tiles``: frames[kind][step][tile] (base64 PNG at the decoder's resolution,
    shown ``size`` px wide with pixelated scaling), captions per step, a step slider, Play and a
    kind selector."""
    kinds = [k for k in ("x0", "latent") if k in tiles.kinds]
    n_steps, n_tiles = tiles.n_steps, tiles.n_tiles
    frames = {k: [[_png_b64(t) for t in row] for row in tiles.rgb(k)] for k in kinds}
    data = json.dumps({"kinds": kinds, "frames": frames, "labels": [tiles.step_label(i) for i in range(n_steps)],
                       "captions": [tiles.captions(i) for i in range(n_steps)]}, separators=(",", ":"))
    data = data.replace("</", "<\\/")  # never end the <script> early
    sel = ""
    if len(kinds) > 1:
        opts = "".join(f"<option value='{k}'{' selected' if i == 0 else ''}>{html.escape(L.KIND_LABEL[k])}</option>"
                       for i, k in enumerate(kinds))
        sel = f"<select class='dlx-kind' aria-label='preview kind'>{opts}</select>"
    last = tiles.captions(n_steps - 1)
    figs = "".join(
        f"<figure class='dlx-tile' style='margin:0;width:{size}px'><figcaption>{html.escape(c)}</figcaption>"
        f"<img class='dlx-img' width='{size}' height='{size}' alt='{html.escape(c)}'></figure>" for c in last)
    slider = (f"<button class='dlx-play' type='button'>play</button> "
              f"<input class='dlx-step' type='range' min='0' max='{n_steps - 1}' value='{n_steps - 1}' "
              f"style='width:320px' aria-label='step'>") if n_steps > 1 else (
              "<input class='dlx-step' type='hidden' min='0' max='0' value='0'>")
    head = f"<div><b>{html.escape(title or tiles.title)}</b></div>" if title != "" else ""
    return (f"<div class='dlx-gal' id='{gid}'>{head}<div>{slider} {sel}</div><div class='dlx-label'></div>"
            f"<div class='dlx-grid' style='grid-template-columns:repeat({L.columns(n_tiles)},{size}px)'>{figs}</div>"
            f"<script type='application/json' class='dlx-data'>{data}</script></div>")


def _kv_table(rows) -> str:
    out = []
    for k, v in rows:
        if v is None:
            continue
        if isinstance(v, (dict, list)):
            cell = f"<pre>{html.escape(json.dumps(v, indent=1, sort_keys=True, default=str))}</pre>"
        else:
            cell = html.escape(str(v))
        out.append(f"<tr><th>{html.escape(k)}</th><td>{cell}</td></tr>")
    return f"<table class='dlx meta'>{''.join(out)}</table>"


def _meta_html(meta: dict) -> str:
    keys = ("pipeline", "model", "family", "scheduler", "scheduler_config", "call", "seed", "num_steps", "batch",
            "nfe", "stop_reason", "last_guided_step", "parts", "device_name", "dtype", "timing", "versions",
            "recorded_at")
    return _kv_table([(k, meta.get(k)) for k in keys if k in meta])


def _trace_plots(traces: dict, reference=None) -> str:
    from . import plots

    out = []
    for what in plots.STEP_CURVES:
        try:
            fig, _ = plots.step_curves(traces, what, reference=reference)
        except DlxError:
            continue  # not recorded (e.g. no uncond without CFG): no plot
        out.append(_fig_html(fig, what))
    return f"<div class='plots'>{''.join(out)}</div>"


def _trace_sections(trace, samples, decoder) -> list[str]:
    if not trace.steps or not (set(trace.fields()) & {"x0", "latents"}):
        gal = "<p>(no x0 or latents recorded: no gallery)</p>"
    else:
        if samples is None:
            s0 = trace.steps[0]
            batch = (s0.x0 if s0.x0 is not None else s0.latents).shape[0]
            samples = list(range(min(batch, 16)))
        tiles = trace_tiles(trace, samples, decoder)
        gal = _gallery_html("gal-0", tiles, L.tile_size(tiles.n_tiles), f"previews, {tiles.n_tiles} sample(s)")
    return ["<h2>Run</h2>", _meta_html(trace.meta), "<h2>Previews</h2>", gal,
            "<h2>Per-step curves</h2>", _trace_plots({"run": trace}),
            "<h2>Per-step table</h2>", _table(trace.to_frame())]


def _traces_sections(traces: dict, decoder) -> list[str]:
    import pandas as pd

    tiles = traces_tiles(traces, 0, decoder)
    rows = []
    for n, t in traces.items():
        guided = sum(bool(s.cfg_active[0]) for s in t.steps if s.cfg_active)
        rows.append({"config": n, "controls": L.config_label(t), "steps": len(t.steps),
                     "nfe (sample 0)": (t.nfe or [math.nan])[0], "guided steps (sample 0)": guided,
                     "last guided step (1-based)": None if t.last_guided_step is None else t.last_guided_step + 1,
                     "stop_reason": t.stop_reason, "regime": t.timing()["regime"]})
    gal = (_gallery_html("gal-0", tiles, L.tile_size(len(traces)), "configs side by side, sample 0")
           if tiles.kinds else "<p>(no previews recorded)</p>")
    return ["<h2>Configs</h2>", _table(pd.DataFrame(rows), scroll=False),
            "<h2>Previews</h2>", gal,
            "<h2>Per-step curves</h2>", _trace_plots(traces, reference=next(iter(traces)))]


# --- a sweep -------------------------------------------------------------------------------------------


def _num(m: str, v) -> str:
    if v is None or v != v:
        return "–"
    if v in (math.inf, -math.inf):
        return "∞" if v > 0 else "−∞"
    if m == "adherence":
        return f"{100 * v:.0f}%"
    if m == "psnr":
        return f"{v:.1f}"
    if m in ("ssim", "lpips", "clip"):
        return f"{v:.3f}"
    return f"{v:.3g}"


def _ci(m: str, v, lo, hi) -> str:
    if v is None or v != v:
        return "–"
    if lo is None or hi is None or lo != lo or hi != hi:
        return _num(m, v)
    return f"{_num(m, v)} [{_num(m, lo)}, {_num(m, hi)}]"


def _time_modes(summ) -> list[str]:
    return [c[len("time_"):-len("_vs_full")] for c in summ.columns
            if c.startswith("time_") and c.endswith("_vs_full") and not c.endswith(("_lo", "_hi"))]


def _varying(summ, metrics) -> list[str]:
    ref = summ["is_reference"] if "is_reference" in summ.columns else None
    out = []
    for m in metrics:
        # a fidelity metric is judged against the reference (identical images: +inf dB, SSIM 1), so
        # one other config whose value is finite and differs from the reference's already varies
        vals = [round(float(v), 6) if abs(v) != math.inf else "ref" for v in summ[m] if v == v]
        finite = [v for v in vals if v != "ref"]
        other = finite if ref is None or m not in _FIDELITY else \
            [round(float(v), 6) for v in summ[m][~ref.astype(bool)] if v == v and abs(v) != math.inf]
        if other and len(set(vals)) > 1:
            out.append(m)
    return out


def _key_table(summ, metrics) -> tuple[str, list[str]]:
    """The columns a researcher reads first, as "mean [lo, hi]", and the footnotes they need."""
    import pandas as pd

    notes, rows = [], []
    modes = _time_modes(summ)
    for r in summ.to_dict("records"):
        d = {"config": r["config"] + (" (reference)" if r.get("is_reference") else ""), "NFE": _num("", r.get("nfe"))}
        for mode in modes:
            share = _ci("", r.get(f"time_{mode}_vs_full"), r.get(f"time_{mode}_vs_full_lo"),
                        r.get(f"time_{mode}_vs_full_hi"))
            if r.get(f"timing_steady_{mode}") is False:
                share += " †"
                note = (f"† the {mode} timing never settled while it was measured (the host's speed kept "
                        f"changing): read that time share with care")
                if note not in notes:
                    notes.append(note)
            d[f"time vs full ({mode}, predicted)"] = share
        for m in metrics:
            d[m] = ("reference" if r.get("is_reference") and m in _FIDELITY
                    else _ci(m, r.get(m), r.get(f"{m}_lo"), r.get(f"{m}_hi")))
        rows.append(d)
    return _table(pd.DataFrame(rows), scroll=False), notes


def _compare_table(res, metrics) -> str:
    cmp = getattr(res, "compare", None)
    if cmp is None:
        return ""
    try:
        c = cmp()
    except DlxError as e:
        return f"<p class='note'>(no paired comparison: {html.escape(str(e))})</p>"
    import pandas as pd

    rows = []
    kind = c.attrs.get("kind", {})
    for r in c.to_dict("records"):
        d = {"config": r.get("config"), "pairs": r.get("n_pairs")}
        for m in metrics:
            if f"{m}_diff" in r:
                head = f"Δ {m}" if kind.get(m, "paired difference") == "paired difference" else f"{m} vs reference"
                d[head] = ("reference" if r.get("is_reference")
                               else _ci(m, r.get(f"{m}_diff"), r.get(f"{m}_diff_lo"),
                                        r.get(f"{m}_diff_hi")))
        rows.append(d)
    return ("<h2>Paired differences to the reference (same prompts and seeds)</h2>" +
            _table(pd.DataFrame(rows), scroll=False))


def _recommendation(res, metrics) -> str:
    rec = getattr(res, "recommend", None)
    if rec is None:
        return ("<p class='answer'>(This dlx has no <code>SweepResult.recommend</code>: read the table and the plots "
                "below.)</p>")
    try:
        sentence = str(rec())
    except DlxError as e:
        sentence = f"No recommendation: {e}"
    return f"<p class='answer' id='recommendation'>{html.escape(sentence)}</p>"


def _provenance(res) -> str:
    import platform

    import torch

    from . import __version__

    prov = res.provenance() if hasattr(res, "provenance") else {}
    try:
        import transformers

        tv = transformers.__version__
    except ImportError:  # pragma: no cover
        tv = "not installed"
    import diffusers

    call = dict(prov.get("call") or res.spec.call)
    costs = prov.get("costs") or []
    regimes = [{k: c.get(k) for k in ("mode", "steps", "scale", "batch", "guided_step_ms", "unguided_step_ms",
                                       "fixed_ms", "saving", "regime", "steady", "drift", "repeats", "device_name",
                                       "threads", "timer") if k in c} for c in costs]
    model = prov.get("model") or res.spec.model
    rows = [
        ("rows computed with", prov.get("versions")),
        ("rows computed on", ", ".join(prov.get("devices") or []) or None),
        ("rows finished (UTC)", " … ".join(prov["rows_finished"]) if prov.get("rows_finished") else None),
        ("sweep created (UTC)", prov.get("created_at")),
        ("model", {k: v for k, v in model.items() if k not in ("scheduler", "scheduler_config")}),
        ("weights fingerprint", prov.get("weights_fingerprint")),
        ("scheduler", model.get("scheduler")),
        ("scheduler config", model.get("scheduler_config")),
        ("steps", call.get("num_inference_steps")),
        ("guidance scale", call.get("guidance_scale")),
        ("resolution", f"{call['height']}×{call['width']}" if call.get("height") and call.get("width")
         else "the model's default"),
        ("call (every row)", call),
        ("configs (full JSON)", prov.get("configs") or {c.name: c.to_json() for c in res.spec.configs}),
        ("measured step costs and timing regime", regimes or "no timing measured (timing=())"),
        ("report written", f"{__import__('datetime').datetime.now().astimezone().isoformat(timespec='seconds')} by "
                           f"dlx {__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
                           f"transformers {tv}, Python {platform.python_version()} on {platform.machine()} "
                           f"({torch.get_num_threads()} torch threads in this process)"),
    ]
    return _kv_table(rows)


def _sweep_sections(res, metric=None) -> list[str]:
    from . import plots

    summ = res.summary()
    metrics = [m for m in res.metrics if m in summ.columns]
    out = ["<h2 id='answer'>Which config?</h2>", _recommendation(res, metrics)]
    shown = _varying(summ, metrics) if metric is None else [metric]
    figs = []
    for m in shown:
        try:
            figs.append(_fig_html(plots.speed_quality(summ, metric=m)[0], f"speed against {m}"))
        except DlxError as e:
            figs.append(f"<p>(no speed-quality plot of {html.escape(m)}: {html.escape(str(e))})</p>")
    flat = [m for m in metrics if m not in shown]
    out.append(f"<div class='plots'>{''.join(figs)}</div>")
    if flat:
        out.append(f"<p class='note'>Not plotted: {', '.join(flat)} (the same for every config).</p>")
    key, notes = _key_table(summ, metrics)
    method = summ.attrs.get("interval_method")
    level = summ.attrs.get("level", 0.95)
    out += [key, "<p class='note'>" + "<br>".join(html.escape(n) for n in [
        f"Each metric: mean over prompts × seeds [{level:.0%} interval"
        + (": " + "; ".join(f"{k}: {v}" for k, v in method.items()) if isinstance(method, dict) and method
           else (f": {method}" if method else "")) + "]. 'time vs full': the predicted time of the config run alone "
        "(from step costs measured on this device), as a share of full guidance's.", *notes]) + "</p>"]
    out.append(_compare_table(res, metrics))
    out += ["<h2>Summary (one row per config, every column)</h2>", _table(summ, scroll=False)]
    out += _sweep_galleries(res, summ, metrics)
    out += ["<h2>Provenance</h2>", _provenance(res)]
    f = res.frame
    out += ["<h2>All rows</h2>", _table(f.drop(columns=[c for c in ("config_json",) if c in f.columns]))]
    return out


def _sweep_galleries(res, summ, metrics) -> list[str]:
    f = res.frame
    ok = f[f.status == "ok"]
    if not len(ok):
        return []
    groups = list(ok.groupby(["prompt", "seed"], sort=False).groups)
    metric = next((m for m in _varying(summ, metrics) if m not in _FIDELITY), metrics[0] if metrics else None)
    out = [f"<h2>Images: {len(groups)} prompt × seed groups, one slider each</h2>"]
    for gi, (prompt, seed) in enumerate(groups):
        tiles = sweep_tiles(res, prompt, seed, metric, summ, frame=f)
        what = f"{tiles.n_steps} steps" if tiles.n_steps > 1 else "final images only (run with keep_previews=True)"
        out.append(f"<details class='group'{' open' if gi < 2 else ''}><summary>prompt {html.escape(repr(prompt))} · "
                   f"seed {seed} · {what}</summary>"
                   + _gallery_html(f"gal-{gi}", tiles, L.tile_size(tiles.n_tiles), "") + "</details>")
    return out


def report(obj, path=None, *, title: str | None = None, samples=None, decoder="auto", metric: str | None = None):
    """A self-contained HTML report of a trace, of several traces (a list or a dict label → trace,
    compared side by side) or of a sweep result: tables, plots and galleries with a working step
    slider, in one file with every image inline and no network access.

    Returns the HTML text; with ``path``, writes it there atomically and returns the path.
    """
    from .trace import Trace

    if isinstance(obj, Trace):
        kind, sections = "trace", _trace_sections(obj, samples, decoder)
    elif isinstance(obj, (list, tuple, dict)) and obj:
        traces = dict(obj) if isinstance(obj, dict) else None
        if traces is None:
            traces = {}
            for i, t in enumerate(obj):
                if not isinstance(t, Trace):
                    raise DlxError(f"argument `obj` holds a {type(t).__name__}; a list must hold dlx.Trace objects")
                name = L.config_label(t)
                traces[name if name not in traces else f"{name} #{i}"] = t
        for t in traces.values():
            if not isinstance(t, Trace):
                raise DlxError(f"argument `obj` holds a {type(t).__name__}; expected dlx.Trace objects")
        kind, sections = f"{len(traces)} traces", _traces_sections(traces, decoder)
    elif hasattr(obj, "frame") and hasattr(obj, "summary"):
        if metric is not None and metric not in obj.metrics:
            raise DlxError(f"argument `metric` must be one of the sweep's metrics {obj.metrics}; got {metric!r}")
        kind, sections = "sweep", _sweep_sections(obj, metric)
    else:
        raise DlxError(f"argument `obj` must be a Trace, a list or dict of Traces, or a sweep result; got {type(obj).__name__}")
    from . import __version__

    title = title or f"dlx report ({kind})"
    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           "<meta name='viewport' content='width=device-width, initial-scale=1'>"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
           f"<h1>{html.escape(title)}</h1><p class='sub'>dlx {__version__} · one self-contained file (images inline, "
           f"no network)</p>{''.join(sections)}<script>{_JS}</script></body></html>")
    if path is None:
        return doc
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(doc, encoding="utf-8"))
