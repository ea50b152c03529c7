"""The tiles every view shows, built once: pictures per (kind, step, tile), captions, step labels.

A :class:`Tiles` is what a gallery, a compare view and the HTML report all draw from: the widgets
encode its pictures at the size they show them, the report at the decoder's resolution, a strip or
GIF lays them out as one image. Builders: :func:`trace_tiles` (the samples of one trace),
:func:`traces_tiles` (several traces, one sample each) and :func:`sweep_tiles` (the configs of one
prompt and seed of a sweep). The words come from :mod:`dlx.labels`, the pictures from
:mod:`dlx.render`. A kind not yet shown renders on a background thread (:meth:`Tiles.prefetch`),
so a view can switch to it without blocking.
"""

from __future__ import annotations

import numbers
import threading
from pathlib import Path

from . import labels as L
from ._io import atomic_write
from .errors import DlxError

__all__ = ["Tiles", "trace_tiles", "traces_tiles", "sweep_tiles", "strip_image", "save_gif"]

_GAP = 6


class Tiles:
    """Pictures ``rgb(kind)[step][tile]`` (uint8 (h, w, 3) tensors or None), ``captions(step)`` (one
    per tile), ``step_label(step)``, ``title``; PNG bytes per (kind, size) cached."""

    def __init__(self, render, kinds, n_steps: int, captions, step_label, title: str, n_tiles: int):
        self._render = render  # kind -> list (steps) of list (tiles) of tensors or None
        self.kinds = tuple(kinds)
        self.n_steps = n_steps
        self.n_tiles = n_tiles
        self.captions = captions
        self.step_label = step_label
        self.title = title
        self._rgb: dict = {}
        self._png: dict = {}
        self._locks = {k: threading.Lock() for k in self.kinds}
        self._threads: dict = {}

    def rgb(self, kind: str) -> list:
        with self._locks[kind]:
            if kind not in self._rgb:
                self._rgb[kind] = self._render(kind)
            return self._rgb[kind]

    def png(self, kind: str, size: int | None) -> list:
        """PNG bytes per step and tile, enlarged to ``size`` (None: the decoder's resolution)."""
        from .render import png_bytes

        rgb = self.rgb(kind)
        with self._locks[kind]:
            if (kind, size) not in self._png:
                self._png[kind, size] = [[None if t is None else png_bytes(t, size) for t in row] for row in rgb]
            return self._png[kind, size]

    def ready(self, kind: str, size: int | None) -> bool:
        return (kind, size) in self._png

    def prefetch(self, kind: str, size: int | None) -> threading.Thread | None:
        """Render and encode ``kind`` on a background thread (None: it is ready already)."""
        if self.ready(kind, size):
            return None
        t = self._threads.get((kind, size))
        if t is None:
            t = threading.Thread(target=self._quiet_png, args=(kind, size), name=f"dlx-render-{kind}", daemon=True)
            self._threads[kind, size] = t
            t.start()
        return t

    def _quiet_png(self, kind, size):
        try:
            self.png(kind, size)
        except Exception:  # noqa: BLE001 - the view renders it again in the foreground and shows the error
            pass

    # -- static pictures -------------------------------------------------------------------------
    def check_steps(self, steps):
        for i in steps:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < self.n_steps:
                raise DlxError(f"argument `steps` holds {i!r}, not a step in [0, {self.n_steps})")

    def strip(self, kind: str, size: int, steps=None):
        """A PIL image ``steps × tiles``: a column per step (default: up to 8 spread over the run,
        the last included), a row per tile with its caption above, step labels on top."""
        steps = L.steps_shown(self.n_steps) if steps is None else list(steps)
        self.check_steps(steps)
        rgb = self.rgb(kind)
        last = steps[-1] if steps else 0
        return strip_image([[rgb[i][j] for i in steps] for j in range(self.n_tiles)],
                           col_labels=[L.short_step_label(self.step_label(i)) for i in steps],
                           row_labels=self.captions(last) if self.n_tiles > 1 else None, size=size,
                           title=f"{self.title} · {L.KIND_LABEL[kind]}")

    def grid(self, kind: str, size: int, step: int):
        """A PIL image of every tile at ``step`` in the views' grid, each with its caption."""
        rgb = self.rgb(kind)[step]
        caps = self.captions(step)
        cols = L.columns(self.n_tiles)
        rows = [list(range(k, min(k + cols, self.n_tiles))) for k in range(0, self.n_tiles, cols)]
        return strip_image([[rgb[j] for j in r] for r in rows],
                           row_labels=[" | ".join(caps[j] for j in r) for r in rows], size=size,
                           title=f"{self.title} · {L.KIND_LABEL[kind]} · {self.step_label(step)}")

    def gif(self, path, kind: str, size: int, fps: int):
        rgb = self.rgb(kind)
        return save_gif(path, [[rgb[i][j] for j in range(self.n_tiles)] for i in range(self.n_steps)],
                        labels=[self.step_label(i) for i in range(self.n_steps)],
                        col_labels=self.captions(0), size=size, fps=fps)


# --- builders ----------------------------------------------------------------------------------------


