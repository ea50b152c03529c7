"""Export: PNG strips, animated GIFs and a self-contained HTML report of a trace or a sweep.

``report(trace_or_sweep, "report.html")`` writes one file that opens in any browser with no
kernel and no network: the tables, the plots (PNG, inline) and the galleries (inline PNG tiles
and a step slider in a few lines of plain JavaScript; no CDN, no external file). The pictures come
from :mod:`dlx.render`, the numbers from the trace (``to_frame``) or the sweep (``frame``,
``summary``), the plots from :mod:`dlx.plots`.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from ._io import atomic_write as _atomic_write
from .errors import DlxError

__all__ = ["strip_image", "strip", "save_gif", "report"]

_GAP = 6
_KIND_LABEL = {"x0": "x0 (denoised estimate)", "latent": "x_t (noisy latent)"}


# --- PNG strips and GIFs -------------------------------------------------------------------------------


def _font(size: int = 12):
    """DejaVu Sans (shipped with matplotlib, a dependency: it has σ, ‖ and ✓), else Pillow's default."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # noqa: BLE001 - any font is better than none
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # pragma: no cover - Pillow < 10.1 has one bitmap font
            return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    words, lines, cur = str(text).split(" "), [], ""
    for w in words:
        nxt = f"{cur} {w}".strip()
        if cur and font.getlength(nxt) > width:
            lines.append(cur)
            cur = w
        else:
            cur = nxt
    return lines + ([cur] if cur else [])


def _tile(t, size):
    from .render import to_pil, upscale

    if t is None:
        return None
    import torch

    return to_pil(t, size) if isinstance(t, torch.Tensor) else upscale(t, size)


def strip_image(rows, *, row_labels=None, col_labels=None, size: int = 128, title: str | None = None):
    """A grid image: ``rows`` (list of lists of uint8 (h, w, 3) tensors, PIL images or None), each
    tile enlarged to ``size`` with sharp edges; ``col_labels`` above the first row's tiles,
    ``row_labels`` above each row, ``title`` on top. Returns a PIL image."""
    from PIL import Image, ImageDraw

    rows = [list(r) for r in rows]
    ncol = max((len(r) for r in rows), default=0)
    if not rows or not ncol:
        raise DlxError("strip_image needs at least one row with one tile")
    font, small = _font(13), _font(12)
    width = ncol * (size + _GAP) + _GAP
    line = 16
    title_lines = _wrap(title, font, width - 2 * _GAP) if title else []
    col_lines = [_wrap(c, small, size) for c in (col_labels or [])]
    col_h = max((len(c) for c in col_lines), default=0) * (line - 2)
    row_lines = [_wrap(r, small, width - 2 * _GAP) for r in (row_labels or [""] * len(rows))]
    row_hs = [len(r) * (line - 2) + (2 if r else 0) for r in row_lines]
    height = _GAP + len(title_lines) * line + (col_h + 2 if col_h else 0) + sum(h + size + _GAP for h in row_hs)
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    y = _GAP
    for t in title_lines:
        d.text((_GAP, y), t, fill="black", font=font)
        y += line
    for j, lines in enumerate(col_lines):
        for k, t in enumerate(lines):
            d.text((_GAP + j * (size + _GAP), y + k * (line - 2)), t, fill=(40, 40, 40), font=small)
    y += col_h + 2 if col_h else 0
    for r, lines, h in zip(rows, row_lines, row_hs):
        for k, t in enumerate(lines):
            d.text((_GAP, y + k * (line - 2)), t, fill=(90, 90, 90), font=small)
        y += h
        for j, t in enumerate(r):
            tile = _tile(t, size)
            if tile is not None:
                im.paste(tile, (_GAP + j * (size + _GAP), y))
        y += size + _GAP
    return im


def _steps_shown(n: int, at_most: int = 8) -> list[int]:
    return sorted({round(i * (n - 1) / (at_most - 1)) for i in range(at_most)}) if n > at_most else list(range(n))


def strip(trace, kind: str = "x0", *, samples=None, steps=None, size: int | None = None, decoder="auto"):
    """A PNG strip of a trace (``steps × samples``, PIL image): a row per step (default: up to 8 spread
    over the run, the last included), a column per sample, labels above. ``.save("strip.png")``."""
    from .widgets import gallery

    g = gallery(trace, kind=kind, samples=samples, size=size or 128, decoder=decoder)
    return g.strip(steps=steps)


