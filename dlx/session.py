"""``dlx.attach``: run a pipeline's calls with parts attached, and leave the pipeline as it was found.

``with dlx.attach(pipe, *parts): pipe(...)`` runs every call of ``pipe`` inside the block with the
parts. The protocol between a call, the denoiser tap (``dlx._tap``), the run (``dlx.run``) and the
parts is documented on ``dlx.protocol.Part``. Here: the wrapper of ``__call__``, the callback
chain the pipeline sees, and putting everything back in ``finally``.

A part instance belongs to one run at a time: using it in two calls at once is refused.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading

from . import _args
from . import _diffusers as D
from ._tap import Tap
from .errors import DlxError
from .families import check_tensor_inputs, family_of
from .protocol import Guide, Part, RunInfo
from .run import Run, overrides
from .share import Share

__all__ = ["attach", "Part", "Run", "Guide", "RunInfo"]


# Part instances in a running call, and denoisers tapped by an attach block: two threads must not
# share either (a part's per-run state, a denoiser's forward).
_LOCK = threading.Lock()
_PARTS_IN_USE: dict[int, "Run"] = {}
_TAPPED: dict[int, str] = {}


class _Chain:
    """The callback the pipeline sees: parts, then the caller's callback, then ``runs_last`` parts."""

    def __init__(self, run: Run, user_cb, tensor_inputs: list[str]):
        self.run = run
        self.user_cb = user_cb
        self.tensor_inputs = tensor_inputs

    def __call__(self, pipe, step, timestep, callback_kwargs):
        return self.run.step_end(step, timestep, callback_kwargs, self.user_cb)


@functools.lru_cache(maxsize=64)
def _signature(fn):
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def bind_call(orig_call, pipe, args, kwargs) -> dict:
    """The call's arguments by name, the pipeline's defaults filled in."""
    sig = _signature(orig_call)
    if sig is None:
        return dict(kwargs)
    try:
        bound = sig.bind(pipe, *args, **kwargs)
    except TypeError:
        return dict(kwargs)  # the pipeline will say what is wrong
    bound.apply_defaults()
    out = {}
    for name, value in list(bound.arguments.items())[1:]:
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif sig.parameters[name].kind is not inspect.Parameter.VAR_POSITIONAL:
            out[name] = value
    return out


