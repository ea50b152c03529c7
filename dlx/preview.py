"""Live previews: :class:`Preview`, a part that hands ``fn(step, image)`` a view of x_t or x0 at
every step, and :class:`PreviewImage`, the lazily rendered image it hands over.

The rendering itself (latent→RGB maps, Flux unpacking, VAE/TAESD decoding, fitting, PNG bytes)
lives in :mod:`dlx.render`, which imports no part machinery; its names are re-exported here so
``from dlx.preview import latents_to_rgb`` keeps working.

Cost: nothing is copied to the host until a preview is shown: :class:`Preview` hands the user's
function a :class:`PreviewImage` that holds what the step's preview needs on the device and
becomes a PIL image on first use (one sync and an H·W·3-byte copy).
"""

from __future__ import annotations

import numbers

import torch

from .errors import DlxError
from .families import denoised_as, family_of, prediction_type
from .render import (  # noqa: F401  (re-exported: the preview API as it was)
    _KINDS,
    LATENT_RGB,
    LatentRGB,
    _check_fits,
    _check_sample,
    _check_size,
    _check_decoder,
    _check_taesd,
    _render,
    _split_decoder,
    decoder_for,
    fit_latent_rgb,
    latent_rgb,
    latents_to_rgb,
    png_bytes,
    taesd_to_rgb,
    to_pil,
    trace_previews,
    unpack_latents,
    upscale,
    vae_to_rgb,
)
from .protocol import Part
from .run import Run

__all__ = [
    "LatentRGB",
    "LATENT_RGB",
    "latent_rgb",
    "latents_to_rgb",
    "unpack_latents",
    "taesd_to_rgb",
    "vae_to_rgb",
    "to_pil",
    "PreviewImage",
    "Preview",
    "trace_previews",
    "fit_latent_rgb",
]


class PreviewImage:
    """One step's preview: a uint8 (h, w, 3) tensor on the device of the run, made when first used.

    A live :class:`Preview` keeps, per step, only what the preview needs (a copy of one sample's
    latent, or of its predictions, and the denoiser input) and maps it to RGB when the image is
    first used: ``.tensor`` (the uint8 tensor, on the device), ``.pil()`` (or any PIL attribute:
    ``save``, ``resize``, ``size``, …, and notebook display), which then costs one device sync
    and an h·w·3-byte copy. A ``fn`` that only holds images (a gallery showing some of them
    later) adds a copy or two per step to the run and nothing else.
    """

    __slots__ = ("step", "_tensor", "_make", "_size", "_pil")

    def __init__(self, step: int, tensor: torch.Tensor | None = None, size: int | None = 128, *, make=None):
        if (tensor is None) == (make is None):
            raise DlxError("PreviewImage takes a uint8 tensor or a function that makes one (make=), not both")
        self.step = step
        self._tensor = tensor
        self._make = make
        self._size = size
        self._pil = None

    @property
    def tensor(self) -> torch.Tensor:
        """The uint8 (h, w, 3) preview at latent resolution, on the run's device (made on first use)."""
        if self._tensor is None:
            self._tensor = self._make()
            self._make = None  # drop the step's copies
        return self._tensor

    @property
    def rendered(self) -> bool:
        return self._tensor is not None

    @property
    def converted(self) -> bool:
        return self._pil is not None

    def pil(self):
        if self._pil is None:
            self._pil = to_pil(self.tensor, self._size)
        return self._pil

    def __getattr__(self, name):
        if name.startswith("__") or name in PreviewImage.__slots__:
            raise AttributeError(name)
        return getattr(self.pil(), name)

    def __array__(self, dtype=None, copy=None):
        import numpy as np

        return np.asarray(self.pil(), dtype=dtype)

    def _repr_png_(self):
        return self.pil()._repr_png_()

    def __repr__(self):
        if self._tensor is None:
            return f"PreviewImage(step={self.step}, size={self._size}, not rendered yet)"
        t = self._tensor
        state = "converted" if self._pil is not None else "on device, not converted"
        return f"PreviewImage(step={self.step}, {tuple(t.shape)} uint8 on {t.device}, size={self._size}, {state})"