def save_gif(path, frames, *, labels=None, col_labels=None, size: int = 128, fps: int = 4, title=None) -> Path:
    """An animated GIF at ``path`` (written atomically): one frame per entry of ``frames`` (each a
    list of tiles, laid side by side as :func:`strip_image` does, labelled ``labels[i]``), looping,
    the last frame held twice as long."""
    if not frames:
        raise DlxError("save_gif needs at least one frame")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise DlxError(f"argument `fps` must be a positive number; got {fps!r}")
    ims = [strip_image([f], row_labels=[labels[i]] if labels else None, col_labels=col_labels, size=size,
                       title=title) for i, f in enumerate(frames)]
    w = max(i.width for i in ims)
    h = max(i.height for i in ims)
    from PIL import Image

    frames_p = []
    for i in ims:
        c = Image.new("RGB", (w, h), "white")
        c.paste(i, (0, 0))
        frames_p.append(c)
    ms = int(1000 / fps)
    durations = [ms] * (len(frames_p) - 1) + [2 * ms]
    return _atomic_write(path, lambda tmp: frames_p[0].save(
        tmp, format="GIF", save_all=True, append_images=frames_p[1:], duration=durations, loop=0))


# --- HTML ----------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table.dlx{border-collapse:collapse;font-size:12px;font-family:ui-monospace,monospace}
table.dlx td,table.dlx th{border:1px solid #ddd;padding:2px 6px;text-align:right;white-space:nowrap}
table.dlx th{background:#f4f4f4} .scroll{max-height:360px;overflow:auto;display:inline-block;max-width:100%}
.wide{overflow-x:auto;max-width:100%}
.dlx-gal{margin:8px 0 18px} .dlx-grid{display:grid;gap:6px}
.dlx-tile figcaption{font:12px ui-monospace,monospace;line-height:1.2;margin-bottom:2px}
.dlx-tile img{image-rendering:pixelated;image-rendering:crisp-edges;display:block;background:#eee}
.dlx-label{font:13px ui-monospace,monospace;margin:4px 0} table.dlx.meta td{text-align:left;white-space:normal}
img.plot{max-width:100%;border:1px solid #eee}
"""

# The whole of the report's script: each gallery's frames are in a JSON <script> beside it.
_JS = """
document.querySelectorAll('.dlx-gal').forEach(function (g) {
  var d = JSON.parse(g.querySelector('script.dlx-data').textContent);
  var s = g.querySelector('input.dlx-step'), k = g.querySelector('select.dlx-kind');
  var lab = g.querySelector('.dlx-label'), imgs = g.querySelectorAll('img.dlx-img');
  var p = g.querySelector('button.dlx-play'), timer = null;
  function show() {
    var kind = k ? k.value : d.kinds[0], i = +s.value;
    imgs.forEach(function (im, j) { var f = d.frames[kind][i][j]; im.src = f ? 'data:image/png;base64,' + f : ''; });
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
    from .render import png_bytes

    return None if t is None else _b64(png_bytes(t))


def _fig_html(fig, alt: str) -> str:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return f"<img class='plot' alt='{html.escape(alt)}' src='data:image/png;base64,{_b64(buf.getvalue())}'>"


def _table(df, max_rows: int = 200, scroll: bool = True) -> str:
    import pandas as pd

    with pd.option_context("display.precision", 4):
        body = df.head(max_rows).to_html(classes="dlx", index=False, border=0, na_rep="–", escape=True,
                                         float_format=lambda v: f"{v:.4g}")
    more = f"<p>… {len(df) - max_rows} more rows</p>" if len(df) > max_rows else ""
    # a wide table scrolls inside its box, never the page
    return f"<div class='{'scroll' if scroll else 'wide'}'>{body}</div>" + more


def _gallery_html(gid: str, kinds, frames, labels, captions, size: int, title: str) -> str:
    """One gallery: frames[kind][step][tile] (base64 PNG or None at the decoder's resolution,
    shown ``size`` px wide with pixelated scaling), a step slider, a Play button, a kind selector."""
    from .widgets import columns

    n_steps = len(labels)
    n_tiles = len(captions)
    data = json.dumps({"kinds": list(kinds), "frames": frames, "labels": labels}, separators=(",", ":"))
    data = data.replace("</", "<\\/")  # never end the <script> early
    sel = ""
    if len(kinds) > 1:
        opts = "".join(f"<option value='{k}'{' selected' if i == 0 else ''}>{html.escape(_KIND_LABEL[k])}</option>"
                       for i, k in enumerate(kinds))
        sel = f"<select class='dlx-kind' aria-label='preview kind'>{opts}</select>"
    tiles = "".join(
        f"<figure class='dlx-tile' style='margin:0'><figcaption>{html.escape(c)}</figcaption>"
        f"<img class='dlx-img' width='{size}' height='{size}' alt='{html.escape(c)}'></figure>" for c in captions)
    slider = (f"<button class='dlx-play' type='button'>play</button> "
              f"<input class='dlx-step' type='range' min='0' max='{n_steps - 1}' value='{n_steps - 1}' "
              f"style='width:320px' aria-label='step'>") if n_steps > 1 else (
              "<input class='dlx-step' type='hidden' min='0' max='0' value='0'>")
    return (f"<div class='dlx-gal' id='{gid}'><div><b>{html.escape(title)}</b></div>"
            f"<div>{slider} {sel}</div><div class='dlx-label'></div>"
            f"<div class='dlx-grid' style='grid-template-columns:repeat({columns(n_tiles)},{size}px)'>{tiles}</div>"
            f"<script type='application/json' class='dlx-data'>{data}</script></div>")


def _trace_gallery(trace, gid, samples=None, decoder="auto", size=None):
    from .render import render_steps
    from .widgets import _kinds_of, _sample_label, _step_label, tile_size

    kinds = [k for k in ("x0", "latent") if k in _kinds_of(trace)]
    if not kinds or not trace.steps:
        return "<p>(no x0 or latents recorded: no gallery)</p>"
    batch = trace.steps[0].latents.shape[0] if trace.steps[0].latents is not None else trace.steps[0].x0.shape[0]
    samples = list(range(min(batch, 16))) if samples is None else list(samples)
    frames = {}
    for k in kinds:
        rgb = render_steps(trace, k, samples, decoder=decoder)
        frames[k] = [[_png_b64(rgb[i, j]) for j in range(len(samples))] for i in range(rgb.shape[0])]
    labels = [_step_label(trace, i) for i in range(len(trace.steps))]
    captions = [_sample_label(trace, len(trace.steps) - 1, j).split(" · ")[0] for j in samples]
    return _gallery_html(gid, kinds, frames, labels, captions, size or tile_size(len(samples)),
                         f"previews, {len(samples)} sample(s)")


def _meta_html(meta: dict) -> str:
    keys = ("pipeline", "model", "family", "scheduler", "call", "seed", "num_steps", "batch", "nfe", "stop_reason",
            "last_guided_step", "parts", "device_name", "dtype", "timing", "versions", "recorded_at")
    rows = []
    for k in keys:
        if k in meta and meta[k] is not None:
            v = meta[k]
            v = json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)
            rows.append(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>")
    return f"<table class='dlx meta'>{''.join(rows)}</table>"


def _trace_plots(traces: dict, reference=None) -> str:
    from . import plots

    out = []
    for what in plots.STEP_CURVES:
        try:
            fig, _ = plots.step_curves(traces, what, reference=reference)
        except DlxError:
            continue  # not recorded (e.g. no uncond without CFG): no plot
        out.append(_fig_html(fig, what))
    return "".join(out)


def _trace_sections(trace, samples, decoder) -> list[str]:
    return [
        "<h2>Run</h2>", _meta_html(trace.meta),
        "<h2>Previews</h2>", _trace_gallery(trace, "gal-0", samples, decoder),
        "<h2>Per-step curves</h2>", _trace_plots({"run": trace}),
        "<h2>Per-step table</h2>", _table(trace.to_frame()),
    ]


def _traces_sections(traces: dict, decoder) -> list[str]:
    from .render import render_steps
    from .widgets import _step_label, _trace_summary, tile_size

    names = list(traces)
    ts = list(traces.values())
    kinds = [k for k in ("x0", "latent") if all(k in ("x0" if "x0" in t.fields() else "",
                                                       "latent" if "latents" in t.fields() else "") for t in ts)]
    n_steps = max(len(t.steps) for t in ts)
    frames = {}
    for k in kinds:
        per = [render_steps(t, k, [0], decoder=decoder)[:, 0] for t in ts]
        frames[k] = [[_png_b64(p[min(i, p.shape[0] - 1)]) if p.shape[0] else None for p in per]
                     for i in range(n_steps)]
    ref = max(ts, key=lambda t: len(t.steps))
    labels = [_step_label(ref, min(i, len(ref.steps) - 1)).split(" · scale")[0] for i in range(n_steps)]
    captions = [f"{n} · {_trace_summary(t, 0)}" for n, t in zip(names, ts)]
    import pandas as pd

    rows = []
    for n, t in traces.items():
        tm = t.timing()
        rows.append({"config": n, "steps": len(t.steps), "nfe (sample 0)": (t.nfe or [math.nan])[0],
                     "last_guided_step": t.last_guided_step, "stop_reason": t.stop_reason,
                     "loop_s": sum(s.step_ms for s in t.steps if s.step_ms == s.step_ms) / 1e3,
                     "regime": tm["regime"]})
    gal = (_gallery_html("gal-0", kinds, frames, labels, captions, tile_size(len(ts)), "configs side by side, sample 0")
           if kinds else "<p>(no previews recorded)</p>")
    return ["<h2>Configs</h2>", _table(pd.DataFrame(rows), scroll=False),
            "<h2>Previews</h2>", gal,
            "<h2>Per-step curves</h2>", _trace_plots(traces, reference=names[0])]


def _sweep_sections(res, metric=None) -> list[str]:
    from . import plots
    from .widgets import tile_size

    out = []
    summ = res.summary()
    out += ["<h2>Summary (one row per config; 95% bootstrap intervals)</h2>", _table(summ, scroll=False)]
    figs = []
    try:
        figs.append(_fig_html(res.plot(metric=metric)[0], "speed against quality"))
    except DlxError as e:
        figs.append(f"<p>(no speed-quality plot: {html.escape(str(e))})</p>")
    try:
        figs.append(_fig_html(plots.quality_vs_cutoff(summ, metric=metric)[0], "quality against cutoff"))
    except DlxError:
        pass
    out += ["<h2>Plots</h2>", "".join(figs)]
    f = res.frame
    ok = f[f.status == "ok"]
    gi = 0
    if len(ok):
        from PIL import Image

        from .render import png_bytes

        metrics = [m for m in res.metrics if m in ok.columns]
        out.append("<h2>Images (one slider per prompt and seed)</h2>")
        for (prompt, seed), g in ok.groupby(["prompt", "seed"], sort=False):
            g = g.drop_duplicates("config")
            rows = list(g.itertuples(index=False))
            try:
                previews = [res.previews(r.row_id) for r in rows]
            except DlxError:
                previews = None
            if previews:
                n = max(p.shape[0] for p in previews)
                frames = {"x0": [[_b64(png_bytes(p[min(i, p.shape[0] - 1)])) for p in previews] for i in range(n)]}
                labels = [f"step {i + 1}/{n} (x0 previews kept by the sweep)" for i in range(n)]
            else:
                tiles = []
                for r in rows:
                    if isinstance(r.image, str):  # NaN: failed, or its PNG is missing
                        with Image.open(r.image) as im:
                            tiles.append(_b64(png_bytes(im.convert("RGB"))))
                    else:
                        tiles.append(None)
                frames, labels = {"x0": [tiles]}, ["final images"]
            caps = []
            for r in rows:
                named = r.cutoff != r.cutoff or "cutoff" in str(r.config)
                bits = [str(r.config)] + ([] if named else [f"cutoff {r.cutoff:.2g}"])
                bits.append(f"NFE {r.nfe:.3g}" if r.nfe == r.nfe else "NFE –")
                bits += [f"{m} {getattr(r, m):.3g}" for m in metrics[:1] if getattr(r, m) == getattr(r, m)]
                caps.append(" · ".join(bits))
            out.append(_gallery_html(f"gal-{gi}", ["x0"], frames, labels, caps, tile_size(len(rows)),
                                     f"prompt {prompt!r} · seed {seed}"))
            gi += 1
            if gi >= 12:
                out.append("<p>(first 12 prompt × seed groups shown)</p>")
                break
    out += ["<h2>All rows</h2>", _table(f.drop(columns=[c for c in ("config_json",) if c in f.columns]))]
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
            from .widgets import config_label

            traces = {}
            for i, t in enumerate(obj):
                if not isinstance(t, Trace):
                    raise DlxError(f"argument `obj` holds a {type(t).__name__}; a list must hold dlx.Trace objects")
                name = config_label(t)
                traces[name if name not in traces else f"{name} #{i}"] = t
        for t in traces.values():
            if not isinstance(t, Trace):
                raise DlxError(f"argument `obj` holds a {type(t).__name__}; expected dlx.Trace objects")
        kind, sections = f"{len(traces)} traces", _traces_sections(traces, decoder)
    elif hasattr(obj, "frame") and hasattr(obj, "summary"):
        kind, sections = "sweep", _sweep_sections(obj, metric)
    else:
        raise DlxError(f"argument `obj` must be a Trace, a list or dict of Traces, or a sweep result; got {type(obj).__name__}")
    from . import __version__

    title = title or f"dlx report ({kind})"
    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
           f"<h1>{html.escape(title)}</h1><p>dlx {__version__}; one self-contained file (images inline, "
           f"no network).</p>{''.join(sections)}<script>{_JS}</script></body></html>")
    if path is None:
        return doc
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(doc, encoding="utf-8"))
