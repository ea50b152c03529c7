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


def build(model: str, dev, size: int):
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


def run_sweep(pipe, prompt, seeds, call, dev, folder, metrics):
    import dlx

    sync(dev)
    t0 = time.perf_counter()
    res = dlx.sweep(pipe, prompts=[prompt], seeds=seeds, cutoffs=CUTOFFS, out=folder, metrics=metrics,
                    timing=(), progress=False, **call)
    sync(dev)
    return (time.perf_counter() - t0) * 1e3, res


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) / 255.0).__pow__(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", choices=["sd15", "shapes"])
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
    pipe, prompt, call = build(args.model, dev, args.size)
    t_build = time.perf_counter() - t_build
    call["num_inference_steps"] = args.steps
    eager_den = pipe.unet
    if args.mode == "compiled":
        pipe.unet = torch.compile(eager_den, mode="reduce-overhead", fullgraph=True)
    seeds = list(range(args.seeds))
    metrics = [m for m in args.metrics.split(",") if m]
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    # warm-up: every standalone shape and the sweep's padded shapes (compiles the graphs)
    t_warm = time.perf_counter()
    loop(pipe, prompt, seeds[:1], call, dev, model_calls=True)
    _, warm = run_sweep(pipe, prompt, seeds, call, dev, work / "warm", metrics)
    graphs = next((e for e in warm.events if e["kind"] == "shapes"), None)
    t_warm = time.perf_counter() - t_warm
    # the cost model, as dlx.sweep measures it (interleaved standalone full / unguided calls)
    t_cost = time.perf_counter()
    model = cost.measure(pipe, call={k: v for k, v in call.items() if k not in ("num_inference_steps", "guidance_scale")},
                         prompt=prompt, seed=0, steps=args.steps, scale=call["guidance_scale"], batch=1,
                         repeats=args.cost_repeats, warmup=1)
    t_cost = time.perf_counter() - t_cost

    loop_ms, sweep_ms, per_cfg = [], [], {r: [] for r in CUTOFFS}
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
                folder = work / f"round{k}"
                ms, res = run_sweep(pipe, prompt, seeds, call, dev, folder, metrics)
                sweep_ms.append(ms)
    inter = cost.fit(mcalls, mloops, args.steps)
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
    speed = [a / b for a, b in zip(loop_ms, sweep_ms)]
    out = {
        "bench": "bench_sweep", "model": args.model, "mode": args.mode, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "dlx": dlx.__version__,
        "share_available": "Share" in dlx._LAZY,
        "grid": {"cutoffs": CUTOFFS, "seeds": len(seeds), "prompt": prompt, "steps": args.steps, **call},
        "dtype": str(next(eager_den.parameters()).dtype), "rounds": args.rounds, "metrics": metrics,
        "loop_s": {"median": statistics.median(loop_ms) / 1e3, "ci95": [x / 1e3 for x in bootstrap_ci(loop_ms)],
                   "all": [x / 1e3 for x in loop_ms]},
        "sweep_s": {"median": statistics.median(sweep_ms) / 1e3, "ci95": [x / 1e3 for x in bootstrap_ci(sweep_ms)],
                    "all": [x / 1e3 for x in sweep_ms],
                    "pipeline_calls_s": sum(e["call_ms"] for e in batches) / 1e3, "calls": len(batches)},
        "speedup": {"median_of_rounds": statistics.median(speed), "ratio_of_medians": statistics.median(loop_ms) / statistics.median(sweep_ms),
                    "all": speed},
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
    path = dst / f"bench_sweep_{args.model}_{args.mode}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(out, indent=1, default=float))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: out[k] for k in ("model", "mode", "device", "loop_s", "sweep_s", "speedup", "evaluations",
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
