"""Honest wall time: what a config costs when a user runs it alone, measured, not assumed.

A sweep runs many rows per call, so its own clock says nothing about one config's time. The
cost model is measured standalone on the same device, at the batch size the user will run
(``timing_batch``, default 1): interleaved repeats of a full-guidance call and of an unguided one
(``CFGCutoff(ratio=1)`` and ``CFGCutoff(ratio=0)``, same call otherwise), after warm-up, with the device synchronised
around each call. From their medians:

    guided step   g = loop time with full guidance / N
    unguided step u = loop time with no guided step / N
    fixed         f = call time − loop time (text encoding, latents, decoding, post-processing)

and a config that guides k of its N steps is predicted to take ``f + k·g + (N − k)·u`` (k from
the row's own plan, so adaptive configs are priced by what they did). The timing regime is
``trace.timing()``'s: an unguided step saving under 10 % of a guided one is host-bound (eager
diffusers on a fast GPU, where cutting CFG saves little); above, denoiser-bound (CPU, compiled
with CUDA graphs). "compiled" measures the same calls with the denoiser compiled
(``torch.compile(mode="reduce-overhead")``: CUDA graphs); the benchmark validates both against
standalone runs of every config.

The model is measured across the sweep too: between batches the runner times one more
interleaved pair at a time (``Interleaved``, at most ``OVERHEAD`` of the sweep's time), and
``with_pairs`` refits the model from the first measurement's pairs and these. The time share's
interval (``share_ci``) is a percentile bootstrap over the pairs: each pair's guided and unguided
calls are drawn together (they ran seconds apart, so the host's speed at that moment cancels in
their ratio), the model refitted from each resample.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from .. import _diffusers as D
from ..families import family_of
from ..guidance import CFGCutoff
from ..recorder import Ledger
from ..session import attach
from ..stats import percentile_bootstrap
from ..timing import HOST_BOUND_BELOW
from .engine import _device_of

__all__ = ["measure", "predict_ms", "compiled", "take_pair", "Interleaved", "pairs_of", "with_pairs", "share_ci"]

MODES = ("eager", "compiled")


@contextlib.contextmanager
def compiled(pipe):
    """The pipeline's denoiser compiled with ``mode="reduce-overhead"`` inside the block (as it
    is, when the user compiled it already)."""
    name = family_of(pipe).denoiser
    den = getattr(pipe, name)
    if D.is_compiled(den):
        yield pipe
        return
    setattr(pipe, name, torch.compile(den, mode="reduce-overhead"))
    try:
        yield pipe
    finally:
        setattr(pipe, name, den)


@contextlib.contextmanager
def eager(pipe):
    """The pipeline's denoiser uncompiled inside the block (``_orig_mod`` of a compiled one)."""
    name = family_of(pipe).denoiser
    den = getattr(pipe, name)
    if not D.is_compiled(den):
        yield pipe
        return
    setattr(pipe, name, den._orig_mod)
    try:
        yield pipe
    finally:
        setattr(pipe, name, den)


def _device(pipe):
    return _device_of(pipe)


def timed_call(pipe, kwargs: dict, parts=()) -> tuple[float, float]:
    """(call ms, loop ms) of one call with ``parts`` attached; the device synchronised around it."""
    dev = _device(pipe)
    ledger = Ledger()  # the run's one record: its step times are the loop time
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    with attach(pipe, *parts, ledger):
        pipe(**kwargs)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return (time.perf_counter() - t0) * 1e3, float(sum(ledger.record.step_ms))


def standalone_kwargs(call: dict, prompt: str, seed: int, steps: int, scale: float, batch: int = 1) -> dict:
    """The call a user makes to run one config alone (``batch`` copies of the prompt)."""
    kw = dict(call)
    gens = [torch.Generator().manual_seed(int(seed) + i) for i in range(batch)]
    kw.update(prompt=prompt if batch == 1 else [prompt] * batch, num_inference_steps=steps, guidance_scale=scale,
              generator=gens[0] if batch == 1 else gens)
    return kw


