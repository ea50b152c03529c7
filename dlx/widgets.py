"""Jupyter views of the denoising loop: :func:`gallery`, :func:`compare`, :func:`live`.

Thin views (ipywidgets 8, imported when a view is built): the pictures come from
:mod:`dlx.render`, the numbers from the trace or the sweep's frame. Every image is rendered once,
as PNG bytes at the size it is shown (enlarged by whole-pixel blocks, so the browser does not
rescale it); moving a slider only picks cached bytes. Outside a notebook (no kernel, or no
ipywidgets) each view still works: its text ``repr`` describes it and it displays as a PNG strip
(``.strip()``), and ``.save_gif(path)`` exports it.

    g = dlx.widgets.gallery(trace)          # step slider, Play, x_t / x0 toggle, per-sample tiles
    dlx.widgets.compare([t_full, t_cut])    # configs side by side on one slider
    run = dlx.widgets.live(pipe, prompt="...", num_inference_steps=25)   # Stop button; run.trace
"""

from __future__ import annotations

import math
import numbers
import threading

from .errors import DlxError

__all__ = ["gallery", "compare", "live", "tile_size", "columns"]

_KIND_LABEL = {"x0": "x0 (denoised estimate)", "latent": "x_t (noisy latent)"}


# --- layout ----------------------------------------------------------------------------------------


def tile_size(n: int) -> int:
    """Pixels per tile side for ``n`` tiles: large for one, smaller as the grid grows."""
    return 256 if n <= 1 else 192 if n <= 4 else 128 if n <= 16 else 96


def columns(n: int) -> int:
    """Grid columns for ``n`` tiles: one row up to 3, then a square-ish grid (2×2, 3×3, 4×4), at most 8."""
    return max(1, n) if n <= 3 else min(8, math.ceil(math.sqrt(n)))


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def _widgets():
    try:
        import ipywidgets
    except ImportError:  # pragma: no cover - ipywidgets is a dependency
        return None
    return ipywidgets


def _fmt(v, spec=".3g"):
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return format(v, spec) if isinstance(v, numbers.Real) and not isinstance(v, bool) else str(v)


def _step_label(trace, i: int, samples=None) -> str:
    """Step, timestep, sigma, guidance scale and whether CFG ran, for recorded step ``i``, over
    the samples shown (``samples``; default all)."""
    s = trace.steps[i]
    n = trace.meta.get("num_steps") or len(trace.steps)
    idx = range(len(s.cfg_active)) if samples is None else [j for j in samples if j < len(s.cfg_active)]
    b, k = len(idx), sum(bool(s.cfg_active[j]) for j in idx)
    cfg = (f"CFG on {k}/{b} samples" if b > 1 else "CFG on") if k else "CFG off"
    sc = [s.guidance_scale[j] for j in idx if j < len(s.guidance_scale)]
    sc = [v for v in sc if v == v]  # NaN: not known
    if sc and min(sc) != max(sc):  # samples guided at different scales: their range, not a mean
        scale = f"{_fmt(min(sc), '.3g')}–{_fmt(max(sc), '.3g')} per sample"
    else:
        scale = _fmt(sc[0] if sc else None, ".3g")
    return (f"step {s.index + 1}/{n} · t={_fmt(s.timestep, '.0f')} · σ={_fmt(s.sigma)} · "
            f"scale {scale} · {cfg}")


