"""The denoiser tap: the one place where dlx intercepts the denoiser of a running pipeline.

diffusers does not hand the denoiser's conditional and unconditional predictions to callbacks,
and a callback that runs after each step can only *drop* the negative half of the batch. The tap
wraps ``forward`` of the denoiser (and of modules fed the same doubled batch, such as a
ControlNet) for the duration of one pipeline call. Per call it

1. asks the run for the step's guidance plan (which samples are guided, at which scale),
2. computes only the rows the plan needs (the unconditional rows of unguided samples are
   skipped, which is where a cutoff saves compute),
3. hands (cond, uncond, guided prediction) to observers such as the recorder, and
4. returns an output the pipeline's own CFG arithmetic leaves untouched: when the tap combines
   the predictions itself it returns ``[g, g]``, and ``g + s·(g − g) == g`` exactly.

With no plan (observers only), the original forward runs with the original arguments, so
recording never changes a result.
"""

from __future__ import annotations

import contextlib

import torch

_MISSING = object()


class DenoiserCall:
    """What one denoiser evaluation produced, split per CFG half (rows of the batch of B samples).

    ``uncond`` is None when no sample was guided; rows of unguided samples are NaN otherwise.
    ``guided`` holds the prediction the scheduler steps with. Passed as None, it is the
    pipeline's own combination ``lerp(uncond, cond, scale)``, computed on first access (one
    kernel per step saved when no observer needs it). Like ``cond`` and ``uncond`` (views of
    the denoiser's output, which a CUDA graph overwrites on its next replay), read it inside
    ``on_denoiser``.
    """

    __slots__ = ("step", "timestep", "x_in", "cond", "uncond", "_guided", "mask", "scale", "lerp_guided",
                 "pair")

    def __init__(self, step: int, timestep, x_in: torch.Tensor, cond: torch.Tensor,
                 uncond: torch.Tensor | None, guided: torch.Tensor | None, mask: tuple[bool, ...],
                 scale: torch.Tensor | float, pair: torch.Tensor | None = None):
        self.step = step
        self.timestep = timestep
        self.x_in = x_in  # denoiser input of the conditional rows (after scale_model_input)
        self.cond = cond
        self.uncond = uncond
        self._guided = guided
        self.mask = mask
        self.scale = scale
        #: ``guided`` is ``lerp(uncond, cond, scale)`` (the pipeline's own CFG): an observer may
        #: compute it, or what follows from it, later from copies of ``uncond`` and ``cond``
        self.lerp_guided = guided is None
        #: the denoiser's whole output when ``uncond`` and ``cond`` are its two halves, in that
        #: order (the pipeline's own CFG batch): one copy of it keeps both
        self.pair = pair

    @property
    def guided(self) -> torch.Tensor:
        g = self._guided
        if g is None:
            g = self._guided = torch.lerp(self.uncond, self.cond, self.scale)
        return g

    @guided.setter
    def guided(self, value: torch.Tensor) -> None:
        self._guided = value

    def __repr__(self) -> str:
        return (f"DenoiserCall(step={self.step}, cond={tuple(self.cond.shape)}, "
                f"uncond={'None' if self.uncond is None else tuple(self.uncond.shape)}, mask={self.mask}, "
                f"scale={self.scale!r})")


def _pred_of(out):
    if isinstance(out, tuple):
        return out[0]
    if isinstance(out, torch.Tensor):
        return out
    return out.sample  # a BaseOutput


def _with_pred(out, pred):
    if isinstance(out, tuple):
        return (pred, *out[1:])
    if isinstance(out, torch.Tensor):
        return pred
    out.sample = pred
    return out


def _take_rows(obj, n: int, idx):
    """Rows ``idx`` of every tensor in ``obj`` whose leading dim is the doubled batch ``n``."""
    if isinstance(obj, torch.Tensor):
        if obj.ndim > 0 and obj.shape[0] == n:
            return obj[idx] if isinstance(idx, slice) else obj.index_select(0, idx.to(obj.device))
        return obj
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_take_rows(o, n, idx) for o in obj)
    if isinstance(obj, dict):
        return {k: _take_rows(v, n, idx) for k, v in obj.items()}
    return obj