def measure(pipe, *, call: dict, prompt: str, seed: int, steps: int, scale: float, batch: int = 1,
            repeats: int = 3, warmup: int = 1) -> dict:
    """Fit the cost model from interleaved standalone calls (full guidance, no guided step).

    Shared hosts change speed for tens of seconds at a time (2026-12-03, H200 host: eager calls
    of 740 ms took 1,350 ms for half a minute), and a model measured in such a spell prices every
    config 20-70 % high. So the model is fitted from the last ``repeats`` pairs of calls once they
    are steady (``steady``: the older and newer halves' median pair times agree within
    ``STEADY``); until then pairs are added, for at most as long again as the first ``repeats``
    took. ``steady`` False says the host's speed was still changing: ``drift`` is by how much."""
    kw = standalone_kwargs(call, prompt, seed, steps, scale, batch)

    def parts(kind):  # at a scale <= 1 the call has no CFG: a cutoff would have nothing to cut
        return kind_parts(kind) if scale > 1 else []
    # on a GPU, warm up for at least a second as well: after a pause (compiling, loading) clocks
    # and caches take a moment to settle, and one warm-up call of a small model is not enough
    # (2026-12-03, the embedded model compiled: one warm-up call left the model 15 % slow)
    min_s = WARMUP_S if _device(pipe).type == "cuda" else 0.0
    t0, done, warm_ms = time.perf_counter(), 0, []
    while done < warmup or time.perf_counter() - t0 < min_s:
        for k in KINDS:
            warm_ms.append(timed_call(pipe, kw, parts(k))[0])
        done += 1
    pairs = []  # per pair: {kind: (call ms, loop ms)}

    def take():
        pairs.append({k: timed_call(pipe, kw, parts(k)) for k in KINDS})

    t0 = time.perf_counter()
    for _ in range(repeats):
        take()
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    while drift(pairs[-repeats:]) > STEADY and time.perf_counter() - t0 < first_s:
        take()
    window = pairs[-repeats:]
    calls = {k: [p[k][0] for p in window] for k in KINDS}
    loops = {k: [p[k][1] for p in window] for k in KINDS}
    d = drift(window)
    return {**fit(calls, loops, steps), "repeats": repeats, "warmup": done, "warmup_ms": warm_ms,
            "pairs_timed": len(pairs), "all_pairs_ms": [sum(p[k][0] for k in KINDS) for p in pairs],
            "drift": d, "steady": d <= STEADY, **_where(pipe)}


def drift(pairs: list) -> float:
    """How far apart the older and the newer half of ``pairs`` are: |median newer / median older
    - 1| of the pairs' total call times (0 for fewer than 2 pairs: nothing to compare)."""
    if len(pairs) < 2:
        return 0.0
    tot = [sum(p[k][0] for k in KINDS) for p in pairs]
    h = len(tot) // 2
    old, new = statistics.median(tot[:h]), statistics.median(tot[-h:])
    return abs(new / old - 1) if old > 0 else 0.0


#: the most the halves of the measured pairs may differ for the model to count as steady
STEADY = 0.05


#: seconds of warm-up calls on a GPU before the cost model is timed
WARMUP_S = 1.0


#: the two standalone calls the model is fitted from: full guidance, and no guided step
KINDS = ("guided", "unguided")


def kind_parts(kind: str) -> list:
    """The parts of a standalone call of ``kind``: a cutoff at ratio 1 or 0, as a user runs a
    config (``dlx.attach(pipe, CFGCutoff(r))``), so the control's own host work is priced too
    (2026-12-03, the embedded model compiled: a bare full-CFG call was 2-3 % faster than the
    same call with ``CFGCutoff(1.0)`` attached)."""
    return [CFGCutoff(ratio=1 if kind == "guided" else 0)]


