"""A generation running off the kernel's main thread, with its preview, progress and a Stop button.

``live(pipe, **call)`` starts ``pipe(**call)`` on a worker thread with a :class:`dlx.Preview` (the
picture) and a :class:`dlx.Interrupt` (the Stop button sets its event), records it unless
``record=False``, and returns a :class:`Live` at once: the kernel stays free, so the button works.
The view shows the prompt, seed and guidance scale, a progress bar, "step k/N" counted from 1, and
when the run ends one sentence saying why. Displayed in a notebook it also leaves a static PNG of
the last preview and that sentence (updated when the run ends), which a saved notebook keeps.
"""

from __future__ import annotations

import html
import inspect
import threading

from . import labels as L
from . import _args
from .errors import DlxError

__all__ = ["Live", "live"]


def _seed_of(gen):
    if isinstance(gen, (list, tuple)):
        return [_seed_of(g) for g in gen]
    try:
        return int(gen.initial_seed())
    except (AttributeError, RuntimeError):
        return None


def _default(pipe, name):
    try:
        p = inspect.signature(type(pipe).__call__).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if p is None or p.default is inspect.Parameter.empty else p.default


class Live:
    """A generation running on a worker thread (see :func:`live`).

    ``trace`` and ``output`` (the pipeline's return value) are set when the run ends; ``error`` holds
    what it raised; ``status`` is the sentence the view shows. ``stop()`` (or the button) sets
    ``event``, which :class:`dlx.Interrupt` reads at the end of each step; ``wait()`` blocks until
    the run has ended and returns the trace.
    """

    def __init__(self, pipe, call_kwargs, *, kind, size, decoder, every, record):
        from .interrupt import Interrupt
        from .preview import Preview

        self.pipe = pipe
        self.event = threading.Event()
        self.kind = kind
        self.size = size
        self.steps_seen = 0  # previews shown
        self.step = 0  # steps done (1-based count of the last step previewed)
        self.trace = None
        self.output = None
        self.error = None
        self.last_png: bytes | None = None
        self.last_image = None
        self._call_kwargs = dict(call_kwargs)
        self.n_steps = call_kwargs.get("num_inference_steps") or _default(pipe, "num_inference_steps")
        scale = call_kwargs.get("guidance_scale", _default(pipe, "guidance_scale"))
        prompt = call_kwargs.get("prompt")
        seed = _seed_of(call_kwargs.get("generator"))
        self.about = " · ".join([
            L.prompt_of_call(prompt),
            f"seed {seed}" if seed is not None else "seed: not given (random)",
            f"scale {L.fmt(scale, '.3g')}" if scale is not None else "scale: the pipeline's default"])
        self.status = "starting…"
        self._display_id = None
        self._preview = Preview(self._on_preview, kind=kind, size=size, decoder=decoder, every=every)
        self._interrupt = Interrupt(event=self.event)
        self._record = record
        self.widget = None
        self._build()
        self.thread = threading.Thread(target=self._run, name="dlx-live", daemon=True)
        self.thread.start()

    # -- the view ---------------------------------------------------------------------------------
    def _build(self):
        try:
            import ipywidgets as w
        except ImportError:  # pragma: no cover - ipywidgets is a dependency
            return
        from ._notebook import STATIC_HIDER

        self.image_w = w.Image(value=b"", format="png", width=self.size, height=self.size,
                               layout=w.Layout(width=f"{self.size}px", height=f"{self.size}px"))
        self.about_w = w.HTML(value=self._html(self.about, bold=True))
        self.progress_w = w.IntProgress(value=0, min=0, max=max(1, self.n_steps or 1), description="",
                                        layout=w.Layout(width="240px"))
        self.label_w = w.HTML(value=self._html(self.status))
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop",
                                    tooltip="end the run after the current step (dlx.Interrupt)")
        self.stop_button.on_click(lambda _b: self.stop())
        self.widget = w.VBox([self.about_w, w.HBox([self.stop_button, self.progress_w, self.label_w]), self.image_w,
                              w.HTML(value=STATIC_HIDER)])
        self.widget.add_class("dlx-live")
        self.widget.add_class("dlx-view")

    @staticmethod
    def _html(text, bold=False):
        t = html.escape(text)
        return f"<div style='font-family:monospace;font-size:13px;padding:6px'>{'<b>' + t + '</b>' if bold else t}</div>"

    def _set_status(self, text):
        self.status = text
        if self.widget is not None:
            self.label_w.value = self._html(text)

    def _on_preview(self, step, image):
        from ._io import png_bytes

        self.steps_seen += 1
        self.step = step + 1
        self.last_image = image.pil()
        self.last_png = png_bytes(self.last_image)
        if self.widget is not None:
            self.image_w.value = self.last_png
            self.progress_w.value = self.step
        n = f"/{self.n_steps}" if self.n_steps else ""
        stopping = " · stopping after this step…" if self.event.is_set() else ""
        self._set_status(f"step {self.step}{n} · {L.KIND_LABEL[self.kind]}{stopping}")

    def _run(self):
        from .recorder import record
        from .session import attach

        try:
            if self._record:
                with record(self.pipe, self._preview, self._interrupt) as trace:
                    self.trace = trace
                    self.output = self.pipe(**self._call_kwargs)
            else:
                with attach(self.pipe, self._preview, self._interrupt):
                    self.output = self.pipe(**self._call_kwargs)
        except BaseException as e:  # noqa: BLE001 - kept for the user, shown in the label
            self.error = e
            self._set_status(f"Failed after {self.step} step(s): {type(e).__name__}: {e}")
        else:
            self._set_status(self._why_it_ended())
        finally:
            if self.widget is not None:
                self.stop_button.disabled = True
            self._update_static()

    def _why_it_ended(self) -> str:
        done = len(self.trace.steps) if self.trace is not None else self.step
        n = self.n_steps
        of = f" of {n}" if n else ""
        if self.event.is_set():
            return f"Stopped by the Stop button after step {done}{of}."
        if n and done < n:
            reason = self.trace.stop_reason if self.trace is not None else None
            return f"Ended early after step {done}{of}" + (f": {reason}." if reason else ".")
        return f"Finished: all {done} steps ran."

    # -- control ----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self):
        """Ask the run to end after the step in progress (sets ``event``)."""
        self.event.set()
        if self.running:
            self._set_status(f"stopping after step {self.step + 1}…")

    def wait(self, timeout: float | None = None):
        """Block until the run ends; re-raise its error; return the trace (``record=False``: the output)."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise DlxError(f"the live run is still going after {timeout} s")
        self._update_static()  # from the kernel's thread too: the saved notebook keeps the last picture
        if self.error is not None:
            raise self.error
        return self.trace if self._record else self.output

    # -- display ----------------------------------------------------------------------------------
    def __repr__(self):
        state = "running" if self.running else ("failed" if self.error else "done")
        return (f"<Live {type(self.pipe).__name__}: {state}; {self.about}; step {self.step}/{self.n_steps or '?'}; "
                f"{self.status}>")

    def static_png(self) -> bytes:
        """The last preview under the prompt, seed, scale and status (what a saved notebook keeps)."""
        from ._io import png_bytes
        from .tiles import strip_image

        tile = self.last_image
        if tile is None:
            from PIL import Image

            tile = Image.new("RGB", (8, 8), (238, 238, 238))
        im = strip_image([[tile]], row_labels=[self.status], size=min(self.size, 256),
                         title=f"live run · {self.about}")
        return png_bytes(im, compress_level=6)

    def _update_static(self):
        if self._display_id is None:
            return
        try:
            from IPython.display import update_display

            update_display({"image/png": self.static_png(), "text/plain": repr(self)}, raw=True,
                           display_id=self._display_id)
        except Exception:  # noqa: BLE001 - the widget still shows the run
            pass

    def _ipython_display_(self):
        from IPython.display import display

        from ._notebook import display_static, in_kernel

        if self.widget is not None and in_kernel():
            import uuid

            self._display_id = uuid.uuid4().hex
            display_static(self.widget, self.static_png(), repr(self), display_id=self._display_id)
            if not self.running:
                self._update_static()
        else:
            display(self._repr_mimebundle_(), raw=True)

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/plain": repr(self), "image/png": self.static_png()}


def live(pipe, *, kind: str = "x0", size: int = 256, decoder="auto", every: int = 1, record: bool = True,
         **call_kwargs):
    """Run ``pipe(**call_kwargs)`` on a worker thread, showing its preview as it goes, the prompt,
    seed and scale, a progress bar, and a Stop button that ends it through
    ``dlx.Interrupt(event=...)`` (the partial latents are still decoded).

    The kernel stays free while it runs, so the button works; the returned :class:`Live` holds
    ``trace`` (recorded unless ``record=False``), ``output``, ``status``, ``stop()`` and ``wait()``.
    ``kind``, ``decoder`` and ``every`` are ``dlx.Preview``'s; ``size`` is the preview's side in pixels.
    """
    from .families import family_of
    from .render import _check_decoder, _check_size

    family_of(pipe)  # a clear error now for a pipeline dlx does not know, not on the worker thread
    if kind not in L.KIND_LABEL:
        raise DlxError(f"argument `kind` must be one of {list(L.KIND_LABEL)}; got {kind!r}")
    _check_size(size)
    _check_decoder(decoder)
    if "callback_on_step_end" in call_kwargs and not callable(call_kwargs["callback_on_step_end"]):
        raise DlxError(f"argument `callback_on_step_end` must be callable; got {call_kwargs['callback_on_step_end']!r}")
    if call_kwargs.get("num_inference_steps") is not None:  # else diffusers' ZeroDivisionError on the worker
        _args.steps("num_inference_steps", call_kwargs["num_inference_steps"])
    return Live(pipe, call_kwargs, kind=kind, size=size, decoder=decoder, every=every, record=record)