def check_trace(trace, what="trace"):
    from .trace import Trace

    if not isinstance(trace, Trace):
        raise DlxError(f"argument `{what}` must be a dlx.Trace; got {type(trace).__name__}")


def kinds_of(trace) -> tuple[str, ...]:
    """The preview kinds a trace can show: "latent" (x_t) and/or "x0", as recorded."""
    f = trace.fields()
    return tuple(k for k, name in (("latent", "latents"), ("x0", "x0")) if name in f)


def trace_tiles(trace, samples=None, decoder="auto") -> Tiles:
    """One tile per sample (``samples``: some of them) of one trace, captioned with its scale and
    CFG state at each step."""
    check_trace(trace)
    kinds = kinds_of(trace)
    if not kinds:
        raise DlxError(f"a gallery needs 'x0' or 'latents' recorded; this trace recorded {trace.fields()}")
    s0 = trace.steps[0] if trace.steps else None
    batch = next((getattr(s0, f).shape[0] for f in ("x0", "latents") if s0 is not None and getattr(s0, f) is not None), 0)
    samples = list(range(batch)) if samples is None else list(samples)
    for j in samples:
        if isinstance(j, bool) or not isinstance(j, numbers.Integral) or not 0 <= j < batch:
            raise DlxError(f"argument `samples` holds {j!r}, not a sample of this batch of {batch}")

    def render(k):
        from .render import render_steps

        rgb = render_steps(trace, k, samples, decoder=decoder)
        return [[rgb[i, j] for j in range(len(samples))] for i in range(rgb.shape[0])]

    return Tiles(render, kinds, len(trace.steps), lambda i: [L.sample_label(trace, i, j) for j in samples],
                 lambda i: L.step_label(trace, i, samples),
                 f"{trace.meta.get('pipeline', 'trace')} · {L.prompt_of(trace)}", len(samples))


def traces_tiles(traces: dict, sample: int = 0, decoder="auto") -> Tiles:
    """One tile per trace (label → trace), sample ``sample`` of each, captioned with its label, NFE,
    guided steps and CFG state at the step shown (a trace with fewer steps holds its last one)."""
    names, ts = list(traces), list(traces.values())
    kinds = tuple(k for k in ("latent", "x0") if all(k in kinds_of(t) for t in ts))
    n_steps = max(len(t.steps) for t in ts)
    ref = max(ts, key=lambda t: len(t.steps))

    def render(k):
        from .render import render_steps

        per = [render_steps(t, k, [sample], decoder=decoder)[:, 0] for t in ts]
        return [[p[min(i, p.shape[0] - 1)] if p.shape[0] else None for p in per] for i in range(n_steps)]

    def step_label(i):
        return L.step_label(ref, min(i, len(ref.steps) - 1)).split(" · scale")[0]

    return Tiles(render, kinds, n_steps, lambda i: [L.trace_caption(n, t, sample, i) for n, t in zip(names, ts)],
                 step_label, f"{len(ts)} configs · sample {sample}", len(ts))


def sweep_tiles(res, prompt, seed, metric: str | None = None, summary=None, frame=None) -> Tiles:
    """One tile per config of a sweep for one (prompt, seed): its kept per-step x0 previews
    (``keep_previews=True``), else its final image; captioned with config, NFE, the cost model's
    predicted time share, CFG at the step shown and ``metric``."""
    import numpy as np
    import torch
    from PIL import Image

    f = res.frame if frame is None else frame
    f = f[f.status == "ok"]
    g = f[(f.prompt == prompt) & (f.seed == seed)].drop_duplicates("config")
    if g.empty:
        raise DlxError(f"arguments `prompt`/`seed`: no finished rows for prompt={prompt!r}, seed={seed!r}")
    rows = list(g.itertuples(index=False))
    previews = []
    for r in rows:
        try:
            previews.append(res.previews(r.row_id))
        except DlxError:
            previews.append(None)
    per_step = all(p is not None for p in previews)
    n_steps = max(p.shape[0] for p in previews) if per_step else 1
    shares = {}
    if summary is not None:
        mode = next((m for m in ("eager", "compiled") if f"time_{m}_vs_full" in summary.columns), None)
        if mode:
            shares = dict(zip(summary["config"], summary[f"time_{mode}_vs_full"]))

    def final(r):
        if not isinstance(r.image, str):  # NaN (pandas 3): failed, or its PNG is missing
            return None
        with Image.open(r.image) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy())

    def render(k):
        if per_step:
            return [[p[min(i, p.shape[0] - 1)] for p in previews] for i in range(n_steps)]
        return [[final(r) for r in rows]]

    def captions(i):
        return [L.sweep_caption(r, i if per_step else int(r.steps) - 1, n_steps, metric, shares.get(r.config))
                for r in rows]

    def step_label(i):
        return f"step {i + 1}/{n_steps} · x0 previews kept by the sweep" if per_step else "final images"

    what = "" if per_step else " · final images (run with keep_previews=True for steps)"
    return Tiles(render, ("x0",), n_steps, captions, step_label, f"prompt {prompt!r} · seed {seed}{what}", len(rows))


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
    return atomic_write(path, lambda tmp: frames_p[0].save(
        tmp, format="GIF", save_all=True, append_images=frames_p[1:], duration=durations, loop=0))