def fit(calls: dict, loops: dict, steps: int) -> dict:
    """The model from timed standalone calls: ``calls[kind]`` (ms per call) and ``loops[kind]``
    (ms of the denoising loop, per call) for kind in ``KINDS``; medians, so one slow call
    (a collection, another process on the host) does not move it."""
    med = {k: statistics.median(v) for k, v in calls.items()}
    g = statistics.median(loops["guided"]) / steps
    u = statistics.median(loops["unguided"]) / steps
    fixed = statistics.median([c - lp for k in KINDS for c, lp in zip(calls[k], loops[k])])
    saving = 1.0 - u / g if g > 0 else float("nan")
    return {
        "guided_step_ms": g, "unguided_step_ms": u, "fixed_ms": fixed,
        "full_ms": med["guided"], "none_ms": med["unguided"],
        "calls_ms": calls, "loops_ms": loops,
        "saving": saving, "regime": "host-bound" if saving < HOST_BOUND_BELOW else "denoiser-bound",
    }


def _where(pipe) -> dict:
    dev = _device(pipe)
    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "timer": "perf_counter around cuda-synchronised calls" if dev.type == "cuda" else "perf_counter",
    }


def predict_ms(cost: dict, guided_steps: float, steps: int, extra_passes: float = 0.0) -> float:
    """Predicted standalone wall time of a run that guides ``guided_steps`` of ``steps`` and makes
    ``extra_passes`` single-row denoiser passes beyond one conditional pass per step and one
    unconditional per guided step (a perturbation guider's third pass +1, a CFG-Zero* zero step
    −1), each costed as an unguided step's: one call of the conditional rows. That last term is a
    model, measured for the cutoffs only (docs/benchmarks.md)."""
    return (cost["fixed_ms"] + guided_steps * cost["guided_step_ms"]
            + (steps - guided_steps + extra_passes) * cost["unguided_step_ms"])


# --- across the sweep --------------------------------------------------------------------------------

def take_pair(pipe, *, call: dict, prompt: str, seed: int, steps: int, scale: float, batch: int = 1) -> dict:
    """One more interleaved pair of standalone calls, as ``measure`` times them: ``{"guided":
    [call ms, loop ms], "unguided": [call ms, loop ms]}``."""
    kw = standalone_kwargs(call, prompt, seed, steps, scale, batch)
    return {k: list(timed_call(pipe, kw, kind_parts(k) if scale > 1 else [])) for k in KINDS}


#: the most of a sweep's wall time that pairs taken between its batches may use
OVERHEAD = 0.10
#: the most pairs taken between two batches
PER_GAP = 3


class Interleaved:
    """Pairs of timed standalone calls between a sweep's batches, stored beside the cost model
    they extend (``store.add_cost_pair``). Only the mode the pipeline runs in is timed (eager,
    or compiled when the user compiled the denoiser: compiling another copy mid-sweep would cost
    more than it tells), only where ``measure`` fitted that model at the store's ``timing_batch``,
    and at most ``OVERHEAD`` of the time since the sweep began. A pair that fails (out of memory)
    stops the timing, never the sweep."""

    def __init__(self, pipe, spec, store, padded: bool = False):
        self.pipe, self.spec, self.store = pipe, spec, store
        den = getattr(pipe, _family(pipe).denoiser, None)
        self.mode = "compiled" if D.is_compiled(den) else "eager"
        # a shard's database holds its costs but not the sweep's meta: then the costs' one batch size
        batches = {c["batch"] for c in store.costs() if c["mode"] == self.mode}
        self.batch = store.meta("timing_batch", next(iter(batches)) if len(batches) == 1 else None)
        self.models = {(c["steps"], c["scale"]) for c in store.costs()
                       if c["mode"] == self.mode and c["batch"] == self.batch}
        # padded denoiser batches (the sweep's compiled shapes) would time another call than a
        # user's: leave the timing alone where padding would change the standalone call's batch
        if padded and self.batch and any(D.buckets(n) != n for n in (self.batch, 2 * self.batch)):
            self.models = set()
        self.taken: dict = {}
        self.t0 = time.perf_counter()
        self.spent = self.last = 0.0

    def after_batch(self, steps: int, scale: float | None = None) -> int:
        """Time up to ``PER_GAP`` pairs for the model of (``steps``, ``scale``) (``scale`` None:
        a mixed-scale call's, the least timed of its scales) while within ``OVERHEAD``; returns
        how many were taken."""
        keys = sorted(k for k in self.models if k[0] == steps and (scale is None or k[1] == scale))
        done = 0
        # the next pair is expected to take as long as the last: take it only if that stays within budget
        while keys and done < PER_GAP and self.spent + self.last <= OVERHEAD * (time.perf_counter() - self.t0):
            key = min(keys, key=lambda k: self.taken.get(k, 0))
            t = time.perf_counter()
            try:
                pair = take_pair(self.pipe, call=self.spec.call, prompt=self.spec.prompts[0],
                                 seed=self.spec.seeds[0], steps=key[0], scale=key[1], batch=self.batch)
            except Exception as e:  # noqa: BLE001 - the sweep's rows matter more than one more pair
                self.store.event("timing_pair_failed", mode=self.mode, error=f"{type(e).__name__}: {e}"[:300])
                self.models = set()
                return done
            finally:
                self.last = time.perf_counter() - t
                self.spent += self.last
            self.store.add_cost_pair(self.mode, key[0], key[1], self.batch, pair)
            self.taken[key] = self.taken.get(key, 0) + 1
            done += 1
        return done


