"""dlx.sweep against the naive loop, and its predicted wall times against standalone runs.

The grid of issue 12: cutoffs {0, .2, .4, .6, .8, 1} x 8 seeds x 1 prompt, 25 steps, on
  sd15    an SD1.5-architecture UNet with random weights (bench_recorder.build), fp16, 512x512,
          DPM-Solver++, scale 7.5 (small random text encoder and VAE);
  shapes  the embedded model (dlx.zoo), fp32, 64x64, its DDIM scheduler, scale 6.
Per round, interleaved: the naive loop (one pipeline call per row, ``with dlx.attach(pipe,
CFGCutoff(r))``, seeds outer and configs inner, every call timed with the device synchronised)
and the sweep (``dlx.sweep`` into a fresh folder: batched calls, per-sample plans, prefix
sharing when this dlx has ``dlx.Share``, PNGs, metrics and the SQLite store included).
Reported: medians over rounds with bootstrap 95% intervals, the speed-up, the evaluations each
computed, every row's PSNR against its loop (standalone) image, and for every config the
predicted standalone time against the median of that config's standalone calls in the loop
(target: within 5%), from two models: the one ``dlx.sweep`` measures (once, before the rounds:
it carries the host's drift between measuring and running) and the same model fitted from its
two standalone calls made inside the loop, call by call beside the configs' (it validates the
model itself: fixed cost plus guided and unguided steps); and each config's time as a share of
full guidance's, predicted (the summary's ``time_<mode>_vs_full``) against the ratio of the two
standalone calls of each seed block, in which the host's speed cancels. ``--mode compiled`` compiles the
denoiser with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); the sweep pads the
denoiser batch to few shapes and the JSON says how many graphs it compiled.

GPU (each well under 8 minutes on an H200):
    python bench/bench_sweep.py --model sd15 --mode eager --out $OUT
    python bench/bench_sweep.py --model sd15 --mode compiled --out $OUT
    python bench/bench_sweep.py --model shapes --mode eager --out $OUT
    python bench/bench_sweep.py --model shapes --mode compiled --out $OUT
CPU smoke test:
    python bench/bench_sweep.py --quick --out /tmp/bench
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _stats import bootstrap_ci

CUTOFFS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def build(model: str, dev, size: int, tiny: bool = False):
    if model in ("sdxl", "sd3", "flux"):
        from bench_families import build as build_family

        return build_family(model, dev, size, tiny=tiny)
    if model == "sd15":
        from bench_recorder import build as build_sd15

        pipe = build_sd15(dev, torch.float16 if dev.type == "cuda" else torch.float32, size)
        return pipe, "a photo of a red circle", dict(guidance_scale=7.5, height=size, width=size)
    import dlx

    pipe = dlx.zoo.load("shapes", device=dev)
    return pipe, "a red circle on the left and a blue square on the right", dict(guidance_scale=6.0)


def loop(pipe, prompt, seeds, call, dev, model_calls=False):
    """The naive loop: one call per row; returns per-config call times (ms) and images (uint8).

    With ``model_calls``, each seed's block also makes the cost model's two standalone calls
    (full guidance, no guided step: ``cost.timed_call`` as ``dlx.sweep`` makes them), the order
    of the block rotated per seed: a model fitted from them and the configs' standalone calls
    then see the same host, call by call (these shared hosts drift by 10-30% over minutes)."""
    import dlx
    from dlx.sweeps import cost

    times = {r: [] for r in CUTOFFS}
    images = {}
    mcalls = {k: [] for k in cost.KINDS}
    mloops = {k: [] for k in cost.KINDS}
    kw = {k: v for k, v in call.items() if k not in ("num_inference_steps", "guidance_scale")}
    for i, s in enumerate(seeds):
        block = list(CUTOFFS) + (list(cost.KINDS) if model_calls else [])
        block = block[i % len(block):] + block[:i % len(block)]
        for r in block:
            if isinstance(r, str):
                c, lp = cost.timed_call(pipe, cost.standalone_kwargs(kw, prompt, 0, call["num_inference_steps"],
                                                                     call["guidance_scale"]), cost.kind_parts(r))
                mcalls[r].append(c)
                mloops[r].append(lp)
                continue
            sync(dev)
            t0 = time.perf_counter()
            with dlx.attach(pipe, dlx.CFGCutoff(r)):
                img = pipe(prompt, generator=torch.Generator().manual_seed(s), **call).images[0]
            sync(dev)
            times[r].append((time.perf_counter() - t0) * 1e3)
            images[(r, s)] = np.asarray(img.convert("RGB"))
    return times, images, (mcalls, mloops)


MAX_BATCH: list = [None]


def run_sweep(pipe, prompt, seeds, call, dev, folder, metrics):
    import dlx

    sync(dev)
    t0 = time.perf_counter()
    res = dlx.sweep(pipe, prompts=[prompt], seeds=seeds, cutoffs=CUTOFFS, out=folder, metrics=metrics,
                    timing=(), progress=False, max_batch=MAX_BATCH[0], **call)
    sync(dev)
    return (time.perf_counter() - t0) * 1e3, res


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_clone(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


class DenoiserLog:
    """Inside the block, every call of the pipeline's denoiser is counted by its batch size (the
    size it computes: under the sweep's padding, the padded one) and the first call of each size
    is kept (its arguments cloned), so the denoiser alone can be timed on the same calls after:
    the floor of the evaluations the sweep computes."""

    def __init__(self, pipe):
        from dlx.families import family_of

        self.den = getattr(pipe, family_of(pipe).denoiser)
        self.counts: dict = {}
        self.calls: dict = {}

    def __enter__(self):
        inner = self.den.forward

        def forward(*a, **k):
            x = a[0] if a and isinstance(a[0], torch.Tensor) else k.get("sample", k.get("hidden_states"))
            n = int(x.shape[0])
            self.counts[n] = self.counts.get(n, 0) + 1
            if n not in self.calls:
                self.calls[n] = (_clone(a), _clone(k))
            return inner(*a, **k)

        object.__setattr__(self.den, "forward", forward)
        return self

    def __exit__(self, *exc):
        self.den.__dict__.pop("forward", None)

    def floor(self, dev, reps: int = 3) -> dict:
        """The denoiser alone on each kept call: median ms per call (device events around each,
        after a warm-up call), and the floor: the sum over sizes of calls x median."""
        per = {}
        with torch.no_grad():
            for n, (a, k) in sorted(self.calls.items()):
                ts = []
                for i in range(reps + 1):
                    sync(dev)
                    t0 = time.perf_counter()
                    self.den(*a, **k)
                    sync(dev)
                    if i >= 1:
                        ts.append((time.perf_counter() - t0) * 1e3)
                per[n] = {"calls": self.counts[n], "median_ms": statistics.median(ts), "all_ms": ts,
                          "ms_per_sample": statistics.median(ts) / n}
        floor_ms = sum(v["calls"] * v["median_ms"] for v in per.values())
        big = max(per) if per else None
        evals = sum(n * v["calls"] for n, v in per.items())
        return {"by_batch": per, "floor_s": floor_ms / 1e3, "denoiser_calls": sum(self.counts.values()),
                "evaluations_computed": evals, "largest_batch": big,
                "floor_at_largest_batch_s": (evals * per[big]["ms_per_sample"] / 1e3) if big else None}


class Phases:
    """Wall time of the sweep's phases, by wrapping dlx.sweeps' own functions (one extra sweep,
    not one of the timed rounds): the pipeline calls, PNG encoding (summed over its threads),
    metrics, the store's per-row writes, the weights fingerprint; the rest is set-up and reading
    the results back."""

    NAMES = (("dlx.sweeps.engine", "run_batch"), ("dlx.sweeps.runner", "png_bytes"), ("dlx.sweeps.runner", "_metrics"),
             ("dlx.sweeps.runner", "_finish_row"), ("dlx.sweeps.api", "weights_fingerprint"),
             ("dlx.sweeps.api", "SweepResult"), ("dlx.sweeps.runner", "_run_batch"))

    def __init__(self):
        import importlib
        import threading

        self.lock = threading.Lock()
        self.ms: dict = {}
        self.saved = []
        self.mods = {m: importlib.import_module(m) for m, _ in self.NAMES}

    def __enter__(self):
        for m, name in self.NAMES:
            mod = self.mods[m]
            f = getattr(mod, name)
            self.saved.append((mod, name, f))
            setattr(mod, name, self._wrap(f, name))
        return self

    def _wrap(self, f, name):
        def g(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                with self.lock:
                    self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
        return g

    def __exit__(self, *exc):
        for mod, name, f in reversed(self.saved):
            setattr(mod, name, f)


def _ratio_ci(a, b, n: int = 2000, seed: int = 0):
    """95% bootstrap interval of median(a) / median(b), a and b resampled independently."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, float), np.asarray(b, float)
    r = [np.median(rng.choice(a, a.size)) / np.median(rng.choice(b, b.size)) for _ in range(n)]
    return [float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) / 255.0).__pow__(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", choices=["sd15", "shapes", "sdxl", "sd3", "flux"])
    ap.add_argument("--cutoffs", default=None, help="comma-separated cutoffs (default 0,.2,.4,.6,.8,1)")
    ap.add_argument("--sweep-reps", type=int, default=1, help="sweeps per round (the sweep is short; the loop long)")
    ap.add_argument("--max-batch", type=int, default=None, help="dlx.sweep's max_batch (rows per pipeline call)")
    ap.add_argument("--tiny", action="store_true", help="sdxl/sd3/flux: tiny denoisers (CPU smoke test)")
    ap.add_argument("--mode", default="eager", choices=["eager", "compiled"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512, help="sd15 image size")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of loop and sweep")
    ap.add_argument("--cost-repeats", type=int, default=5, help="interleaved repeats of the cost model")
    ap.add_argument("--metrics", default="psnr,ssim", help="the sweep's metrics (comma-separated)")
    ap.add_argument("--oneshot-after", action="store_true",
                    help="measure the one-shot cost model again after the rounds (is an early one slow?)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: tiny sizes, 4 steps, 2 seeds, 1 round")
    ap.add_argument("--out", required=True, help="folder for bench_sweep_<model>_<mode>.json")
    args = ap.parse_args()
    if args.cutoffs:
        CUTOFFS[:] = [float(c) for c in args.cutoffs.split(",")]
    if args.quick:
        args.device, args.size, args.steps, args.seeds, args.rounds, args.cost_repeats = "cpu", 64, 4, 2, 1, 1
        torch.set_num_threads(1)
    dev = torch.device(args.device)
    if args.mode == "compiled" and dev.type != "cuda":
        raise SystemExit("--mode compiled needs CUDA (CUDA graphs)")
    import diffusers

    import dlx
    from dlx.sweeps import cost

    t_build = time.perf_counter()
    pipe, prompt, call = build(args.model, dev, args.size, tiny=args.tiny or args.quick)
    t_build = time.perf_counter() - t_build
    call["num_inference_steps"] = args.steps
    from dlx.families import family_of

    den_name = family_of(pipe).denoiser
    eager_den = getattr(pipe, den_name)
    if args.mode == "compiled":
        setattr(pipe, den_name, torch.compile(eager_den, mode="reduce-overhead", fullgraph=True))
    seeds = list(range(args.seeds))
    metrics = [m for m in args.metrics.split(",") if m]
    MAX_BATCH[0] = args.max_batch
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    # warm-up: every standalone shape and the sweep's padded shapes (compiles the graphs)
    t_warm = time.perf_counter()
    loop(pipe, prompt, seeds[:1], call, dev, model_calls=True)
    with DenoiserLog(pipe) as dlog:
        _, warm = run_sweep(pipe, prompt, seeds, call, dev, work / "warm", metrics)
    graphs = next((e for e in warm.events if e["kind"] == "shapes"), None)
    t_warm = time.perf_counter() - t_warm
    print(f"built in {t_build:.1f} s, warmed up in {t_warm:.1f} s", flush=True)
    # the cost model, as dlx.sweep measures it (interleaved standalone full / unguided calls)
    t_cost = time.perf_counter()
    model = cost.measure(pipe, call={k: v for k, v in call.items() if k not in ("num_inference_steps", "guidance_scale")},
                         prompt=prompt, seed=0, steps=args.steps, scale=call["guidance_scale"], batch=1,
                         repeats=args.cost_repeats, warmup=1)
    t_cost = time.perf_counter() - t_cost
    print(f"cost model in {t_cost:.1f} s", flush=True)

    loop_ms, sweep_ms, call_s, per_cfg = [], [], [], {r: [] for r in CUTOFFS}
    # The cost model is also fitted from its two standalone calls made inside the loop, call by
    # call beside the configs' own standalone calls: that validates the model (fixed cost plus
    # guided and unguided steps) apart from the host's drift between measuring and running,
    # which the one-shot model above (what dlx.sweep reports) carries as well.
    mcalls = {k: [] for k in cost.KINDS}
    mloops = {k: [] for k in cost.KINDS}
    gc.collect()
    res = loop_images = None
    for k in range(args.rounds):
        for what in (["loop", "sweep"] if k % 2 == 0 else ["sweep", "loop"]):
            gc.collect()
            if what == "loop":
                t, loop_images, (mc, ml) = loop(pipe, prompt, seeds, call, dev, model_calls=True)
                loop_ms.append(sum(sum(v) for v in t.values()))
                for r in CUTOFFS:
                    per_cfg[r] += t[r]
                for kind in cost.KINDS:
                    mcalls[kind] += mc[kind]
                    mloops[kind] += ml[kind]
            else:
                for j in range(args.sweep_reps):
                    folder = work / f"round{k}-{j}"
                    ms, res = run_sweep(pipe, prompt, seeds, call, dev, folder, metrics)
                    sweep_ms.append(ms)
                    call_s.append(sum(e["call_ms"] for e in res.events if e["kind"] == "batch") / 1e3)
    print(f"rounds done: loop {[round(x) for x in loop_ms]} ms, sweep {[round(x) for x in sweep_ms]} ms", flush=True)
    inter = cost.fit(mcalls, mloops, args.steps)
    # the denoiser's floor for the evaluations the sweep computes, at the sizes it computed them
    floor = dlog.floor(dev)
    print(f"floor {floor['floor_s']:.3f} s over {len(floor['by_batch'])} batch sizes", flush=True)
    # where the sweep's time goes, in one more (untimed) sweep
    with Phases() as ph:
        ph_ms, _ = run_sweep(pipe, prompt, seeds, call, dev, work / "phases", metrics)
    phases = {"sweep_ms": ph_ms, **{k: v for k, v in ph.ms.items()}}
    after = None
    if args.oneshot_after:  # the one-shot model again, now that the process has run for minutes
        after = cost.measure(pipe, call={k: v for k, v in call.items() if k not in ("num_inference_steps", "guidance_scale")},
                             prompt=prompt, seed=0, steps=args.steps, scale=call["guidance_scale"], batch=1,
                             repeats=args.cost_repeats, warmup=1)
    f = res.frame
    # exactness: every sweep row against its standalone (loop) image
    rows = []
    for r in f.itertuples():
        with __import__("PIL.Image", fromlist=["Image"]).open(r.image) as im:
            a = np.asarray(im.convert("RGB"))
        b = loop_images[(r.cutoff, r.seed)]
        rows.append({"config": r.config, "seed": r.seed, "psnr_db": psnr(a, b),
                     "max_abs_255": int(np.abs(a.astype(int) - b.astype(int)).max())})
    # honest wall time: predicted vs the standalone median of every config
    configs = []
    for r in CUTOFFS:
        g = f[f.cutoff == r].guided_steps.mean()
        pred = cost.predict_ms(model, g, args.steps)
        med = statistics.median(per_cfg[r])
        lo, hi = bootstrap_ci(per_cfg[r])
        pi = cost.predict_ms(inter, g, args.steps)
        pa = cost.predict_ms(after, g, args.steps) if after else None
        # paired: each seed block's config call against the model fitted from that block's own
        # two model calls (seconds apart), so the host's drift over minutes cancels
        paired = [cost.predict_ms(cost.fit({k: [mcalls[k][b]] for k in cost.KINDS},
                                           {k: [mloops[k][b]] for k in cost.KINDS}, args.steps), g, args.steps)
                  / per_cfg[r][b] - 1 for b in range(len(per_cfg[r]))]
        pmed = statistics.median(paired)
        plo, phi = bootstrap_ci(paired)
        # relative: the config's time as a share of full guidance's (the summary's time_<mode>_vs_full),
        # one-shot prediction against each seed block's own ratio (the host's speed cancels in both)
        full_pred = cost.predict_ms(model, f[f.cutoff == 1.0].guided_steps.mean(), args.steps)
        share = [per_cfg[r][b] / per_cfg[1.0][b] for b in range(len(per_cfg[r]))]
        smed = statistics.median(share)
        slo, shi = bootstrap_ci(share)
        configs.append({"cutoff": r, "guided_steps": g, "nfe": f[f.cutoff == r].nfe.mean(), "predicted_ms": pred,
                        "standalone_median_ms": med, "standalone_ci95_ms": [lo, hi], "standalone_n": len(per_cfg[r]),
                        "rel_error": pred / med - 1, "within_5pct": abs(pred / med - 1) <= 0.05,
                        "interleaved_predicted_ms": pi, "interleaved_rel_error": pi / med - 1,
                        "interleaved_within_5pct": abs(pi / med - 1) <= 0.05,
                        "standalone_ci_within_5pct_of_interleaved": lo <= pi * 1.05 and hi >= pi * 0.95,
                        "after_rel_error": (pa / med - 1) if pa else None,
                        "paired_rel_error": pmed, "paired_ci95": [plo, phi], "paired_within_5pct": abs(pmed) <= 0.05,
                        "vs_full_predicted": pred / full_pred, "vs_full_standalone_median": smed,
                        "vs_full_standalone_ci95": [slo, shi], "vs_full_rel_error": pred / full_pred / smed - 1,
                        "vs_full_within_5pct": abs(pred / full_pred / smed - 1) <= 0.05})
    batches = [e for e in res.events if e["kind"] == "batch"]
    # each round's loop against that round's sweeps (their median, when a round makes several)
    per_round = [statistics.median(sweep_ms[k * args.sweep_reps:(k + 1) * args.sweep_reps]) for k in range(len(loop_ms))]
    speed = [a / b for a, b in zip(loop_ms, per_round)]
    out = {
        "bench": "bench_sweep", "model": args.model, "build": getattr(pipe, "_bench_build", None), "mode": args.mode, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "dlx": dlx.__version__,
        "share_available": "Share" in dlx._LAZY,
        "grid": {"cutoffs": CUTOFFS, "seeds": len(seeds), "prompt": prompt, "steps": args.steps, **call},
        "dtype": str(next(eager_den.parameters()).dtype), "rounds": args.rounds, "metrics": metrics,
        "loop_s": {"median": statistics.median(loop_ms) / 1e3, "ci95": [x / 1e3 for x in bootstrap_ci(loop_ms)],
                   "all": [x / 1e3 for x in loop_ms]},
        "sweep_s": {"median": statistics.median(sweep_ms) / 1e3, "ci95": [x / 1e3 for x in bootstrap_ci(sweep_ms)],
                    "all": [x / 1e3 for x in sweep_ms],
                    "pipeline_calls_s": sum(e["call_ms"] for e in batches) / 1e3, "calls": len(batches),
                    "pipeline_calls_all_s": call_s,
                    "after_call_all_s": [a / 1e3 - b for a, b in zip(sweep_ms, call_s)]},
        "floor": floor,
        "sweep_vs_floor": {"median": statistics.median(sweep_ms) / 1e3 / floor["floor_s"],
                           "all": [x / 1e3 / floor["floor_s"] for x in sweep_ms],
                           "pipeline_calls_vs_floor": statistics.median(call_s) / floor["floor_s"],
                           "within_1_2": statistics.median(sweep_ms) / 1e3 / floor["floor_s"] <= 1.2},
        "phases_ms": phases, "regime": model.get("regime"), "regime_interleaved": inter.get("regime"),
        "saving": model.get("saving"),
        "speedup": {"median_of_rounds": statistics.median(speed), "ratio_of_medians": statistics.median(loop_ms) / statistics.median(sweep_ms),
                    "all": speed, "ci95_ratio_of_medians": _ratio_ci(loop_ms, sweep_ms)},
        "evaluations": {"loop": float(f.nfe.sum()), "sweep": float(sum(e["evaluations"] for e in batches))},
        "graphs_compiled": graphs["graphs"] if graphs else None,
        "padded_sizes": graphs["padded_sizes"] if graphs else None,
        "cost_model": model, "cost_model_after": after,
        "cost_model_s": t_cost, "warmup_s": t_warm, "build_s": t_build,
        "configs": configs, "all_within_5pct": all(c["within_5pct"] for c in configs),
        "all_interleaved_within_5pct": all(c["interleaved_within_5pct"] for c in configs),
        "all_paired_within_5pct": all(c["paired_within_5pct"] for c in configs),
        "all_vs_full_within_5pct": all(c["vs_full_within_5pct"] for c in configs),
        "interleaved_cost_model": {k: v for k, v in inter.items() if k not in ("calls_ms", "loops_ms")},
        "interleaved_model_calls": {k: len(v) for k, v in mcalls.items()},
        "rows": {"min_psnr_db": min(r["psnr_db"] for r in rows), "max_abs_255": max(r["max_abs_255"] for r in rows),
                 "all_at_least_40db": all(r["psnr_db"] >= 40 for r in rows), "each": rows},
    }
    dst = Path(args.out)
    dst.mkdir(parents=True, exist_ok=True)
    path = dst / f"bench_sweep_{args.model}_{args.mode}{'_quick' if args.quick else ''}{'_tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(out, indent=1, default=float))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: out[k] for k in ("model", "mode", "device", "loop_s", "sweep_s", "speedup", "evaluations",
                                          "sweep_vs_floor", "phases_ms", "regime",
                                          "graphs_compiled", "all_within_5pct", "all_interleaved_within_5pct",
                                          "all_paired_within_5pct", "all_vs_full_within_5pct")}, indent=1, default=float))
    for c in configs:
        print(f"cutoff {c['cutoff']:.1f}: predicted {c['predicted_ms']:8.1f} ms, standalone median "
              f"{c['standalone_median_ms']:8.1f} ms ({100 * c['rel_error']:+.1f}%); model fitted in the loop "
              f"{c['interleaved_predicted_ms']:8.1f} ms ({100 * c['interleaved_rel_error']:+.1f}%); paired by block "
              f"{100 * c['paired_rel_error']:+.1f}% [{100 * c['paired_ci95'][0]:+.1f}, {100 * c['paired_ci95'][1]:+.1f}]"
              + (f"; one-shot after the rounds {100 * c['after_rel_error']:+.1f}%" if after else "")
              + f"; share of full CFG predicted {c['vs_full_predicted']:.3f}, standalone {c['vs_full_standalone_median']:.3f} "
                f"[{c['vs_full_standalone_ci95'][0]:.3f}, {c['vs_full_standalone_ci95'][1]:.3f}] ({100 * c['vs_full_rel_error']:+.1f}%)")
    for name, m in (("one-shot", model), ("after", after)):
        if m:
            print(name, "warm-up ms:", [round(x) for x in m["warmup_ms"]], "calls ms:",
                  {k: [round(x) for x in v] for k, v in m["calls_ms"].items()})
    print(f"rows: min PSNR {out['rows']['min_psnr_db']:.1f} dB, max |diff| {out['rows']['max_abs_255']}/255 -> {path}")


if __name__ == "__main__":
    main()