class Preview(Part):
    """Live previews: after each step, ``fn(step, image)`` gets a :class:`PreviewImage`.

    ``kind="x0"`` previews the denoised estimate (needs the denoiser's prediction: attach with
    ``dlx.attach(pipe, Preview(fn))`` or ``dlx.record(pipe, Preview(fn))``); ``kind="latent"``
    previews x_t and also works as a plain ``callback_on_step_end``. ``every=n`` previews every
    n-th step and the last. ``decoder``/``factors``/``taesd`` as in :func:`trace_previews`; with
    ``decoder="auto"`` a pipeline whose VAE is known to be small (the ``dlx.zoo`` models) is
    previewed through its own ``pipe.vae``, any other through its family's map.

    Cost per previewed step: one or two small copies on the device (our sample's latent, or its
    predictions), no host sync. The x0 estimate and the map to RGB run on the device when the
    image is first used (the run's first preview checks at once that the map fits the latents);
    a ``fn`` that shows every image as it comes pays that, one sync and a small copy per step, as
    the guide's snippet does. It never changes the run.
    """

    runs_last = True  # after the other parts and the caller's callback: it shows each step's final latents

    def __init__(self, fn, kind: str = "x0", *, size: int | None = 128, sample: int = 0, factors=None,
                 taesd=None, every: int = 1, decoder="auto"):
        if not callable(fn):
            raise DlxError(f"argument `fn` must be callable as fn(step, image); got {fn!r}")
        if kind not in _KINDS:
            raise DlxError(f"argument `kind` must be one of {list(_KINDS)}; got {kind!r}")
        _check_size(size)
        if isinstance(sample, bool) or not isinstance(sample, numbers.Integral) or sample < 0:
            raise DlxError(f"argument `sample` must be a non-negative int; got {sample!r}")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise DlxError(f"argument `every` must be a positive int; got {every!r}")
        _check_decoder(decoder)
        factors, taesd = _split_decoder(factors, taesd)
        _check_taesd(taesd)
        if factors is not None:
            factors = latent_rgb(factors)  # fail now on a bad name, not mid-run
        self.fn = fn
        self.kind = kind
        self.size = size
        self.sample = int(sample)
        self.factors = factors
        self.taesd = taesd
        self.decoder = decoder
        self.every = int(every)
        self._use = (factors, taesd)
        self.wants_calls = kind == "x0"
        self.tensor_inputs = ["latents"] if kind == "latent" else []
        self.report: dict = {}
        self._pending: dict[int, torch.Tensor] = {}
        self._checked = False

    def __repr__(self):
        return f"Preview(kind={self.kind!r}, size={self.size}, sample={self.sample}, every={self.every})"

    def _due(self, step: int, num_steps) -> bool:
        return step % self.every == 0 or (num_steps is not None and step == num_steps - 1)

    @staticmethod
    def _layout(pipe, call_kwargs):
        # Flux unpacking uses the call's size; without one the grid must be square (Flux's default size is).
        hw = (call_kwargs.get("height"), call_kwargs.get("width"))
        vsf = getattr(pipe, "vae_scale_factor", None) if hw[0] is not None else None
        return hw, vsf

    def _emit(self, step, make):
        self.report["previews"] = self.report.get("previews", 0) + 1
        self.fn(int(step), PreviewImage(int(step), size=self.size, make=make))

    def _later(self, like, fam, what, hw, vsf, compute=None):
        """A function that maps our sample's latents to RGB when called: ``compute()`` (x0 from the
        step's kept tensors) or else ``like`` itself. ``like`` has the layout of the latents to
        render: the run's first preview checks that the map fits it."""
        factors, taesd = self._use
        if not self._checked:
            _check_fits(like, fam, factors, taesd, hw, vsf, what)
            self._checked = True

        def make():
            return _render(like if compute is None else compute(), fam, factors, taesd, hw, vsf, what)[0]
        return make

    def _latent_later(self, lat, fam, what, hw, vsf):
        """``_later`` for x_t: a copy of our sample of the step's latents (the pipeline replaces them)."""
        _check_sample(self.sample, lat.shape[0])
        return self._later(lat[self.sample:self.sample + 1].clone(), fam, what, hw, vsf)

    # -- attached --------------------------------------------------------------------------------
    def on_run_start(self, run: Run):
        self._pending = {}
        self.report = {"kind": self.kind, "previews": 0}
        self._x0_kind = None
        self._checked = False
        self._use = (self.factors, self.taesd)

    def _resolve(self, pipe):
        """The map or VAE this run's previews use (``decoder_for`` with the pipeline's own VAE)."""
        self._use = decoder_for(getattr(pipe, "name_or_path", None), decoder=self.decoder, factors=self.factors,
                                taesd=self.taesd, vae=getattr(pipe, "vae", None))

    def on_loop_start(self, run: Run):
        self._resolve(run.pipe)
        self._hw, self._vsf = self._layout(run.pipe, run.call)
        self._what = type(run.pipe).__name__
        if self.kind == "x0":
            self._x0_kind = prediction_type(run.family, run.pipe.scheduler)

    def on_denoiser(self, run: Run, call):
        step = call.step
        if step in self._pending or not self._due(step, run.num_steps):
            return  # extra evaluations (Heun, skip-layer guidance): the first one is the step's
        i = self.sample
        if i >= call.x_in.shape[0]:
            _check_sample(i, call.x_in.shape[0])
        s = slice(i, i + 1)
        # Copies of the predictions our sample's x0 needs, now: a CUDA graph overwrites its
        # outputs on the next replay. The denoiser input is the pipeline's own tensor, which no
        # pipeline changes after the call: kept as it is, and checked when the image is made.
        # The arithmetic waits until the image is used.
        x = call.x_in[s]
        version = x._version
        kind, sigma = self._x0_kind, run.sigma(step)
        if call.lerp_guided:  # the pipeline's own CFG: guided = lerp(uncond, cond, scale)
            pair = call.pair
            if pair is not None and pair.shape[0] == 2:  # batch 1: both halves in one copy
                u, c = pair.clone().chunk(2)
            else:
                u, c = call.uncond[s].clone(), call.cond[s].clone()
            w, g = call.scale, None
        else:
            g = c = call.guided[s].clone()
            u = w = None

        def x0():
            if x._version != version:
                raise DlxError(
                    f"the denoiser input of step {step} was changed in place after the step, so its x0 "
                    f"preview cannot be made; make previews as they come (fn calling image.pil()) or "
                    f"use kind='latent'"
                )
            return denoised_as(kind, x, torch.lerp(u, c, w) if g is None else g, sigma)
        self._pending[step] = self._later(c, run.family, self._what, self._hw, self._vsf, compute=x0)

    def on_step_end(self, run: Run, step, timestep, callback_kwargs):
        if self.kind == "x0":
            make = self._pending.pop(step, None)
        elif self._due(step, run.num_steps):
            make = self._latent_later(callback_kwargs["latents"], run.family, self._what, self._hw, self._vsf)
        else:
            make = None
        if make is not None:
            self._emit(step, make)
        return callback_kwargs

    def on_run_end(self, run: Run, error):
        self._pending = {}

    # -- plain callback_on_step_end --------------------------------------------------------------
    def __call__(self, pipe, step, timestep, callback_kwargs):
        run = Run.current(pipe)
        if run is not None and self in run.parts:
            return self.on_step_end(run, step, timestep, callback_kwargs)
        if self.kind == "x0":
            raise DlxError(
                "Preview(kind='x0') needs the denoiser's prediction, which callbacks do not see: attach it "
                "(`with dlx.attach(pipe, Preview(fn)): pipe(...)`) or use kind='latent' as a plain callback"
            )
        if "latents" not in callback_kwargs:
            raise DlxError("Preview(kind='latent') reads `latents`: pass callback_on_step_end_tensor_inputs=['latents']")
        if step == 0:
            self.report = {"kind": self.kind, "previews": 0}
            self._checked = False
            self._resolve(pipe)
        if self._due(step, getattr(pipe, "num_timesteps", None)):
            # Not attached: the call's height/width are unknown, so Flux latents must form a square grid.
            self._emit(step, self._latent_later(callback_kwargs["latents"], family_of(pipe), type(pipe).__name__,
                                                (None, None), None))
        return callback_kwargs
