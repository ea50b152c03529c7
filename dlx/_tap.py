"""The denoiser tap: the one place where dlx intercepts the denoiser of a running pipeline.

diffusers does not hand the denoiser's conditional and unconditional predictions to callbacks,
and a callback that runs after each step can only *drop* the negative half of the batch. The tap
wraps ``forward`` of the denoiser (and of modules fed the same doubled batch, such as a
ControlNet) for the duration of one pipeline call. Per call it

1. asks the run for the step's guidance plan (which samples are guided, at which scale),
2. computes only the rows the plan needs (the unconditional rows of unguided samples are
   skipped, which is where a cutoff saves compute),
3. hands (cond, uncond, guided prediction) to the parts that read denoiser calls (``wants_calls``:
   the recorder, ``AdaptiveCutoff``), and
4. returns an output the pipeline's own CFG arithmetic leaves untouched: when the tap combines
   the predictions itself it returns ``[g, g]``, and ``g + s·(g − g) == g`` exactly.

With no plan (no control attached), the original forward runs with the original arguments, so
recording never changes a result.

(Over 400 lines: one idea, the interception, in its three shapes: the doubled CFG batch, a call
without it, and Flux's two calls per step; split, each would re-read the others' per-step state.)
"""

from __future__ import annotations

import contextlib
import threading

import torch

from . import _diffusers as D
from .protocol import DenoiserCall


class _Output:
    """A denoiser output with only ``sample`` (a step whose every sample is zeroed)."""

    def __init__(self, sample):
        self.sample = sample

    def __getitem__(self, i):
        return (self.sample,)[i]


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
    if isinstance(idx, slice):
        return D.map_batch(obj, n, lambda t: t[idx])
    return D.map_batch(obj, n, lambda t: t.index_select(0, idx.to(t.device)))


