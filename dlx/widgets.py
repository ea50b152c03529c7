"""Jupyter views of the denoising loop: :func:`gallery`, :func:`compare` (and :func:`live`, from
:mod:`dlx.live`).

Thin views (ipywidgets 8, imported when a view is built) over :mod:`dlx.tiles`: the pictures and
captions are the ones the HTML report shows, the words come from :mod:`dlx.labels`. Every image is
encoded once, as PNG bytes at the size it is shown (enlarged by whole-pixel blocks, so the browser
does not rescale it); moving a slider only picks cached bytes. The kind not shown (x_t or x0)
renders on a background thread as soon as the view is built; a toggle that arrives first shows
"rendering…" and fills in when it is done, never a frozen button.

A view displayed in a notebook leaves two outputs: the widget, and a static PNG of it (a strip over
the steps, or the grid at the step shown). While the widget is alive a style inside it hides the
PNG; a notebook saved and reopened, ``jupyter nbconvert --to html``, GitHub or nbviewer, which
cannot show the widget, show the PNG. Outside a kernel each view is its text ``repr`` and that PNG.

    g = dlx.widgets.gallery(trace)          # step slider, Play, x_t / x0 toggle, per-sample tiles
    dlx.widgets.compare([t_full, t_cut])    # configs side by side on one slider
    run = dlx.widgets.live(pipe, prompt="...", num_inference_steps=25)   # Stop button; run.trace
"""

from __future__ import annotations

import html
import numbers
import threading

from . import labels as L
from .errors import DlxError
from ._notebook import STATIC_HIDER, display_static, in_kernel
from .live import Live, live
from .tiles import Tiles, check_trace, kinds_of, sweep_tiles, trace_tiles, traces_tiles

__all__ = ["gallery", "compare", "live", "Gallery", "Compare", "Live", "tile_size", "columns", "config_label"]

tile_size = L.tile_size
columns = L.columns
config_label = L.config_label

def _widgets():
    try:
        import ipywidgets
    except ImportError:  # pragma: no cover - ipywidgets is a dependency
        return None
    return ipywidgets


def caption_html(text: str) -> str:
    """A caption as inline boxes, one per " · " part: a narrow tile (128 px for 16 samples) wraps
    between parts, never inside one ("scale" / "6"), and inside a part only if it alone is too wide."""
    parts = text.split(" · ")
    spans = " ".join(f"<span style='display:inline-block;max-width:100%;overflow-wrap:anywhere'>"
                     f"{html.escape(p)}{' ·' if k < len(parts) - 1 else ''}</span>" for k, p in enumerate(parts))
    return f"<div style='font-family:monospace;font-size:12px;line-height:1.2'>{spans}</div>"