class _Session:
    def __init__(self, pipe, parts, per_sample=None, scales=None):
        self.pipe = pipe
        self.family = family_of(pipe)
        self.parts = list(parts)
        self.per_sample = per_sample
        self.scales = scales
        self.run: Run | None = None
        shares = [p for p in self.parts if isinstance(p, Share)]
        if len(shares) > 1:
            raise DlxError(f"attach at most one dlx.Share; got {len(shares)}")
        self.share = shares[0] if shares else None
        for j, ps in enumerate(per_sample or [[]]):
            for attr, what in (("sets_scale", "set the guidance scale"), ("sets_rule", "set the guidance rule")):
                setters = [p for p in [*self.parts, *ps] if getattr(p, attr)]
                if len(setters) > 1:
                    where = f" of sample {j}" if per_sample is not None else ""
                    raise DlxError(
                        f"two attached parts{where} {what} ({type(setters[0]).__name__} and "
                        f"{type(setters[1]).__name__}); attach at most one")
        for j, ps in enumerate(per_sample or [[]]):
            both = [*self.parts, *ps]
            sc = next((p for p in both if p.sets_scale), None)
            ru = next((p for p in both if p.sets_rule), None)
            if sc is not None and ru is not None:
                where = f" on sample {j}" if per_sample is not None else ""
                raise DlxError(
                    f"{type(sc).__name__} sets the guidance scale and {type(ru).__name__} the guidance rule{where}: "
                    f"a rule guides at its own scale, so the schedule would be ignored; use one of them")
        setters = [p for ps in [self.parts, *(per_sample or [])] for p in ps if p.sets_scale]
        if (setters or scales is not None) and not self.family.scale_schedules:
            raise DlxError(
                f"guidance scale schedules are not supported on {self.family.name} "
                f"({type(setters[0]).__name__ if setters else 'per-sample scales'}): the pipeline applies its "
                f"scale itself; use masks (cutoffs, intervals) only"
            )
        if self.share is not None and not self.family.share:
            raise DlxError(f"dlx.Share is not supported on {self.family.name} pipelines (two denoiser calls per step)")

    def modules(self) -> list:
        mods = [getattr(self.pipe, self.family.denoiser, None)]
        mods += [getattr(self.pipe, n, None) for n in self.family.extra_doubled_modules]
        return [m for m in mods if m is not None]

    def call(self, orig_call, pipe, args, kwargs):
        if self.run is not None:
            raise DlxError(
                f"{type(pipe).__name__} is already running a call inside this dlx block (a call from "
                f"a callback or another thread); one call at a time"
            )
        user_cb = kwargs.pop("callback_on_step_end", None)
        user_inputs = kwargs.pop("callback_on_step_end_tensor_inputs", None)
        if user_cb is not None and hasattr(user_cb, "tensor_inputs") and user_inputs is None:
            user_inputs = list(user_cb.tensor_inputs)
        elif user_cb is not None and user_inputs is None:
            user_inputs = ["latents"]  # diffusers' default for callback_on_step_end
        inputs: list[str] = []
        for name in [*(user_inputs or []), *(n for p in self.parts for n in p.tensor_inputs)]:
            if name not in inputs:
                inputs.append(name)
        check_tensor_inputs(pipe, inputs)
        order = D.scheduler_order(pipe.scheduler)
        if order > 1:
            raise DlxError(
                f"{type(pipe.scheduler).__name__} is a second-order scheduler ({order} denoiser evaluations "
                f"per step, and a loop of 2N − 1 iterations): dlx cannot count or cut whole steps of it; "
                f"use a first-order scheduler (Euler, DDIM, DPM-Solver++)"
            )
        call = bind_call(orig_call, pipe, args, kwargs)
        run = Run(self, pipe, call)
        every = [*self.parts, *(p for ps in (self.per_sample or []) for p in ps)]
        with _LOCK:
            busy = [p for p in every if id(p) in _PARTS_IN_USE]
            if busy:
                raise DlxError(
                    f"{busy[0]!r} is in use by another running pipeline call; a part holds one run's state: "
                    f"create one instance per concurrent run"
                )
            for p in every:
                _PARTS_IN_USE[id(p)] = run
        try:
            self._prepare_switch(run, call, inputs)
            saved = D.saved_flags(pipe)
            run.ip_processors = D.ip_adapter_processors(getattr(pipe, self.family.denoiser, None))
            ip_scales = [(p, list(p.scale)) for p in run.ip_processors]
            tap = Tap(run)
            started: list[Part] = []
            self.run = run
            run.mark_call("start")
            try:
                for p in every:
                    p.on_run_start(run)
                    started.append(p)
                tap.install()
                kwargs["callback_on_step_end"] = _Chain(run, user_cb, inputs)
                kwargs["callback_on_step_end_tensor_inputs"] = inputs
                return orig_call(pipe, *args, **kwargs)
            except BaseException as e:
                run.error = e
                raise
            finally:
                run.mark_call("return")
                tap.remove()
                self.run = None
                try:
                    run.finish_record()
                    _end_parts(run, started)
                finally:
                    for proc, scale in ip_scales:
                        proc.scale = scale
                    if run.loop_flags is not None:  # as the call set them: a plain call leaves them so
                        D.restore_flags(pipe, run.loop_flags)
                    else:
                        D.restore_flags(pipe, saved)
        finally:
            with _LOCK:
                for p in every:
                    if _PARTS_IN_USE.get(id(p)) is run:
                        del _PARTS_IN_USE[id(p)]

    def _prepare_switch(self, run: Run, call: dict, inputs: list[str]) -> None:
        """Decide before the call whether an unguided tail may take the pipeline out of CFG, and
        ask for the doubled callback tensors that switch needs."""
        fam = self.family
        if not fam.cfg_switch or not (run._tail_parts or run.per_sample):
            return
        exposed = D.callback_tensor_inputs(self.pipe)
        if not all(n in exposed for n in fam.cfg_switch):
            return  # e.g. SD3 img2img exposes no pooled embeddings: the tap keeps every step
        if call.get("ip_adapter_image") is not None or call.get("ip_adapter_image_embeds") is not None:
            return  # the IP-Adapter image embeddings are doubled in locals no callback can reach
        if call.get("skip_guidance_layers") is not None:
            return  # SD3 skip-layer guidance runs only inside the pipeline's CFG branch
        names = list(fam.cfg_switch) + [n for n in fam.cfg_switch_also if n in exposed]
        run._switch_names = tuple(names)
        for n in names:
            if n not in inputs:
                inputs.append(n)


def _end_parts(run: Run, parts: list[Part]) -> None:
    """``on_run_end`` of every part, those with ``runs_last`` after the others; each runs even when
    another raises. The first such error is raised after all ran, unless the call itself raised
    (its error wins; the others are attached to it as notes)."""
    errors = []
    for p in [p for p in parts if not p.runs_last] + [p for p in parts if p.runs_last]:
        try:
            p.on_run_end(run, run.error)
        except BaseException as e:  # noqa: BLE001 - every part's end must run
            errors.append((p, e))
    if not errors:
        return
    if run.error is not None:
        for p, e in errors:
            if hasattr(run.error, "add_note"):
                run.error.add_note(f"dlx: {type(p).__name__}.on_run_end also raised {type(e).__name__}: {e}")
        return
    raise errors[0][1]