def _batch_tensors(obj, n: int) -> list:
    """Every tensor in ``obj`` (nested) whose leading dim is ``n``."""
    out: list = []
    D.map_batch(obj, n, lambda x: out.append(x) or x)
    return out


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
    """Wraps the forward of the run's denoiser (and doubled-batch side modules) for one call.

    It emits events to the run (loop start, evaluations counted, denoiser calls observed) and
    reads the run's plan; it keeps its own per-step state (rows taken, Flux's pending call).
    Calls from another thread than the run's, or made from inside the run's step-end callback
    (a plain call of a pipeline sharing the denoiser), go straight to the original forward.
    """

    def __init__(self, run):
        self.run = run
        self.family = run.family
        self._saved: list = []
        self._call_name: str | None = None  # Flux: "cond" / "uncond" from cache_context
        self._rows: tuple | None = None  # (step, rows taken, ...): shared by denoiser and side modules
        self._single_rows: tuple | None = None  # the same for steps without the CFG batch (Share)
        self._cond_out = None  # Flux: this step's cond output, reused when uncond is skipped
        self._pending_cond = None  # Flux without true CFG: the cond call to observe at step end
        self._pert = None  # Flux: (step, this step's perturbed pass) from the cond call
        self._true_cfg = False
        self._checked = False  # dlx.Share's promise, checked on the first call
        self._indices: dict = {}
        self._last = None  # (step, DenoiserCall, the "text" half the pipeline got): for SD3 skip-layer guidance
        run._flush = self._flush
        run._untap = self.remove

    # -- install / remove -------------------------------------------------------------------
    def install(self):
        pipe = self.run.pipe
        den = getattr(pipe, self.family.denoiser)
        orig = den.forward
        if self.family.cfg == "calls":
            D.replace_forward(den, "forward", self._wrap_calls(orig), self._saved)
            orig_ctx = getattr(den, D.CACHE_CONTEXT)

            @contextlib.contextmanager
            def cache_context(name, *a, **k):
                prev, self._call_name = self._call_name, name
                try:
                    with orig_ctx(name, *a, **k):
                        yield
                finally:
                    self._call_name = prev

            D.replace_forward(den, D.CACHE_CONTEXT, cache_context, self._saved)
        else:
            D.replace_forward(den, "forward", self._wrap_batch(orig, denoiser=True), self._saved)
            for side in self.family.extra_doubled_modules:
                mod = getattr(pipe, side, None)
                if mod is not None:
                    D.replace_forward(mod, "forward", self._wrap_batch(mod.forward, denoiser=False), self._saved)

    def remove(self):
        while self._saved:
            D.restore_attribute(*self._saved.pop())

    def _flush(self):
        pending = self._pending_cond
        if pending is not None:  # Flux without true CFG: the cond call was all there was
            self._pending_cond = None
            run = self.run
            x, pred, t = pending
            run.unguided_plan()
            run.observe(DenoiserCall(run.step, t, x, pred, None, pred, (False,) * pred.shape[0], 1.0))

    def _index(self, values: tuple, device) -> torch.Tensor:
        """An index tensor on the device, made once per distinct value (Share's layouts change
        only where a sample's plan does)."""
        key = (values, device)
        t = self._indices.get(key)
        if t is None:
            t = self._indices[key] = torch.tensor(values, device=device)
        return t

    # -- batch-doubled CFG (SD, SDXL, SD3, ControlNet) ------------------------------------------
    def _take(self, plan, lay, b: int, n: int):
        """Rows of the doubled batch to evaluate this step (cached for side modules), as
        (rows, evaluated samples, guided samples evaluated, their positions among the evaluated
        samples, layout, guided samples whose unconditional rows are left to the perturbed
        denoiser). Samples with ``plan.zero`` are not evaluated at all."""
        run = self.run
        cached = self._rows
        if cached is not None and cached[0] == run.step:
            return cached[1]
        reps = range(b) if lay is None else lay.reps
        zero = plan.zero
        ev = [r for r in reps if not zero[r]] if zero else list(reps)
        guided = [r for r in ev if plan.mask[r]]
        rules = plan.rule
        hooked = [r for r in guided if getattr(rules[r], "perturbs_uncond", False)] if rules else []
        if lay is None and not zero and not hooked:
            if not guided:
                rows = slice(b, n)  # a view: bitwise the same rows diffusers' own cutoff keeps
            elif len(guided) == b:
                rows = slice(0, n)  # all rows (a scale schedule): no index tensor to copy to the device
            else:
                rows = torch.tensor(guided + list(range(b, n)), dtype=torch.long)
            gpos = guided
        else:
            plain = [r for r in guided if r not in hooked] if hooked else guided
            rows = torch.tensor(plain + [b + r for r in ev], dtype=torch.long)
            pos = {r: i for i, r in enumerate(ev)}
            gpos = [pos[r] for r in guided]
        res = (rows, ev, guided, gpos, lay, hooked)
        self._rows = (run.step, res)
        return res

    def _combine(self, plan, c, u_sub, guided, gpos, like, pert=None):
        """The guided predictions of the evaluated samples: CFG ``u + s·(c − u)`` (and the
        pipeline's ``guidance_rescale``) for samples without a rule, ``rule.combine`` for the
        others, one call per distinct rule (and per which passes ran) with its samples' rows.
        ``c``: conditional predictions of the evaluated samples; ``u_sub``: unconditional ones of
        ``guided`` (in that order); ``pert``: (samples, their positions among the evaluated
        samples, their perturbed predictions) where a rule ran a perturbed pass."""
        run = self.run
        k, m = len(guided), c.shape[0]
        g = c.clone()
        rescale = float(getattr(run.pipe, "guidance_rescale", 0.0) or 0.0)
        rules = plan.rule
        pidx: dict = {}
        if pert is not None:
            pidx = {r: i for i, r in enumerate(pert[0])}
        groups: dict = {}  # (rule, unconditional ran, perturbed ran) -> samples, positions, u rows, p rows
        for i, r in enumerate(guided):
            rule = rules[r] if rules else None
            pi = pidx.get(r)
            grp = groups.setdefault((id(rule), True, pi is not None), (rule, [], [], [], []))
            grp[1].append(r)
            grp[2].append(gpos[i])
            grp[3].append(i)
            if pi is not None:
                grp[4].append(pi)
        if pert is not None:
            for pi, (r, at) in enumerate(zip(pert[0], pert[1])):
                if not plan.mask[r]:  # a perturbed pass without the unconditional one
                    grp = groups.setdefault((id(rules[r]), False, True), (rules[r], [], [], [], []))
                    grp[1].append(r)
                    grp[2].append(at)
                    grp[4].append(pi)
        dev = like.device
        for (_, has_u, has_p), (rule, samples, at, ui, pi) in groups.items():
            at_t = slice(0, m) if at == list(range(m)) else torch.tensor(at, device=dev)
            u = None
            if has_u:  # every guided sample: the rows as they are, else an index (a host-to-device copy)
                u = u_sub if len(ui) == k else u_sub.index_select(0, torch.tensor(ui, device=dev))
            p = None
            if has_p:
                pp = pert[2]
                p = pp if len(pi) == pp.shape[0] else pp.index_select(0, torch.tensor(pi, device=dev))
            s = plan.scale_rows(samples, like)
            cc = c[at_t]
            if rule is None:
                val = u + s * (cc - u)
                if rescale > 0:
                    # the pipeline would rescale against the conditional prediction (per
                    # sample); on [g, g] its own rescale is then the identity
                    val = D.rescale_noise_cfg(val, cc, rescale)
            elif has_p:
                val = rule.combine(run, run.step, tuple(samples), cc, u, s, perturbed=p)
            else:
                val = rule.combine(run, run.step, tuple(samples), cc, u, s)
            g[at_t] = val
        return g

    def _through_perturbation(self, orig, args, kwargs, n: int, offset: int, plan, samples):
        """Rows ``offset + j`` of the call's ``n`` rows for each of ``samples``, evaluated inside
        their rule's ``perturbation`` (the denoiser's modules changed, then restored), one call per
        distinct rule; returns (the samples in the order evaluated, their predictions)."""
        run = self.run
        by_rule: dict = {}
        for r in samples:
            by_rule.setdefault(id(plan.rule[r]), (plan.rule[r], []))[1].append(r)
        order, preds = [], []
        for rule, rs in by_rule.values():
            rows = torch.tensor([offset + r for r in rs], dtype=torch.long)
            with rule.perturbation(run):
                out = orig(*_take_rows(args, n, rows), **_take_rows(kwargs, n, rows))
            order += rs
            preds.append(_pred_of(out))
        return order, preds[0] if len(preds) == 1 else torch.cat(preds)

    def _perturbed_uncond(self, orig, args, kwargs, n: int, plan, guided, hooked, u_plain):
        """The unconditional rows of ``hooked`` samples evaluated through their rule's weaker model
        (AutoGuidance), merged with the main call's unconditional rows ``u_plain`` into ``guided``
        order."""
        order, pred = self._through_perturbation(orig, args, kwargs, n, 0, plan, hooked)
        self.run.count(len(hooked), cond=False)  # rows only: the nominal unconditional pass is counted
        hpos = {r: i for i, r in enumerate(order)}
        ppos = {r: i for i, r in enumerate(r for r in guided if r not in hpos)}
        off = u_plain.shape[0]
        both = torch.cat([u_plain, pred]) if off else pred
        idx = [ppos[r] if r in ppos else off + hpos[r] for r in guided]
        if idx == list(range(len(idx))):
            return both
        return both.index_select(0, torch.tensor(idx, device=both.device))

    def _perturbed(self, orig, args, kwargs, n: int, offset: int, plan, ev):
        """The perturbed passes of a step: each perturbed sample's conditional rows (at ``offset``
        in the call's ``n`` rows: after the unconditional half of a doubled batch, 0 in Flux's
        conditional call) through its rule's perturbation; returns (samples, their positions among
        ``ev``, predictions) or None."""
        per = plan.perturb
        samples = [r for r in ev if per[r]]
        if not samples:
            return None
        order, pred = self._through_perturbation(orig, args, kwargs, n, offset, plan, samples)
        self.run.count(len(samples), cond=False, uncond=per)
        pos = {r: i for i, r in enumerate(ev)}
        return tuple(order), [pos[r] for r in order], pred

    def _wrap_batch(self, orig, denoiser: bool):
        run = self.run
        pipe = run.pipe
        thread = run.thread

        def forward(*args, **kwargs):
            if threading.get_ident() != thread or run.in_callback:  # not this run's call
                return orig(*args, **kwargs)
            x = _first_tensor(args, kwargs)
            n = x.shape[0]
            # read every call: a callback may end CFG mid-run (diffusers' cutoff callbacks do)
            cfg = D.cfg_on(pipe)
            if not run.loop_started:  # a ControlNet runs before the UNet: the loop starts there
                run.loop_start(x, n // 2 if cfg and n % 2 == 0 else n, _timestep_of(args, kwargs))
            b = run.batch
            if not self._checked:
                self._checked = True
                if run.share is not None:
                    run.share.check_rows(run, _batch_tensors((args, kwargs), n), n)
            if not cfg or n != 2 * b:
                return self._single(orig, args, kwargs, x, n, cfg, denoiser)
            plan = run.plan()
            lay = run.layout(plan)
            if lay is None and plan.passthrough:
                out = orig(*args, **kwargs)
                if denoiser:
                    run.count(n, True, plan.mask)
                    if run.wants_calls:
                        pred = _pred_of(out)
                        u, c = pred.chunk(2)
                        # guided=None: lerp(u, c, scale) (and the pipeline's rescale) when an
                        # part reads it: the pipeline combines its own prediction
                        rescale = float(getattr(pipe, "guidance_rescale", 0.0) or 0.0)
                        call = DenoiserCall(run.step, _timestep_of(args, kwargs), x[b:], c, u, None,
                                            plan.mask, plan.default, pair=pred, rescale=rescale)
                        self._last = (run.step, call, c)
                        run.observe(call)
                return out
            rows, ev, guided, gpos, lay, hooked = self._take(plan, lay, b, n)
            if not ev:  # every sample zeroed: no evaluation at all
                if not denoiser:  # a side module's output is not used by the skipped denoiser call
                    return orig(*_take_rows(args, n, slice(0, 1)), **_take_rows(kwargs, n, slice(0, 1)))
                run.count(0, cond=True, uncond=plan.mask, zero=plan.zero)
                den = getattr(pipe, self.family.denoiser)
                ch = getattr(getattr(den, "config", None), "out_channels", None) or x.shape[1]
                z = x.new_zeros((b, ch, *x.shape[2:]) if x.ndim == 4 else x[b:].shape)
                if run.wants_calls:
                    nan = torch.full_like(z, float("nan"))
                    call = DenoiserCall(run.step, _timestep_of(args, kwargs), x[b:], z, nan, z, plan.mask,
                                        plan.scale_value())
                    self._last = (run.step, call, z)
                    run.observe(call)
                zz = torch.cat([z, z])
                return (zz,) if kwargs.get("return_dict", True) is False else _Output(zz)
            out = orig(*_take_rows(args, n, rows), **_take_rows(kwargs, n, rows))
            if not denoiser:
                return out  # side module outputs already have the sub-batch's rows
            pred = _pred_of(out)
            k, m = len(guided), len(ev)
            kp = k - len(hooked)  # unconditional rows the main call evaluated
            run.count(kp + m, cond=True, uncond=plan.mask, zero=plan.zero)
            c = pred[kp:]
            u_sub = pred[:kp]
            if hooked:
                u_sub = self._perturbed_uncond(orig, args, kwargs, n, plan, guided, hooked, u_sub)
            pert = self._perturbed(orig, args, kwargs, n, b, plan, ev) if plan.perturb else None  # cond rows at b
            combined = bool(k or pert)
            g = self._combine(plan, c, u_sub, guided, gpos, pred, pert) if combined else c
            u = None
            if plan.zero:  # unevaluated samples: prediction 0 (an extra zero row, indexed)
                pos = {r: i for i, r in enumerate(ev)}
                src = tuple(m if plan.zero[j] else pos[lay.reps[lay.expand[j]] if lay is not None else j]
                            for j in range(b))
                ex = self._index(src, pred.device)
                pad = lambda t: torch.cat([t, t.new_zeros((1, *t.shape[1:]))])  # noqa: E731
                if run.wants_calls and k:
                    u_ev = torch.full_like(c, float("nan"))
                    u_ev[torch.tensor(gpos, device=pred.device)] = u_sub
                    u = pad(u_ev).index_select(0, ex)
                    u[torch.tensor([not v for v in plan.mask], device=pred.device)] = float("nan")
                c = pad(c).index_select(0, ex)
                g = pad(g).index_select(0, ex) if combined else c
            elif lay is not None:  # every sample gets its group's result
                ex = self._index(lay.expand, pred.device)
                c = c.index_select(0, ex)
                g = g.index_select(0, ex) if combined else c
                if run.wants_calls and k:
                    ux = torch.tensor([gpos.index(lay.expand[j]) if plan.mask[j] else 0 for j in range(b)],
                                      device=pred.device)
                    u = u_sub.index_select(0, ux)
                    u[torch.tensor([not v for v in plan.mask], device=pred.device)] = float("nan")
            elif run.wants_calls and k:
                gidx = slice(0, m) if k == m else torch.tensor(gpos, device=pred.device)
                u = torch.full_like(c, float("nan"))
                u[gidx] = u_sub
            if run.wants_calls:
                call = DenoiserCall(run.step, _timestep_of(args, kwargs), x[b:], c, u, g, plan.mask,
                                    plan.scale_value())
                self._last = (run.step, call, g)  # the pipeline's "text" half is g: it got [g, g]
                run.observe(call)
            return _with_pred(out, torch.cat([g, g]))

        return forward

    def _single(self, orig, args, kwargs, x, n, cfg, denoiser):
        """A call without the CFG batch: CFG off (or left for the tail), or an extra call inside
        a CFG step such as SD3's skip-layer guidance."""
        run = self.run
        if cfg:  # an extra conditional call within a CFG step
            out = orig(*args, **kwargs)
            if denoiser:
                run.count(n, cond=True)
                last = self._last
                if kwargs.get("skip_layers") is not None and last is not None and last[0] == run.step:
                    # SD3 skip-layer guidance: the pipeline adds (text − skip)·scale to its CFG
                    # prediction, "text" being the second half of what the denoiser returned
                    _, first, text = last
                    guided = first.guided + (text - _pred_of(out)) * D.skip_layer_scale(run.pipe)
                    run.observe(DenoiserCall(first.step, first.timestep, first.x_in, first.cond, first.uncond,
                                             guided, first.mask, first.scale, revises=True))
            return out
        plan = run.unguided_plan()
        lay = run.layout(plan)
        if lay is None:
            out = orig(*args, **kwargs)
            if denoiser:
                run.count(n, cond=True)
                if run.wants_calls:
                    pred = _pred_of(out)
                    run.observe(DenoiserCall(run.step, _timestep_of(args, kwargs), x, pred, None, pred,
                                             plan.mask, plan.default))
            return out
        cached = self._single_rows
        if cached is not None and cached[0] == run.step:
            rows = cached[1]
        else:
            rows = torch.tensor(lay.reps, dtype=torch.long)
            self._single_rows = (run.step, rows)
        out = orig(*_take_rows(args, n, rows), **_take_rows(kwargs, n, rows))
        if not denoiser:
            return out
        pred = _pred_of(out)
        run.count(len(lay.reps), cond=True)
        full = pred.index_select(0, self._index(lay.expand, pred.device))
        if run.wants_calls:
            run.observe(DenoiserCall(run.step, _timestep_of(args, kwargs), x, full, None, full,
                                     plan.mask, plan.default))
        return _with_pred(out, full)

    # -- two-call CFG (Flux true CFG) -----------------------------------------------------------
    def _wrap_calls(self, orig):
        run = self.run
        thread = run.thread
        _, uncond_name = D.cache_context_names()

        def forward(*args, **kwargs):
            if threading.get_ident() != thread or run.in_callback:  # not this run's call
                return orig(*args, **kwargs)
            x = _first_tensor(args, kwargs)
            b = x.shape[0]
            if self._call_name != uncond_name:
                if not run.loop_started:
                    run.loop_start(x, b, _timestep_of(args, kwargs))
                # with true CFG the step's plan is known now: zeroed samples (CFG-Zero*'s zero-init
                # steps) get no conditional pass either
                plan = run.plan() if D.flux_true_cfg(run.call) else None
                if plan is not None and plan.zero:
                    keep = [j for j in range(b) if not plan.zero[j]]
                    if keep:
                        rows = torch.tensor(keep, dtype=torch.long)
                        sub = orig(*_take_rows(args, b, rows), **_take_rows(kwargs, b, rows))
                        p = _pred_of(sub)
                        full = p.new_zeros((b, *p.shape[1:]))
                        full[rows.to(p.device)] = p
                        out = _with_pred(sub, full)
                    else:
                        z = x.new_zeros(x.shape)
                        out = (z,) if kwargs.get("return_dict", True) is False else _Output(z)
                    run.count(len(keep), cond=True, zero=plan.zero)
                else:
                    out = orig(*args, **kwargs)
                    run.count(b, cond=True)
                self._pert = None
                if plan is not None and plan.perturb:  # the perturbed pass of the conditional rows
                    self._pert = (run.step, self._perturbed(orig, args, kwargs, b, 0, plan, list(range(b))))
                self._cond_out = (run.step, out)
                if run.wants_calls:
                    self._pending_cond = (x, _pred_of(out), _timestep_of(args, kwargs))
                return out
            self._true_cfg = True
            plan = run.plan()
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
                hooked = [r for r in guided if getattr(plan.rule[r], "perturbs_uncond", False)] if plan.rule else []
                if not hooked:
                    sub = orig(*_take_rows(args, b, rows), **_take_rows(kwargs, b, rows))
                    u_sub = _pred_of(sub)
                else:  # AutoGuidance: these samples' unconditional rows through the weaker model
                    plain = [r for r in guided if r not in hooked]
                    if plain:
                        pr = torch.tensor(plain, dtype=torch.long)
                        sub = orig(*_take_rows(args, b, pr), **_take_rows(kwargs, b, pr))
                        u_plain = _pred_of(sub)
                    else:
                        u_plain = c[:0]
                    u_sub = self._perturbed_uncond(orig, args, kwargs, b, plan, guided, hooked, u_plain)
                u_full = c.clone()
                u_full[rows.to(c.device)] = u_sub
                out = _with_pred(cond_out, u_full)
                u = torch.full_like(c, float("nan"))
                u[rows.to(c.device)] = u_sub
            nh = len(hooked) if guided and not plan.passthrough else 0  # counted by _perturbed_uncond
            run.count(len(guided) - nh if not plan.passthrough else b, cond=False, uncond=plan.mask)
            s = plan.default
            if u is None:
                g = c
            elif plan.passthrough:
                g = u + s * (c - u)
            else:  # unguided rows of u are NaN: they keep the conditional prediction
                g = torch.where(torch.isnan(u), c, u + s * (c - u))
            if plan.rule or plan.zero:
                # A rule's (or a zero) prediction g_j reaches the pipeline exactly when both halves
                # carry it: the conditional output it already holds is overwritten in place, and
                # the negative one returned as g too (g + s·(g − g) = g).
                cond_seen = c.clone() if run.wants_calls else c
                pert = self._pert[1] if self._pert is not None and self._pert[0] == step else None
                if plan.rule and (guided or pert):
                    # every sample is "evaluated" here (its conditional output is c's row)
                    u_rows = u_sub if guided else c[:0]
                    g = g.clone()
                    g_all = self._combine(plan, c, u_rows, guided, guided, c, pert)
                    at = [j for j in range(b) if plan.rule[j] is not None and (plan.mask[j] or (pert and j in pert[0]))]
                    if at:
                        at_t = torch.tensor(at, device=c.device)
                        g[at_t] = g_all[at_t]
                if plan.zero:
                    g = g.clone()
                    g[torch.tensor(plan.zero, device=c.device)] = 0
                changed = [j for j in range(b) if (plan.rule and plan.rule[j] is not None and plan.mask[j])
                           or (plan.zero and plan.zero[j]) or (plan.perturb and plan.perturb[j])]
                if changed:  # (none where a rule's window is closed at this step)
                    at = torch.tensor(changed, dtype=torch.long, device=c.device)
                    c[at] = g[at]
                    neg = _pred_of(out)
                    if neg is c:
                        neg = c.clone()
                        out = _with_pred(out, neg)
                    neg[at] = g[at]
                c = cond_seen
            if run.wants_calls:
                run.observe(DenoiserCall(step, _timestep_of(args, kwargs), x, c, u, g, plan.mask, s))
                self._pending_cond = None
            return out

        return forward