def _sample_prompt(trace, j: int) -> str | None:
    call = trace.meta.get("call") or {}
    p = call.get("prompt")
    if isinstance(p, list) and p:
        per = max(1, int(call.get("num_images_per_prompt") or 1))
        p = p[min(j // per, len(p) - 1)]
    return p if isinstance(p, str) else None


def _sample_label(trace, i: int, j: int) -> str:
    s = trace.steps[i]
    parts = [f"sample {j}"]
    p = _sample_prompt(trace, j)
    if p is not None and isinstance((trace.meta.get("call") or {}).get("prompt"), list):
        parts.append(repr(p if len(p) <= 40 else p[:39] + "…"))
    if j < len(s.guidance_scale):
        parts.append(f"scale {_fmt(float(s.guidance_scale[j]), '.3g')}")
    if j < len(s.cfg_active):
        parts.append("CFG ✓" if s.cfg_active[j] else "CFG –")
    return " · ".join(parts)


class _Frames:
    """PNG bytes per (kind, step, tile), rendered for a whole kind at once and cached."""

    def __init__(self, render, n_steps: int, size: int):
        self._render = render  # kind -> list (steps) of list (tiles) of uint8 (h, w, 3) tensors or None
        self.n_steps = n_steps
        self.size = size
        self._png: dict[str, list[list[bytes | None]]] = {}
        self.rgb: dict[str, list] = {}

    def get(self, kind: str) -> list[list[bytes | None]]:
        if kind not in self._png:
            from .render import png_bytes

            rgb = self._render(kind)
            self.rgb[kind] = rgb
            self._png[kind] = [[None if t is None else png_bytes(t, self.size) for t in row] for row in rgb]
        return self._png[kind]


# --- the shared view -------------------------------------------------------------------------------


class _StepView:
    """Tiles over steps: a slider (and Play), an optional x_t / x0 toggle, a label, captions."""

    _name = "view"

    def __init__(self, frames: _Frames, kinds, kind, captions, step_label, title: str, fps: int = 4):
        self.frames = frames
        self.kinds = tuple(kinds)
        if kind not in self.kinds:
            raise DlxError(f"argument `kind` must be one of {list(self.kinds)}; got {kind!r}")
        self.kind = kind
        self._captions = captions  # (step, tile) -> str
        self._step_label = step_label  # step -> str
        self.title = title
        self.n_tiles = len(captions(0)) if frames.n_steps else 0
        self.fps = fps
        self.step = frames.n_steps - 1
        self.frames.get(kind)  # render now: the slider then only picks bytes
        self.widget = None
        self._build()

    # -- state, without a front end -----------------------------------------------------------------
    def images(self, step: int | None = None, kind: str | None = None) -> list[bytes | None]:
        """The PNG bytes of every tile at ``step`` (default: the one shown) for ``kind``."""
        step = self.step if step is None else step
        return self.frames.get(kind or self.kind)[step]

    def label(self, step: int | None = None) -> str:
        return self._step_label(self.step if step is None else step)

    def strip(self, steps=None, kind: str | None = None):
        """A PNG strip (PIL image), ``steps × samples``: a column per step shown (default: up to 8
        spread over the run, the last included), a row per tile, labels above."""
        from .report import _steps_shown, strip_image

        kind = kind or self.kind
        steps = _steps_shown(self.frames.n_steps) if steps is None else list(steps)
        for i in steps:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < self.frames.n_steps:
                raise DlxError(f"argument `steps` holds {i!r}, not a step in [0, {self.frames.n_steps})")
        self.frames.get(kind)
        rgb = self.frames.rgb[kind]
        last = steps[-1] if steps else 0
        return strip_image([[rgb[i][j] for i in steps] for j in range(self.n_tiles)],
                           col_labels=[self._short_label(i) for i in steps],
                           row_labels=self._captions(last) if self.n_tiles > 1 else None, size=self.frames.size,
                           title=f"{self.title} · {_KIND_LABEL[kind]}")

    def _short_label(self, i: int) -> str:
        parts = self.label(i).split(" · ")
        return " · ".join(p for p in parts if not p.startswith(("t=", "scale")))

    def save_gif(self, path, kind: str | None = None, fps: int | None = None):
        """An animated GIF of every step (all tiles side by side, labelled), written atomically."""
        from .report import save_gif

        kind = kind or self.kind
        self.frames.get(kind)
        rgb = self.frames.rgb[kind]
        return save_gif(path, [[rgb[i][j] for j in range(self.n_tiles)] for i in range(self.frames.n_steps)],
                        labels=[self.label(i) for i in range(self.frames.n_steps)],
                        col_labels=self._captions(0), size=self.frames.size, fps=fps or self.fps)

    # -- widgets ---------------------------------------------------------------------------------
    def _build(self):
        w = _widgets()
        if w is None or not self.frames.n_steps:
            return
        size = self.frames.size
        n = self.n_tiles
        self.slider = w.IntSlider(value=self.step, min=0, max=self.frames.n_steps - 1, step=1,
                                  description="step", continuous_update=True, readout=False,
                                  layout=w.Layout(width="320px"))
        self.play = w.Play(value=self.step, min=0, max=self.frames.n_steps - 1, step=1,
                           interval=int(1000 / self.fps), description="play")
        w.jslink((self.play, "value"), (self.slider, "value"))
        self.toggle = None
        if len(self.kinds) > 1:
            self.toggle = w.ToggleButtons(options=[("x_t", "latent"), ("x0", "x0")], value=self.kind,
                                          tooltips=[_KIND_LABEL["latent"], _KIND_LABEL["x0"]],
                                          style={"button_width": "48px"})
            self.toggle.observe(self._on_kind, names="value")
        self.header = w.HTML(value=self._header_html())
        self.images_w = [w.Image(value=b or b"", format="png", width=size, height=size,
                                 layout=w.Layout(width=f"{size}px", height=f"{size}px"))
                         for b in self.images()]
        self.captions_w = [w.HTML(value=self._caption_html(c)) for c in self._captions(self.step)]
        tiles = [w.VBox([c, im], layout=w.Layout(align_items="flex-start", margin="0 6px 6px 0"))
                 for c, im in zip(self.captions_w, self.images_w)]
        cols = columns(n)
        self.grid = w.GridBox(tiles, layout=w.Layout(grid_template_columns=f"repeat({cols}, {size + 6}px)"))
        controls = [self.play, self.slider] + ([self.toggle] if self.toggle is not None else [])
        self.widget = w.VBox([w.HBox(controls), self.header, self.grid])
        self.widget.add_class(f"dlx-{self._name}")
        self.slider.observe(self._on_step, names="value")

    def _header_html(self) -> str:
        import html

        return (f"<div style='font-family:monospace;font-size:13px'><b>{html.escape(self.title)}</b> · "
                f"{html.escape(_KIND_LABEL[self.kind])}<br>{html.escape(self.label())}</div>")

    @staticmethod
    def _caption_html(text: str) -> str:
        import html

        # one inline box per " · " part: a narrow tile (128 px for 16 samples) wraps its caption
        # between parts, never inside one ("scale" / "6"), and inside a part only if it alone is too wide
        parts = text.split(" · ")
        spans = " ".join(f"<span style='display:inline-block;max-width:100%;overflow-wrap:anywhere'>"
                         f"{html.escape(p)}{' ·' if k < len(parts) - 1 else ''}</span>" for k, p in enumerate(parts))
        return f"<div style='font-family:monospace;font-size:12px;line-height:1.2'>{spans}</div>"

    def _refresh(self):
        if self.widget is None:
            return
        for im, b in zip(self.images_w, self.images()):
            im.value = b or b""
        for cw, c in zip(self.captions_w, self._captions(self.step)):
            cw.value = self._caption_html(c)
        self.header.value = self._header_html()

    def _on_step(self, change):
        self.step = int(change["new"])
        self._refresh()

    def _on_kind(self, change):
        self.kind = change["new"]
        self._refresh()

    def show_step(self, step: int):
        """Move the view to recorded step ``step`` (as dragging the slider does)."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step < self.frames.n_steps:
            raise DlxError(f"argument `step` must be an int in [0, {self.frames.n_steps}); got {step!r}")
        if self.widget is not None:
            self.slider.value = int(step)  # observers refresh
        else:
            self.step = int(step)

    # -- display ---------------------------------------------------------------------------------
    def __repr__(self):
        return (f"<{type(self).__name__}: {self.title}; {self.n_tiles} tile(s) × {self.frames.n_steps} steps, "
                f"{_KIND_LABEL[self.kind]}; {self.label() if self.frames.n_steps else 'no steps'}>")

    def _repr_mimebundle_(self, include=None, exclude=None):
        if self.widget is not None and _in_kernel():
            return self.widget._repr_mimebundle_(include=include, exclude=exclude)
        bundle = {"text/plain": repr(self)}
        if self.frames.n_steps:
            from .render import png_bytes

            bundle["image/png"] = png_bytes(self.strip())
        return bundle


class Gallery(_StepView):
    """The previews of one trace over its steps: see :func:`gallery`."""

    _name = "gallery"


class Compare(_StepView):
    """Configs side by side over their steps: see :func:`compare`."""

    _name = "compare"


# --- gallery -----------------------------------------------------------------------------------------


def _check_trace(trace, what="trace"):
    from .trace import Trace

    if not isinstance(trace, Trace):
        raise DlxError(f"argument `{what}` must be a dlx.Trace; got {type(trace).__name__}")


def _kinds_of(trace) -> tuple[str, ...]:
    f = trace.fields()
    return tuple(k for k, name in (("latent", "latents"), ("x0", "x0")) if name in f)


def gallery(trace, *, kind: str = "x0", samples=None, size: int | None = None, decoder="auto", fps: int = 4):
    """The trace's previews with a step slider, a Play button, an x_t / x0 toggle and a label that
    shows step, timestep, sigma, guidance scale and whether CFG ran; one tile per sample of the batch
    (``samples`` picks some), each captioned with its scale and CFG state.

    ``size``: pixels per tile (default from the tile count: 256 for one, 192 up to 4, 128 up to 16).
    ``decoder`` as in ``trace.previews`` (the zoo models decode with their own VAE). Every step of
    ``kind`` is rendered when the gallery is built, the other kind on its first toggle.
    """
    from .render import _check_size, render_steps

    _check_trace(trace)
    _check_size(size)
    kinds = _kinds_of(trace)
    if not kinds:
        raise DlxError(f"gallery() needs 'x0' or 'latents' recorded; this trace recorded {trace.fields()}")
    if kind not in kinds:
        raise DlxError(f"argument `kind` must be one of {list(kinds)} for this trace; got {kind!r}")
    batch = getattr(trace.steps[0], "x0" if kind == "x0" else "latents").shape[0] if trace.steps else 0
    samples = list(range(batch)) if samples is None else list(samples)
    for j in samples:
        if isinstance(j, bool) or not isinstance(j, numbers.Integral) or not 0 <= j < batch:
            raise DlxError(f"argument `samples` holds {j!r}, not a sample of this batch of {batch}")
    size = size or tile_size(len(samples))

    def render(k):
        rgb = render_steps(trace, k, samples, decoder=decoder)
        return [[rgb[i, j] for j in range(len(samples))] for i in range(rgb.shape[0])]

    title = f"{trace.meta.get('pipeline', 'trace')} · {_prompt_of(trace)}"
    return Gallery(_Frames(render, len(trace.steps), size), kinds, kind,
                   lambda i: [_sample_label(trace, i, j) for j in samples], lambda i: _step_label(trace, i, samples), title, fps)


def _prompt_of(trace) -> str:
    p = (trace.meta.get("call") or {}).get("prompt")
    if isinstance(p, list):
        if len(set(p)) != 1:
            return f"{len(p)} prompts"
        p = p[0]
    return repr(p) if p else "(prompt embeddings)"


# --- compare -----------------------------------------------------------------------------------------


def config_label(trace) -> str:
    """What made this trace differ: its controls and their arguments (from ``meta["parts"]``)."""
    skip = {"Recorder", "Preview", "Interrupt"}
    out = []
    for p in trace.meta.get("parts") or []:
        if not isinstance(p, dict) or p.get("type") in skip:
            continue
        cfg = p.get("config") if isinstance(p.get("config"), dict) else {
            k: v for k, v in p.items() if k != "type" and isinstance(v, (int, float, str, bool)) and len(str(v)) < 24}
        args = ", ".join(f"{k}={_fmt(v)}" for k, v in list(cfg.items())[:3])
        out.append(f"{p.get('type', '?')}({args})")
    return " + ".join(out) if out else "full CFG"


def _trace_summary(trace, sample: int) -> str:
    nfe = trace.nfe
    nfe = nfe[sample] if isinstance(nfe, list) and len(nfe) > sample else nfe
    ms = [s.step_ms for s in trace.steps if s.step_ms == s.step_ms]
    t = f" · {sum(ms) / 1e3:.2f} s loop" if ms else ""
    return f"NFE {_fmt(nfe, '.3g')}{t}"


def compare(items, *, labels=None, kind: str = "x0", sample: int = 0, size: int | None = None, decoder="auto",
            metric: str | None = None, prompt=None, seed=None, fps: int = 4):
    """Configs side by side on one synchronised step slider, each tile labelled with its config.

    ``items``: a list (or dict label → trace) of traces (one tile each, sample ``sample``, labelled
    with its controls, NFE and loop time), or a sweep result (``dlx.sweep``): one tile per config
    for one (prompt, seed), labelled with cutoff, NFE, predicted time and ``metric``; its final
    images by default, its per-step previews where the sweep kept them (``keep_previews=True``).
    Traces with fewer steps show their last step past their end.
    """
    if hasattr(items, "frame") and hasattr(items, "previews"):
        return _compare_sweep(items, kind=kind, size=size, metric=metric, prompt=prompt, seed=seed, fps=fps)
    from .render import _check_size, render_steps

    _check_size(size)
    if isinstance(items, dict):
        labels = list(items) if labels is None else labels
        items = list(items.values())
    if not isinstance(items, (list, tuple)) or not items:
        raise DlxError(f"argument `items` must be a non-empty list of traces or a sweep result; got {type(items).__name__}")
    for t in items:
        _check_trace(t, "items")
    if labels is not None and len(labels) != len(items):
        raise DlxError(f"argument `labels` has {len(labels)} entries for {len(items)} traces")
    kinds = tuple(k for k in ("latent", "x0") if all(k in _kinds_of(t) for t in items))
    if kind not in kinds:
        raise DlxError(f"argument `kind` must be one of {list(kinds)} (recorded by every trace); got {kind!r}")
    names = [str(x) for x in labels] if labels is not None else [config_label(t) for t in items]
    n_steps = max(len(t.steps) for t in items)
    size = size or tile_size(len(items))

    def render(k):
        per = [render_steps(t, k, [sample], decoder=decoder)[:, 0] for t in items]
        return [[p[min(i, p.shape[0] - 1)] if p.shape[0] else None for p in per] for i in range(n_steps)]

    def captions(i):
        return [f"{name} · {_trace_summary(t, sample)}" for name, t in zip(names, items)]

    def step_label(i):
        ref = max(items, key=lambda t: len(t.steps))
        return _step_label(ref, min(i, len(ref.steps) - 1)).split(" · scale")[0]

    return Compare(_Frames(render, n_steps, size), kinds, kind, captions, step_label,
                   f"{len(items)} configs · sample {sample}", fps)


def _compare_sweep(res, *, kind, size, metric, prompt, seed, fps):
    import torch
    from PIL import Image

    f = res.frame
    f = f[f.status == "ok"] if "status" in f.columns else f
    if f.empty:
        raise DlxError(f"the sweep in {str(getattr(res, 'out', '?'))!r} has no finished rows to compare")
    prompt = f.prompt.iloc[0] if prompt is None else prompt
    seed = f.seed.iloc[0] if seed is None else seed
    g = f[(f.prompt == prompt) & (f.seed == seed)]
    if g.empty:
        raise DlxError(f"arguments `prompt`/`seed`: no finished rows for prompt={prompt!r}, seed={seed!r}")
    g = g.drop_duplicates("config")
    metrics = [m for m in getattr(res, "metrics", []) if m in g.columns]
    if metric is not None and metric not in g.columns:
        raise DlxError(f"argument `metric` must be one of the sweep's metrics {metrics}; got {metric!r}")
    metric = metric or (metrics[0] if metrics else None)
    tcols = [c for c in g.columns if c.startswith("time_") and c.endswith("_s")]
    rows = list(g.itertuples(index=False))
    previews = []
    for r in rows:
        try:
            previews.append(res.previews(r.row_id))
        except DlxError:
            previews.append(None)
    per_step = all(p is not None for p in previews)
    if kind != "x0" and per_step:
        raise DlxError(f"argument `kind`: a sweep keeps x0 previews only; got {kind!r}")

    def final(r):
        if not isinstance(r.image, str):  # NaN: failed, or its PNG is missing
            return None
        with Image.open(r.image) as im:
            return torch.from_numpy(__import__("numpy").asarray(im.convert("RGB")).copy())

    n_steps = max(p.shape[0] for p in previews) if per_step else 1
    size = size or tile_size(len(rows))

    def render(k):
        if per_step:
            return [[p[min(i, p.shape[0] - 1)] for p in previews] for i in range(n_steps)]
        return [[final(r) for r in rows]]

    def captions(i):
        out = []
        for r in rows:
            bits = [str(r.config)]
            if r.cutoff == r.cutoff and "cutoff" not in str(r.config):
                bits.append(f"cutoff {_fmt(r.cutoff, '.2g')}")
            bits.append(f"NFE {_fmt(r.nfe, '.3g')}")
            if tcols:
                bits.append(f"{_fmt(getattr(r, tcols[0]), '.3g')} s")
            if metric:
                bits.append(f"{metric} {_fmt(getattr(r, metric), '.3g')}")
            out.append(" · ".join(bits))
        return out

    def step_label(i):
        return f"step {i + 1}/{n_steps}" if per_step else "final images"

    what = "x0 previews kept by the sweep" if per_step else "final images (run with keep_previews=True for steps)"
    return Compare(_Frames(render, n_steps, size), ("x0",), "x0", captions, step_label,
                   f"sweep · prompt {prompt!r} · seed {seed} · {what}", fps)


# --- live ------------------------------------------------------------------------------------------


class Live:
    """A generation running off the kernel's main thread, with its preview and a Stop button.

    ``trace`` and ``output`` (the pipeline's return value) are set when the run ends; ``error`` holds
    what it raised. ``stop()`` (or the button) sets ``event``, which :class:`dlx.Interrupt` reads at
    the end of each step; ``wait()`` blocks until the run has ended and returns the trace.
    """

    def __init__(self, pipe, call_kwargs, *, kind, size, decoder, every, record):
        import dlx

        self.pipe = pipe
        self.event = threading.Event()
        self.kind = kind
        self.size = size
        self.steps_seen = 0
        self.trace = None
        self.output = None
        self.error = None
        self.last_png: bytes | None = None
        self._call_kwargs = dict(call_kwargs)
        self._n = call_kwargs.get("num_inference_steps")
        self._preview = dlx.Preview(self._on_preview, kind=kind, size=size, decoder=decoder, every=every)
        self._interrupt = dlx.Interrupt(event=self.event)
        self._record = record
        self.widget = None
        self._build()
        self.thread = threading.Thread(target=self._run, name="dlx-live", daemon=True)
        self.thread.start()

    def _build(self):
        w = _widgets()
        if w is None:
            return
        self.image_w = w.Image(value=b"", format="png", width=self.size, height=self.size,
                               layout=w.Layout(width=f"{self.size}px", height=f"{self.size}px"))
        self.label_w = w.HTML(value=self._label_html("starting…"))
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop",
                                    tooltip="end the run after the current step (dlx.Interrupt)")
        self.stop_button.on_click(lambda _b: self.stop())
        self.widget = w.VBox([w.HBox([self.stop_button, self.label_w]), self.image_w])
        self.widget.add_class("dlx-live")

    @staticmethod
    def _label_html(text):
        import html

        return f"<div style='font-family:monospace;font-size:13px;padding:6px'>{html.escape(text)}</div>"

    def _status(self, text):
        if self.widget is not None:
            self.label_w.value = self._label_html(text)

    def _on_preview(self, step, image):
        from .render import png_bytes

        self.steps_seen += 1
        self.last_png = png_bytes(image.pil())
        if self.widget is not None:
            self.image_w.value = self.last_png
        n = f"/{self._n}" if self._n else ""
        self._status(f"step {step + 1}{n} · {_KIND_LABEL[self.kind]}")

    def _run(self):
        import dlx

        try:
            if self._record:
                with dlx.record(self.pipe, self._preview, self._interrupt) as trace:
                    self.trace = trace
                    self.output = self.pipe(**self._call_kwargs)
            else:
                with dlx.attach(self.pipe, self._preview, self._interrupt):
                    self.output = self.pipe(**self._call_kwargs)
        except BaseException as e:  # noqa: BLE001 - kept for the user, shown in the label
            self.error = e
            self._status(f"failed: {type(e).__name__}: {e}")
            return
        reason = self.trace.stop_reason if self.trace is not None else None
        done = f"stopped early ({reason})" if self.event.is_set() else "finished"
        self._status(f"{done} after {self.steps_seen} preview(s)")
        if self.widget is not None:
            self.stop_button.disabled = True

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self):
        """Ask the run to end after the step in progress (sets ``event``)."""
        self.event.set()
        self._status("stopping after this step…")

    def wait(self, timeout: float | None = None):
        """Block until the run ends; re-raise its error; return the trace (``record=False``: the output)."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise DlxError(f"the live run is still going after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.trace if self._record else self.output

    def __repr__(self):
        state = "running" if self.running else ("failed" if self.error else "done")
        return f"<Live {type(self.pipe).__name__}: {state}, {self.steps_seen} preview(s), stop requested={self.event.is_set()}>"

    def _repr_mimebundle_(self, include=None, exclude=None):
        if self.widget is not None and _in_kernel():
            return self.widget._repr_mimebundle_(include=include, exclude=exclude)
        bundle = {"text/plain": repr(self)}
        if self.last_png:
            bundle["image/png"] = self.last_png
        return bundle


def live(pipe, *, kind: str = "x0", size: int = 256, decoder="auto", every: int = 1, record: bool = True,
         **call_kwargs):
    """Run ``pipe(**call_kwargs)`` on a worker thread, showing its preview as it goes and a Stop
    button that ends it through ``dlx.Interrupt(event=...)`` (the partial latents are still decoded).

    The kernel stays free while it runs, so the button works; the returned :class:`Live` holds
    ``trace`` (recorded unless ``record=False``), ``output``, ``stop()`` and ``wait()``. ``kind``,
    ``decoder`` and ``every`` are ``dlx.Preview``'s; ``size`` is the preview's side in pixels.
    """
    from .families import family_of
    from .render import _check_decoder, _check_size

    family_of(pipe)  # a clear error now for a pipeline dlx does not know, not on the worker thread
    if kind not in _KIND_LABEL:
        raise DlxError(f"argument `kind` must be one of {list(_KIND_LABEL)}; got {kind!r}")
    _check_size(size)
    _check_decoder(decoder)
    if "callback_on_step_end" in call_kwargs and not callable(call_kwargs["callback_on_step_end"]):
        raise DlxError(f"argument `callback_on_step_end` must be callable; got {call_kwargs['callback_on_step_end']!r}")
    return Live(pipe, call_kwargs, kind=kind, size=size, decoder=decoder, every=every, record=record)