def _first_tensor(args, kwargs, names=("sample", "hidden_states")):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for n in names:
        if isinstance(kwargs.get(n), torch.Tensor):
            return kwargs[n]
    raise RuntimeError("dlx could not find the latent input of the denoiser call")


def _timestep_of(args, kwargs):
    if len(args) > 1:
        return args[1]
    return kwargs.get("timestep")


class Tap:
    """Wraps the forward of the run's denoiser (and doubled-batch side modules) for one call."""

    def __init__(self, run):
        self.run = run
        self.family = run.family
        self._saved: list[tuple[torch.nn.Module, str, object]] = []
        self._call_name: str | None = None  # Flux: "cond" / "uncond" from cache_context
        self._rows = None  # rows computed at this step (shared by denoiser and side modules)
        self._cond_out = None  # Flux: this step's cond output, reused when uncond is skipped

    # -- install / remove -------------------------------------------------------------------
    def _patch(self, module, name, value):
        self._saved.append((module, name, module.__dict__.get(name, _MISSING)))
        object.__setattr__(module, name, value)

    def install(self):
        pipe = self.run.pipe
        den = getattr(pipe, self.family.denoiser)
        orig = den.forward
        if self.family.cfg == "calls":
            self._patch(den, "forward", self._wrap_calls(orig))
            orig_ctx = den.cache_context

            @contextlib.contextmanager
            def cache_context(name, *a, **k):
                prev, self._call_name = self._call_name, name
                try:
                    with orig_ctx(name, *a, **k):
                        yield
                finally:
                    self._call_name = prev

            self._patch(den, "cache_context", cache_context)
        else:
            self._patch(den, "forward", self._wrap_batch(orig, denoiser=True))
            for side in self.family.extra_doubled_modules:
                mod = getattr(pipe, side, None)
                if mod is not None:
                    self._patch(mod, "forward", self._wrap_batch(mod.forward, denoiser=False))

    def remove(self):
        while self._saved:
            module, name, prev = self._saved.pop()
            if prev is _MISSING:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, prev)

    # -- batch-doubled CFG (SD, SDXL, SD3, ControlNet) ------------------------------------------
    def _wrap_batch(self, orig, denoiser: bool):
        run = self.run
        pipe = run.pipe

        def forward(*args, **kwargs):
            x = _first_tensor(args, kwargs)
            n = x.shape[0]
            if not run.loop_started:
                run.before_denoiser(x)  # a ControlNet runs before the UNet: the loop starts there
            # read every call: a callback may end CFG mid-run (diffusers' cutoff callbacks do)
            cfg = bool(getattr(pipe, "do_classifier_free_guidance", False))
            if not cfg or n % 2 or n // 2 != run.batch_hint(n // 2):
                # No CFG batch (or an extra cond-only call such as SD3 skip-layer guidance).
                out = orig(*args, **kwargs)
                if denoiser:
                    run.count_nfe(n, cond=True)
                    if not cfg:
                        pred = _pred_of(out)
                        run.observe(
                            DenoiserCall(run.step, _timestep_of(args, kwargs), x, pred, None, pred,
                                         (False,) * n, 1.0)
                        )
                return out
            b = n // 2
            plan = run.plan(b)
            if plan.passthrough:
                out = orig(*args, **kwargs)
                if denoiser:
                    run.count_nfe(b, True, plan.mask)
                    if run.wants_calls:
                        pred = _pred_of(out)
                        u, c = pred.chunk(2)
                        # guided=None: lerp(u, c, scale) when an observer reads it (the pipeline
                        # combines its own prediction)
                        run.observe(
                            DenoiserCall(run.step, _timestep_of(args, kwargs), x[b:], c, u, None,
                                         plan.mask, plan.default, pair=pred)
                        )
                return out
            guided = [i for i, m in enumerate(plan.mask) if m]
            if not guided:
                rows = slice(b, n)  # a view: bitwise the same rows diffusers' own cutoff keeps
            elif len(guided) == b:
                rows = slice(0, n)  # all rows (a scale schedule): no index tensor to copy to the device
            else:
                rows = torch.tensor(guided + list(range(b, n)), dtype=torch.long)
            out = orig(*_take_rows(args, n, rows), **_take_rows(kwargs, n, rows))
            if not denoiser:
                return out  # side module outputs already have the sub-batch's rows
            pred = _pred_of(out)
            k = len(guided)
            c = pred[k:]
            run.count_nfe(b, cond=True, uncond=plan.mask)
            if k == 0:
                u = None
                g = c
            else:
                u_sub = pred[:k]
                # every sample guided: a slice, else an index (a host-to-device copy, which syncs)
                gidx = slice(0, b) if k == b else torch.tensor(guided, device=pred.device)
                s = plan.scale_rows(guided, pred)
                g = c.clone()
                g[gidx] = u_sub + s * (c[gidx] - u_sub)
                rescale = float(getattr(run.pipe, "guidance_rescale", 0.0) or 0.0)
                if rescale > 0:
                    # the pipeline would rescale against the conditional prediction (arXiv
                    # 2305.08891, per sample); on [g, g] its own rescale is then the identity
                    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

                    g[gidx] = rescale_noise_cfg(g[gidx], c[gidx], guidance_rescale=rescale)
                u = None
                if run.wants_calls:
                    u = torch.full_like(c, float("nan"))
                    u[gidx] = u_sub
            if run.wants_calls:
                run.observe(
                    DenoiserCall(run.step, _timestep_of(args, kwargs), x[b:], c, u, g, plan.mask,
                                 plan.scale_value())
                )
            return _with_pred(out, torch.cat([g, g]))

        return forward

    # -- two-call CFG (Flux true CFG) -----------------------------------------------------------
    def _wrap_calls(self, orig):
        run = self.run

        def forward(*args, **kwargs):
            x = _first_tensor(args, kwargs)
            b = x.shape[0]
            name = self._call_name
            if name != "uncond":
                if not run.loop_started:
                    run.before_denoiser(x)
                out = orig(*args, **kwargs)
                run.count_nfe(b, cond=True)
                self._cond_out = (run.step, out)
                if run.wants_calls:
                    pred = _pred_of(out)
                    run.pending_cond = (x, pred, _timestep_of(args, kwargs))
                return out
            run.flux_true_cfg = True
            plan = run.plan(b)
            step, cond_out = self._cond_out
            c = _pred_of(cond_out)
            guided = [i for i, m in enumerate(plan.mask) if m]
            if plan.passthrough:
                out = orig(*args, **kwargs)
                u = _pred_of(out)
            elif not guided:
                # neg = cond makes the pipeline's neg + s·(cond − neg) equal cond exactly.
                out = _with_pred(cond_out, c.clone() if isinstance(cond_out, tuple) else c)
                u = None
            else:
                rows = torch.tensor(guided, dtype=torch.long)
                sub = orig(*_take_rows(args, b, rows), **_take_rows(kwargs, b, rows))
                u_sub = _pred_of(sub)
                u_full = c.clone()
                u_full[rows.to(c.device)] = u_sub
                out = _with_pred(cond_out, u_full)
                u = torch.full_like(c, float("nan"))
                u[rows.to(c.device)] = u_sub
            run.count_nfe(b, cond=False, uncond=plan.mask)
            if run.wants_calls:
                s = run.flux_scale
                if u is None:
                    g = c
                elif plan.passthrough:
                    g = u + s * (c - u)
                else:  # unguided rows of u are NaN: they keep the conditional prediction
                    g = torch.where(torch.isnan(u), c, u + s * (c - u))
                run.observe(DenoiserCall(step, _timestep_of(args, kwargs), x, c, u, g, plan.mask, s))
                run.pending_cond = None
            return out

        return forward