def _check_per_sample(per_sample, scales):
    if per_sample is not None:
        if isinstance(per_sample, (str, bytes)) or not isinstance(per_sample, (list, tuple)) or not per_sample:
            raise DlxError(f"argument `per_sample` must be a non-empty list with one list of controls per sample; "
                           f"got {per_sample!r}")
        per_sample = [list(ps) if isinstance(ps, (list, tuple)) else [ps] for ps in per_sample]
        for j, ps in enumerate(per_sample):
            for p in ps:
                if not isinstance(p, Part):
                    raise DlxError(f"argument `per_sample[{j}]` must hold dlx controls; got {p!r}")
                if p.runs_last or overrides(p, "on_step_end"):
                    raise DlxError(f"argument `per_sample[{j}]`: {type(p).__name__} acts at the end of each step, "
                                   f"for the whole batch; attach it to the call, not per sample")
    if scales is not None:
        if isinstance(scales, (str, bytes)) or not isinstance(scales, (list, tuple)) or not scales:
            raise DlxError(f"argument `scales` must be a non-empty list of guidance scales, one per sample; got {scales!r}")
        scales = [_args.finite(f"scales[{j}]", s, minimum=0) for j, s in enumerate(scales)]
        if per_sample is not None and len(scales) != len(per_sample):
            raise DlxError(f"argument `scales` has {len(scales)} values but `per_sample` has {len(per_sample)}")
    return per_sample, scales


@contextlib.contextmanager
def attach(pipe, *parts: Part, per_sample=None, scales=None):
    """Run every call of ``pipe`` inside the block with ``parts`` attached.

    ``per_sample``: one list of controls per sample of the call (a sweep's rows: each sample its
    own config); each is asked with the run as its sample alone sees it (``RunInfo.sample``), and
    its guide is combined with the attached controls' by the one rule (``protocol.combine``).
    ``scales``: the guidance scale of each sample (the call's ``guidance_scale`` must be > 1, so
    that the pipeline builds the unconditional batch; refused at the loop's start otherwise); a
    sample at a scale <= 1 is never guided, as a call at that scale is not. Per-sample parts see
    the whole run at run start and end (``run.record`` holds each sample's counts).

    At each step end: the parts in the order given, then the caller's own
    ``callback_on_step_end``, then the parts with ``runs_last`` (recorders, previews, ``Interrupt``).

    What changes on the pipeline, and when:

    * for the whole block, the instance's class is a subclass whose ``__call__`` wraps the
      original (``type(pipe)`` is restored on exit);
    * during each call: ``forward`` of the denoiser (and of a ControlNet) is replaced by the tap
      (``cache_context`` too on Flux); the call's ``callback_on_step_end`` is a chain around the
      caller's own, with the callback tensors the parts need added; parts may set the
      pipeline's interrupt flag (``Interrupt``) and IP-Adapter scales (``IPAdapterCutoff``); when
      no sample is guided for the rest of the run the guidance scale is set to 0 and the
      doubled callback tensors halved, as diffusers' cutoff callbacks do.

    After each call, also when it raises, the tap is removed, IP-Adapter scales are put back,
    and the guidance scale and interrupt flag are as the call itself set them (as after a plain
    call; as before the call if it failed before its loop). Two blocks may not tap one denoiser
    at once (pipelines built from shared components): the second is refused.
    """
    for p in parts:
        if not isinstance(p, Part):
            raise DlxError(f"attach() takes dlx parts (Recorder, CFGCutoff, ...); got {p!r}")
    per_sample, scales = _check_per_sample(per_sample, scales)
    every = [*parts, *(p for ps in (per_sample or []) for p in ps)]
    if len({id(p) for p in every}) != len(every):
        raise DlxError("attach() got the same part twice")
    cls = type(pipe)
    try:
        family_of(pipe)
    except DlxError as e:
        raise DlxError(f"argument `pipe` ({cls.__name__}): {e}") from None
    if getattr(cls, "_dlx_session", None) is not None:
        raise DlxError(f"this {cls.__name__} is already attached to a dlx block; attach all parts at once")
    session = _Session(pipe, parts, per_sample, scales)
    mods = session.modules()
    with _LOCK:
        taken = [_TAPPED[id(m)] for m in mods if id(m) in _TAPPED]
        if taken:
            raise DlxError(
                f"the {session.family.denoiser} of this {cls.__name__} is already tapped by another dlx block "
                f"(on a {taken[0]} sharing it); two blocks cannot tap one denoiser at once: end that "
                f"block first, or attach to one pipeline"
            )
        for m in mods:
            _TAPPED[id(m)] = cls.__name__
    try:
        orig_call = cls.__call__

        def __call__(self, *args, **kwargs):
            return session.call(orig_call, self, args, kwargs)

        swapped = type(cls.__name__, (cls,), {
            "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "_dlx_session": session,
        })
        D.swap_class(pipe, swapped)
        try:
            yield session
        finally:
            D.swap_class(pipe, cls)
    finally:
        with _LOCK:
            for m in mods:
                _TAPPED.pop(id(m), None)

