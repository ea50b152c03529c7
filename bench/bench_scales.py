"""dlx.sweep over guidance scales: rows of every scale in shared calls, against one call per scale.

Grid: scales {1.5, 3, 6, 9} x cutoffs {0, .5, 1} x 8 seeds x 1 prompt, 25 steps, on the models of
bench_sweep.py (sd15: SD1.5-architecture random weights, fp16, 512x512, DPM-Solver++; shapes: the
embedded model, fp32, 64x64). Per round, interleaved, each into a fresh folder:
  mixed      ``dlx.sweep`` as it runs now: rows of one step count share calls whatever their
             scale (the call at the largest scale, each sample guided at its own);
  per-scale  the same sweep with ``engine.mixes_scales`` patched to False: one series of calls
             per scale, as before (what a pipeline whose scale feeds the denoiser still gets).
Reported: wall-time medians (bootstrap 95% intervals) of the whole sweep (PNGs, metrics, store
included) and of its pipeline calls, the number of calls, evaluations, and every row's PSNR and
largest pixel difference between the two arms' PNGs (they differ only by batch-size rounding:
fp32 within 1 level of 255 expected, fp16 at least 40 dB).

GPU (each a few minutes on an H200):
    python bench/bench_scales.py --model shapes --out $OUT
    python bench/bench_scales.py --model sd15 --out $OUT
CPU smoke test:
    python bench/bench_scales.py --quick --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _stats import bootstrap_ci
from bench_sweep import build, psnr, sync

SCALES = [1.5, 3.0, 6.0, 9.0]
CUTOFFS = [0.0, 0.5, 1.0]


def run(pipe, prompt, seeds, call, dev, folder, mixed: bool):
    import dlx
    from dlx.sweeps import engine

    real = engine.mixes_scales
    if not mixed:
        engine.mixes_scales = lambda pipe, call: False
    try:
        sync(dev)
        t0 = time.perf_counter()
        res = dlx.sweep(pipe, prompts=[prompt], seeds=seeds, cutoffs=CUTOFFS, guidance_scales=SCALES, out=folder,
                        metrics=["psnr"], timing=(), progress=False, **call)
        sync(dev)
        wall = (time.perf_counter() - t0) * 1e3
    finally:
        engine.mixes_scales = real
    batches = [e for e in res.events if e["kind"] == "batch"]
    return {"wall_ms": wall, "calls": len(batches), "calls_ms": sum(e["call_ms"] for e in batches),
            "evaluations": sum(e["evaluations"] for e in batches), "nfe": sum(e["nfe_sum"] for e in batches),
            "scales_per_call": [e["scale"] for e in batches]}, res


def images(res) -> dict:
    from PIL import Image

    out = {}
    for r in res.frame.itertuples():
        with Image.open(r.image) as im:
            out[r.row_id] = np.asarray(im.convert("RGB"))
    return out


def summary(xs):
    lo, hi = bootstrap_ci(xs)
    return {"median": statistics.median(xs), "ci95": [lo, hi], "all": xs}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes", choices=["sd15", "shapes"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512, help="sd15 image size")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both arms")
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: tiny sizes, 4 steps, 2 seeds, 1 round")
    ap.add_argument("--out", required=True, help="folder for bench_scales_<model>.json")
    args = ap.parse_args()
    if args.quick:
        args.device, args.size, args.steps, args.seeds, args.rounds = "cpu", 64, 4, 2, 1
        torch.set_num_threads(1)
    dev = torch.device(args.device)
    import diffusers

    import dlx

    pipe, prompt, call = build(args.model, dev, args.size)
    call = {k: v for k, v in call.items() if k != "guidance_scale"}
    call["num_inference_steps"] = args.steps
    seeds = list(range(args.seeds))
    arms = {"mixed": [], "per-scale": []}
    last = {}
    with tempfile.TemporaryDirectory() as tmp:
        run(pipe, prompt, seeds[:1], call, dev, Path(tmp) / "warm", True)  # warm-up (allocator, kernels)
        for i in range(args.rounds):
            order = ["mixed", "per-scale"] if i % 2 == 0 else ["per-scale", "mixed"]
            for arm in order:
                stats, res = run(pipe, prompt, seeds, call, dev, Path(tmp) / f"{arm}-{i}", arm == "mixed")
                arms[arm].append(stats)
                last[arm] = images(res)
                print(arm, f"round {i}: {stats['wall_ms']:.0f} ms, {stats['calls']} calls "
                      f"({stats['calls_ms']:.0f} ms)", flush=True)
        a, b = last["mixed"], last["per-scale"]
        diffs = {k: int(np.abs(a[k].astype(int) - b[k].astype(int)).max()) for k in a}
        psnrs = [psnr(a[k], b[k]) for k in a]
    result = {
        "bench": "bench_scales", "model": args.model, "quick": args.quick,
        "grid": {"scales": SCALES, "cutoffs": CUTOFFS, "seeds": len(seeds), "steps": args.steps,
                 "rows": len(SCALES) * len(CUTOFFS) * len(seeds)},
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "dlx": dlx.__version__,
                     "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "arms": {arm: {"wall_ms": summary([s["wall_ms"] for s in ss]), "calls_ms": summary([s["calls_ms"] for s in ss]),
                       "calls": ss[-1]["calls"], "evaluations": ss[-1]["evaluations"], "nfe": ss[-1]["nfe"],
                       "scales_per_call": ss[-1]["scales_per_call"]} for arm, ss in arms.items()},
        "speedup_wall": statistics.median(s["wall_ms"] for s in arms["per-scale"])
        / statistics.median(s["wall_ms"] for s in arms["mixed"]),
        "speedup_calls": statistics.median(s["calls_ms"] for s in arms["per-scale"])
        / statistics.median(s["calls_ms"] for s in arms["mixed"]),
        "agreement": {"max_pixel_diff": max(diffs.values()), "rows_differing": sum(v > 0 for v in diffs.values()),
                      "min_psnr_db": min(psnrs) if psnrs else math.nan},
    }
    dst = Path(args.out)
    dst.mkdir(parents=True, exist_ok=True)
    path = dst / f"bench_scales_{args.model}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "arms"}, indent=1))
    for arm, s in result["arms"].items():
        print(arm, f"wall {s['wall_ms']['median']:.0f} ms, calls {s['calls']} ({s['calls_ms']['median']:.0f} ms), "
              f"evaluations {s['evaluations']:.0f} of nominal {s['nfe']:.0f}")
    print("wrote", path)


if __name__ == "__main__":
    main()