class _StepView:
    """Tiles over steps: a slider (and Play), an optional x_t / x0 toggle, a label, captions."""

    _name = "view"

    def __init__(self, tiles: Tiles, kind, size: int, fps: int = 4):
        self.tiles = tiles
        self.kinds = tiles.kinds
        if kind not in self.kinds:
            raise DlxError(f"argument `kind` must be one of {list(self.kinds)}; got {kind!r}")
        self.kind = kind
        self.size = size
        self.title = tiles.title
        self.n_tiles = tiles.n_tiles if tiles.n_steps else 0
        self.n_steps = tiles.n_steps
        self.fps = fps
        self.step = tiles.n_steps - 1
        self.busy = False
        if self.n_steps:
            tiles.png(kind, size)  # render now: the slider then only picks bytes
            for k in self.kinds:  # the other kind in the background: ready before the toggle, mostly
                if k != kind:
                    tiles.prefetch(k, size)
        self.widget = None
        self._build()

    # -- state, without a front end -----------------------------------------------------------------
    def images(self, step: int | None = None, kind: str | None = None) -> list[bytes | None]:
        """The PNG bytes of every tile at ``step`` (default: the one shown) for ``kind``."""
        step = self.step if step is None else step
        return self.tiles.png(kind or self.kind, self.size)[step]

    def label(self, step: int | None = None) -> str:
        return self.tiles.step_label(self.step if step is None else step)

    def captions(self, step: int | None = None) -> list[str]:
        return self.tiles.captions(self.step if step is None else step)

    def strip(self, steps=None, kind: str | None = None):
        """A PNG strip (PIL image), ``steps × tiles``: a column per step shown (default: up to 8
        spread over the run, the last included), a row per tile, labels above."""
        return self.tiles.strip(kind or self.kind, self.size, steps)

    def static_image(self):
        """The picture a saved notebook keeps: the strip over the steps for up to 4 tiles, else the
        grid of tiles at the step shown."""
        if self.n_tiles <= 4 and self.n_steps > 1:
            return self.tiles.strip(self.kind, min(self.size, 96))
        return self.tiles.grid(self.kind, min(self.size, 128), self.step)

    def save_gif(self, path, kind: str | None = None, fps: int | None = None):
        """An animated GIF of every step (all tiles side by side, labelled), written atomically."""
        return self.tiles.gif(path, kind or self.kind, self.size, fps or self.fps)

    # -- widgets ---------------------------------------------------------------------------------
    def _build(self):
        w = _widgets()
        if w is None or not self.n_steps:
            return
        size = self.size
        self.slider = w.IntSlider(value=self.step, min=0, max=self.n_steps - 1, step=1,
                                  description="step", continuous_update=True, readout=False,
                                  layout=w.Layout(width="320px"))
        self.play = w.Play(value=self.step, min=0, max=self.n_steps - 1, step=1,
                           interval=int(1000 / self.fps), description="play")
        w.jslink((self.play, "value"), (self.slider, "value"))
        self.toggle = None
        if len(self.kinds) > 1:
            self.toggle = w.ToggleButtons(options=[("x_t", "latent"), ("x0", "x0")], value=self.kind,
                                          tooltips=[L.KIND_LABEL["latent"], L.KIND_LABEL["x0"]],
                                          style={"button_width": "48px"})
            self.toggle.observe(self._on_kind, names="value")
        self.header = w.HTML(value=self._header_html())
        self.images_w = [w.Image(value=b or b"", format="png", width=size, height=size,
                                 layout=w.Layout(width=f"{size}px", height=f"{size}px"))
                         for b in self.images()]
        self.captions_w = [w.HTML(value=caption_html(c)) for c in self.captions()]
        tiles = [w.VBox([c, im], layout=w.Layout(align_items="flex-start", margin="0 6px 6px 0"))
                 for c, im in zip(self.captions_w, self.images_w)]
        self.grid = w.GridBox(tiles, layout=w.Layout(grid_template_columns=f"repeat({columns(self.n_tiles)}, {size + 6}px)"))
        controls = [self.play, self.slider] + ([self.toggle] if self.toggle is not None else [])
        self.widget = w.VBox([w.HBox(controls), self.header, self.grid, w.HTML(value=STATIC_HIDER)])
        self.widget.add_class(f"dlx-{self._name}")
        self.widget.add_class("dlx-view")
        self.slider.observe(self._on_step, names="value")

    def _header_html(self, note: str = "") -> str:
        note = f" · <i>{html.escape(note)}</i>" if note else ""
        return (f"<div style='font-family:monospace;font-size:13px'><b>{html.escape(self.title)}</b> · "
                f"{html.escape(L.KIND_LABEL[self.kind])}{note}<br>{html.escape(self.label())}</div>")

    def _refresh(self):
        if self.widget is None or self.busy:
            return
        for im, b in zip(self.images_w, self.images()):
            im.value = b or b""
        for cw, c in zip(self.captions_w, self.captions()):
            cw.value = caption_html(c)
        self.header.value = self._header_html()

    def _on_step(self, change):
        self.step = int(change["new"])
        self._refresh()

    def _on_kind(self, change):
        self.kind = change["new"]
        if self.tiles.ready(self.kind, self.size) or not in_kernel():
            self._refresh()  # no front end to keep responsive: render here
            return
        # not rendered yet: say so at once, keep the kernel free, fill in when the render is done
        self.busy = True
        self.toggle.disabled = True
        self.header.value = self._header_html(f"rendering {L.KIND_LABEL[self.kind]} for every step…")
        threading.Thread(target=self._finish_kind, name="dlx-toggle", daemon=True).start()

    def _finish_kind(self):
        try:
            self.tiles.png(self.kind, self.size)
        except Exception as e:  # noqa: BLE001 - shown where the user looks
            self.header.value = self._header_html(f"could not render: {type(e).__name__}: {e}")
            return
        finally:
            self.busy = False
            self.toggle.disabled = False
        self._refresh()

    def show_step(self, step: int):
        """Move the view to recorded step ``step`` (as dragging the slider does)."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step < self.n_steps:
            raise DlxError(f"argument `step` must be an int in [0, {self.n_steps}); got {step!r}")
        if self.widget is not None:
            self.slider.value = int(step)  # observers refresh
        else:
            self.step = int(step)

    # -- display ---------------------------------------------------------------------------------
    def __repr__(self):
        return (f"<{type(self).__name__}: {self.title}; {self.n_tiles} tile(s) × {self.n_steps} steps, "
                f"{L.KIND_LABEL[self.kind]}; {self.label() if self.n_steps else 'no steps'}>")

    def static_png(self) -> bytes:
        from ._io import png_bytes

        return png_bytes(self.static_image(), compress_level=6)

    def _ipython_display_(self):
        from IPython.display import display

        if self.widget is not None and in_kernel():
            display_static(self.widget, self.static_png(), repr(self))
        else:
            display(self._repr_mimebundle_(), raw=True)

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {"text/plain": repr(self)}
        if self.n_steps:
            bundle["image/png"] = self.static_png()
        return bundle


class Gallery(_StepView):
    """The previews of one trace over its steps: see :func:`gallery`."""

    _name = "gallery"


class Compare(_StepView):
    """Configs side by side over their steps: see :func:`compare`."""

    _name = "compare"


def gallery(trace, *, kind: str = "x0", samples=None, size: int | None = None, decoder="auto", fps: int = 4):
    """The trace's previews with a step slider, a Play button, an x_t / x0 toggle and a label that
    shows step, timestep, sigma, guidance scale and whether CFG ran; one tile per sample of the batch
    (``samples`` picks some), each captioned with its scale and CFG state.

    ``size``: pixels per tile (default from the tile count: 256 for one, 192 up to 4, 128 up to 16).
    ``decoder`` as in ``dlx.render.trace_previews`` (the zoo models decode with their own VAE). Every step of
    ``kind`` is rendered when the gallery is built, the other kind right after, in the background.
    """
    from .render import _check_size

    check_trace(trace)
    _check_size(size)
    kinds = kinds_of(trace)
    if kinds and kind not in kinds:
        raise DlxError(f"argument `kind` must be one of {list(kinds)} for this trace; got {kind!r}")
    tiles = trace_tiles(trace, samples, decoder)
    return Gallery(tiles, kind, size or tile_size(tiles.n_tiles), fps)


def compare(items, *, labels=None, kind: str = "x0", sample: int = 0, size: int | None = None, decoder="auto",
            metric: str | None = None, prompt=None, seed=None, fps: int = 4):
    """Configs side by side on one synchronised step slider, each tile labelled with its config.

    ``items``: a list (or dict label → trace) of traces: one tile each, sample ``sample``, captioned
    with its controls (``dlx.labels.config_label``), NFE and guided steps over the run, CFG on or
    off at the step shown, prompt and seed. Or a sweep result (``dlx.sweep``): one tile per config
    for one (prompt, seed) (default: the first), captioned with the config, NFE, the cost model's
    predicted time as a share of full guidance's, CFG at the step shown and ``metric``; its final
    images, or its per-step previews where the sweep kept them (``keep_previews=True``). Traces
    with fewer steps show their last step past their end.
    """
    from .render import _check_size

    _check_size(size)
    if hasattr(items, "frame") and hasattr(items, "previews"):
        return _compare_sweep(items, size=size, kind=kind, metric=metric, prompt=prompt, seed=seed, fps=fps)
    if isinstance(items, dict):
        labels = list(items) if labels is None else labels
        items = list(items.values())
    if not isinstance(items, (list, tuple)) or not items:
        raise DlxError(f"argument `items` must be a non-empty list of traces or a sweep result; got {type(items).__name__}")
    for t in items:
        check_trace(t, "items")
    if labels is not None and len(labels) != len(items):
        raise DlxError(f"argument `labels` has {len(labels)} entries for {len(items)} traces")
    names = [str(x) for x in labels] if labels is not None else [config_label(t, sample) for t in items]
    named: dict = {}
    for n, t in zip(names, items):
        named[n if n not in named else f"{n} #{len(named)}"] = t
    tiles = traces_tiles(named, sample, decoder)
    if kind not in tiles.kinds:
        raise DlxError(f"argument `kind` must be one of {list(tiles.kinds)} (recorded by every trace); got {kind!r}")
    return Compare(tiles, kind, size or tile_size(len(items)), fps)


def _compare_sweep(res, *, size, kind, metric, prompt, seed, fps):
    f = res.frame
    ok = f[f.status == "ok"]
    if ok.empty:
        raise DlxError(f"the sweep in {str(getattr(res, 'out', '?'))!r} has no finished rows to compare")
    metrics = [m for m in getattr(res, "metrics", []) if m in ok.columns]
    if metric is not None and metric not in metrics:
        raise DlxError(f"argument `metric` must be one of the sweep's metrics {metrics}; got {metric!r}")
    if kind != "x0":
        raise DlxError(f"argument `kind`: a sweep keeps x0 previews only; got {kind!r}")
    prompt = ok.prompt.iloc[0] if prompt is None else prompt
    seed = ok.seed.iloc[0] if seed is None else seed
    tiles = sweep_tiles(res, prompt, seed, metric or (metrics[0] if metrics else None), res.summary(), frame=f)
    return Compare(tiles, "x0", size or tile_size(tiles.n_tiles), fps)
