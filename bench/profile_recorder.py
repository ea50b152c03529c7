"""Where the recorder's overhead goes, on a GPU: host lead, syncs, GPU gaps, dlx's own host time.

Same pipeline as ``bench_recorder.py`` (SD1.5-architecture UNet, fp16, 512², 25 steps,
DPM-Solver++). For each variant it reports, as medians over ``--reps`` interleaved rounds:

  host_ms    when the call returned to Python (before the final ``synchronize``)
  total_ms   after ``synchronize``: the wall time ``bench_recorder.py`` reports
  lead_ms    total − host: how far the GPU was behind the host when the call returned (> 0:
             the host ran ahead, so per-step host work is hidden; ≈ 0: something synced)

then, for one call of each variant under ``torch.profiler``: GPU busy time (union of kernels and
copies), the span from the first to the last GPU activity, the largest idle gaps, and the CUDA
runtime calls that block (synchronize, memcpy). ``--trace-dir`` keeps the Chrome traces.

Usage: python bench/profile_recorder.py --mode compiled [--reps 10] [--trace-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import time

import torch
from bench_recorder import BASE, build, variants


def _union(intervals):
    total, end = 0.0, -1e30
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def analyse(trace_path):
    with open(trace_path) as f:
        ev = json.load(f)["traceEvents"]
    gpu = [(e["ts"], e["ts"] + e["dur"], e.get("name", "")) for e in ev
           if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    rt = collections.defaultdict(float)
    for e in ev:
        if e.get("cat") == "cuda_runtime" and "dur" in e:
            rt[e["name"]] += e["dur"]
    gpu.sort()
    if not gpu:
        return None
    gaps = []
    end = gpu[0][1]
    for s, e, name in gpu[1:]:
        if s > end:
            gaps.append((s - end, s - gpu[0][0], name))
        end = max(end, e)
    buckets = collections.Counter()  # GPU idle µs per 20 ms of the run: where the gaps are
    end = gpu[0][1]
    for st, en, _ in gpu[1:]:
        if st > end:
            buckets[int((st - gpu[0][0]) / 2e4)] += st - end
        end = max(end, en)
    gaps.sort(reverse=True)
    cpu = [e for e in ev if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e]
    span_cpu = (max(e["ts"] + e["dur"] for e in cpu) - min(e["ts"] for e in cpu)) if cpu else float("nan")
    return {
        "gpu_busy_ms": _union([(s, e) for s, e, _ in gpu]) / 1e3,
        "gpu_span_ms": (max(e for _, e, _ in gpu) - gpu[0][0]) / 1e3,
        "cpu_span_ms": span_cpu / 1e3,
        "gpu_kernels": len(gpu),
        "gaps_us": [(round(g, 1), round(at / 1e3, 2), n[:60]) for g, at, n in gaps[:8]],
        "idle_us_per_20ms": [int(buckets[i]) for i in range(max(buckets) + 1)] if buckets else [],
        "runtime_ms": {k: round(v / 1e3, 3) for k, v in sorted(rt.items(), key=lambda kv: -kv[1])[:8]},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="compiled", choices=["eager", "compiled"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--variants", default="attach,record-latents,record-target,record")
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--embeds", action="store_true",
                    help="call as bench_preview.py does: prompt embeddings and a generator on the device")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    pipe = build(device, torch.float16 if cuda else torch.float32, args.size)
    BASE.update(prompt="a photo of a red circle", num_inference_steps=args.steps, guidance_scale=7.5,
                height=args.size, width=args.size, output_type="latent")
    gen_device = "cpu"
    if args.embeds:
        with torch.no_grad():
            pos, neg = pipe.encode_prompt("a photo of a red circle", device, 1, True, "")
        del BASE["prompt"]
        BASE.update(prompt_embeds=pos, negative_prompt_embeds=neg)
        gen_device = args.device
    if args.mode == "compiled":
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    fns = variants(pipe)
    fns = {k: fns[k] for k in ["bare", *args.variants.split(",")]}
    for fn in fns.values():
        for _ in range(3):
            BASE["generator"] = torch.Generator(device=gen_device).manual_seed(0)
            fn()
    host = {k: [] for k in fns}
    total = {k: [] for k in fns}
    names = list(fns)
    gc.collect()
    gc.disable()
    for r in range(args.reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            BASE["generator"] = torch.Generator(device=gen_device).manual_seed(0)
            sync()
            t0 = time.perf_counter()
            fns[name]()
            t1 = time.perf_counter()
            sync()
            t2 = time.perf_counter()
            host[name].append((t1 - t0) * 1e3)
            total[name].append((t2 - t0) * 1e3)
    gc.enable()
    print(f"== {args.mode}, {args.reps} rounds ({torch.cuda.get_device_name() if cuda else 'cpu'}) ==")
    print(f"{'variant':18s} {'host_ms':>9s} {'total_ms':>9s} {'lead_ms':>8s} {'paired %':>9s}")
    for k in fns:
        paired = 100 * (statistics.median(a / b for a, b in zip(total[k], total["bare"])) - 1)
        print(f"{k:18s} {statistics.median(host[k]):9.2f} {statistics.median(total[k]):9.2f} "
              f"{statistics.median(t - h for t, h in zip(total[k], host[k])):8.2f} {paired:+8.2f}%")

    # dlx's own host time inside the recorder's hooks (instrumented calls, not the timed ones)
    from dlx import recorder as R

    clock = collections.defaultdict(list)

    def timed(owner, name, label=None):  # wrap owner.name (a method or module function); return the original
        orig = getattr(owner, name)

        def f(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                clock[label or name].append((time.perf_counter() - t) * 1e3)
        setattr(owner, name, f)
        return owner, name, orig

    saved = [timed(R.Recorder, n) for n in ("on_denoiser", "on_step_end", "on_run_end", "_finish",
                                             "_deferred_x0", "_describe_run")]
    saved += [timed(R, "_to_host", "_to_host (queue)"), timed(R, "_meta")]
    for k in fns:
        if not k.startswith("record"):
            continue
        clock.clear()
        for _ in range(5):
            BASE["generator"] = torch.Generator(device=gen_device).manual_seed(0)
            fns[k]()
        sync()
        print(f"{k}: ms per call in " + ", ".join(f"{n} {sum(v) / 5:.3f}" for n, v in clock.items()))
    for owner, name, orig in saved:
        setattr(owner, name, orig)

    from torch.profiler import ProfilerActivity, profile

    tdir = args.trace_dir or "/tmp/dlx-prof"
    os.makedirs(tdir, exist_ok=True)
    for k, fn in fns.items():
        BASE["generator"] = torch.Generator(device=gen_device).manual_seed(0)
        sync()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            fn()
            sync()
        path = os.path.join(tdir, f"{args.mode}-{k}.json")
        prof.export_chrome_trace(path)
        a = analyse(path)
        if a is None:
            continue
        print(f"\n-- {k} (profiled) busy {a['gpu_busy_ms']:.2f} ms, GPU span {a['gpu_span_ms']:.2f} ms, "
              f"CPU span {a['cpu_span_ms']:.2f} ms, {a['gpu_kernels']} GPU ops")
        print("   gaps (µs, at ms, next op):", a["gaps_us"])
        print("   runtime (ms):", a["runtime_ms"])
        print("   GPU idle µs per 20 ms:", a["idle_us_per_20ms"])


if __name__ == "__main__":
    main()