def _family(pipe):
    return family_of(pipe)


def pairs_of(cost: dict) -> list[dict]:
    """The pairs ``measure`` fitted ``cost`` from, as ``{kind: [call ms, loop ms]}``."""
    calls, loops = cost.get("calls_ms") or {}, cost.get("loops_ms") or {}
    n = min((len(calls.get(k, [])) for k in KINDS), default=0)
    return [{k: [calls[k][i], loops[k][i]] for k in KINDS} for i in range(n)]


def with_pairs(cost: dict, extra: list[dict]) -> dict:
    """``cost`` refitted from its own pairs and ``extra`` (pairs taken across the sweep):
    medians over all of them; ``steady`` only where the first measurement was and the older and
    newer halves of all the pairs still agree within ``STEADY`` (``drift`` then covers them all).
    ``pairs`` counts the pairs behind the model, ``sweep_pairs`` those taken between batches."""
    pairs = pairs_of(cost) + [{k: list(p[k]) for k in KINDS} for p in extra]
    out = {**cost, "pairs": len(pairs), "sweep_pairs": len(extra)}
    if not extra or not pairs:
        return out
    calls = {k: [p[k][0] for p in pairs] for k in KINDS}
    loops = {k: [p[k][1] for p in pairs] for k in KINDS}
    d = drift(pairs)
    out.update(fit(calls, loops, cost["steps"]), drift=max(d, float(cost.get("drift", 0.0))),
               steady=bool(cost.get("steady", True)) and d <= STEADY)
    return out


def share_ci(cost: dict, guided, reference_guided: float, level: float = 0.95, n_boot: int = 2000,
             seed: int = 0, extra=None, reference_extra: float = 0.0):
    """Percentile bootstrap interval (lo, hi arrays) of the predicted time share
    ``predict(k) / predict(k_ref)`` for each mean guided-step count k in ``guided``, the pairs of
    ``cost`` (``pairs_of`` its refitted calls) resampled and the model refitted (medians) each
    time; NaN where fewer than two pairs were timed. ``extra``/``reference_extra``: each run's
    extra single passes, as ``predict_ms`` takes them (0 by default)."""
    import numpy as np


    P = np.array([[p[k][j] for k in KINDS for j in (0, 1)] for p in pairs_of(cost)], dtype=float).reshape(-1, 4)
    n_steps = cost["steps"]
    k = np.asarray(guided, dtype=float)
    e = np.zeros_like(k) if extra is None else np.asarray(extra, dtype=float)

    def statistic(idx):
        d = P[idx]  # (B, n, 4): guided call, guided loop, unguided call, unguided loop
        g = np.median(d[..., 1], axis=1) / n_steps
        u = np.median(d[..., 3], axis=1) / n_steps
        f = np.median(np.concatenate([d[..., 0] - d[..., 1], d[..., 2] - d[..., 3]], axis=1), axis=1)
        t = f[:, None] + k[None, :] * g[:, None] + (n_steps - k[None, :] + e[None, :]) * u[:, None]
        t_ref = f + reference_guided * g + (n_steps - reference_guided + reference_extra) * u
        return t / t_ref[:, None]

    return percentile_bootstrap(len(P), statistic, n=n_boot, seed=seed, level=level)
