"""Why a cutoff's unguided step cost more than a guided one on the compiled embedded model (issue:
"a cutoff is never slower than full CFG"), and what changes it.

On the embedded model (dlx.zoo 'shapes', fp32, 64x64, 25 steps) with its UNet compiled
(``torch.compile(mode="reduce-overhead", fullgraph=True)``, as bench_sweep.py compiles it), in
one process, per *setup* (``torch._dynamo.reset()`` between setups):

  calls   interleaved rounds of four standalone calls, wall time with the device synchronised:
          full     dlx.attach(CFGCutoff(1))   guided every step (UNet batch 2)
          cut0     dlx.attach(CFGCutoff(0))   unguided (UNet batch 1 from step 1 on)
          bare     the pipeline alone, full CFG
          bare-gs1 the pipeline alone, guidance_scale=1 (batch 1, no dlx)
  unet    the compiled UNet alone at batch 1 and batch 2, 200 calls each (host-bound: wall per call)
  prof    one profiled call of full and cut0: CUDA-graph launches, kernel launches, and the
          dynamo/inductor counters (graphs compiled, recompiles, cudagraph skips)

Setups (each: warm-up calls in bench_sweep.py's order, cutoff 0 first, so batch 1 is compiled
first; measured, then measured again after one dlx.sweep of the grid, whose padded batches
24..64 are compiled too, as bench_sweep.py's standalone calls run):
  default   torch.compile as bench_sweep.py calls it (automatic dynamic shapes)
  static    ``dynamic=False``: every batch size its own static graph
and, after the sweep, once more under ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``
(dynamo checks only the guards that tell its cache entries apart: is it the guards' host time?)

Usage (GPU): python bench/diag_cutoff_compiled.py --out $OUT/diag-cutoff.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def counters():
    from torch._dynamo.utils import counters as c

    return {k: dict(v) for k, v in c.items() if v}


def timed(fn):
    sync()
    t0 = time.perf_counter()
    c0 = time.thread_time()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3


def profile_launches(fn):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
        sync()
    names = {}
    for e in prof.events():
        n = e.name
        if n in ("cudaGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                 "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaDeviceSynchronize"):
            names[n] = names.get(n, 0) + 1
    return names


def host_profile(fn, calls: int = 3, top: int = 30):
    """The host's time by Python function over ``calls`` calls (cProfile): where a call's host time goes."""
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    sync()
    pr.disable()
    st = pstats.Stats(pr)
    rows = []
    for (f, line, name), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"fn": f"{f.split('site-packages/')[-1]}:{line}:{name}", "calls": nc, "tottime_ms": tt * 1e3 / calls,
                     "cumtime_ms": ct * 1e3 / calls})
    return {"by_tottime": sorted(rows, key=lambda r: -r["tottime_ms"])[:top],
            "by_cumtime": sorted(rows, key=lambda r: -r["cumtime_ms"])[:top]}


def run_setup(name, dynamic, with_sweep, rounds, work):
    import dlx

    torch._dynamo.reset()
    from torch._dynamo.utils import counters as c

    c.clear()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a smoke test of this script
    pipe = dlx.zoo.load("shapes", device=dev)
    prompt = "a red circle on the left and a blue square on the right"
    eager = pipe.unet
    kw = {} if dynamic is None else {"dynamic": dynamic}
    pipe.unet = torch.compile(eager, mode="reduce-overhead" if dev.type == "cuda" else None, fullgraph=True, **kw)
    base = dict(num_inference_steps=25, guidance_scale=6.0)

    def call(kind):
        g = torch.Generator().manual_seed(0)
        if kind == "full":
            with dlx.attach(pipe, dlx.CFGCutoff(1.0)):
                return pipe(prompt, generator=g, **base).images
        if kind == "cut0":
            with dlx.attach(pipe, dlx.CFGCutoff(0.0)):
                return pipe(prompt, generator=g, **base).images
        if kind == "bare":
            return pipe(prompt, generator=g, **base).images
        return pipe(prompt, generator=g, **{**base, "guidance_scale": 1.0}).images

    kinds = ["cut0", "full", "bare", "bare-gs1"]  # warm-up in bench_sweep.py's order: cutoff 0 first
    t_warm = time.perf_counter()
    for k in kinds:
        for _ in range(3):
            call(k)
    out = {"setup": name, "dynamic": dynamic, "warm_s": time.perf_counter() - t_warm, "phases": {}}
    phases = ["before-sweep"] + (["after-sweep", "after-sweep-skip-guards"] if with_sweep else ["skip-guards"])
    for ph in phases:
        if ph == "after-sweep":
            t_sw = time.perf_counter()
            dlx.sweep(pipe, prompts=[prompt], seeds=list(range(8)), cutoffs=[0, .2, .4, .6, .8, 1],
                      out=work / name, metrics=[], timing=(), progress=False, num_inference_steps=25,
                      guidance_scale=6.0)
            for k in kinds:
                call(k)
            out["sweep_warm_s"] = time.perf_counter() - t_sw
        if ph.endswith("skip-guards"):  # dynamo checks only the guards that tell its cache entries apart
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                out["phases"][ph] = measure(pipe, eager, call, kinds, rounds, dev)
        else:
            out["phases"][ph] = measure(pipe, eager, call, kinds, rounds, dev)
        m = out["phases"][ph]
        print(f"\n== {name}, {ph}: warm-up {out['warm_s']:.0f} s")
        for k in kinds:
            print(f"  {k:9s} {m['median_ms'][k]:7.1f} ms  ({m['median_ms'][k] / 25:.2f} ms/step)  vs full "
                  f"{m['vs_full_paired'][k]:.3f} [{m['vs_full_ci95'][k][0]:.3f}, {m['vs_full_ci95'][k][1]:.3f}]  "
                  f"launches {m['launches'].get(k)}")
        print("  unet alone:", {b: round(v.get("median_ms", -1), 3) for b, v in m["unet_alone"].items()})
        print("  counters:", json.dumps(m["counters"])[:1500])
    return out


def measure(pipe, eager, call, kinds, rounds, dev):
    wall = {k: [] for k in kinds}
    cpu = {k: [] for k in kinds}
    for r in range(rounds):
        for k in kinds[r % 4:] + kinds[:r % 4]:
            w, cp = timed(lambda: call(k))
            wall[k].append(w)
            cpu[k].append(cp)
    # the compiled UNet alone, batch 1 and 2 (host-bound: wall time per call, 40 calls a sample)
    unet = {}
    with torch.no_grad():
        for b in (1, 2):
            try:
                x = torch.randn(b, eager.config.in_channels, eager.config.sample_size, eager.config.sample_size,
                                device=dev)
                ehs = torch.randn(b, 77, eager.config.cross_attention_dim, device=dev)
                t = torch.tensor(501, device=dev)  # int64, as the scheduler's timesteps (a float one recompiles)
                for _ in range(5):
                    pipe.unet(x, t, encoder_hidden_states=ehs, return_dict=False)
                ts = []
                for _ in range(5):
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(40):
                        pipe.unet(x, t, encoder_hidden_states=ehs, return_dict=False)
                    sync()
                    ts.append((time.perf_counter() - t0) * 1e3 / 40)
                unet[b] = {"median_ms": statistics.median(ts), "all_ms": ts}
            except Exception as e:  # noqa: BLE001 - a diagnostic: record and go on
                unet[b] = {"error": f"{type(e).__name__}: {e}"[:300]}
    prof = {k: profile_launches(lambda: call(k)) for k in kinds}
    host = {k: host_profile(lambda: call(k)) for k in ("full", "cut0")}
    med = {k: statistics.median(v) for k, v in wall.items()}
    paired = {k: statistics.median(a / b for a, b in zip(v, wall["full"])) for k, v in wall.items()}
    from _stats import bootstrap_ci

    ci = {k: bootstrap_ci([a / b for a, b in zip(v, wall["full"])]) for k, v in wall.items()}
    return {"median_ms": med, "per_step_ms": {k: v / 25 for k, v in med.items()}, "vs_full_paired": paired,
            "vs_full_ci95": ci, "wall_ms": wall, "thread_cpu_ms": cpu, "unet_alone": unet, "launches": prof,
            "host_profile": host, "counters": counters()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--setups", default="default-nosweep")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import tempfile
    from pathlib import Path

    work = Path(tempfile.mkdtemp(prefix="diag-cut-"))
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "setups": {}}
    table = {"default": (None, True), "static": (False, True), "default-nosweep": (None, False),
             "static-nosweep": (False, False)}
    for s in args.setups.split(","):
        dyn, sw = table[s]
        try:
            res["setups"][s] = run_setup(s, dyn, sw, args.rounds, work)
        except Exception as e:  # noqa: BLE001 - keep the other setups
            import traceback

            traceback.print_exc()
            res["setups"][s] = {"error": f"{type(e).__name__}: {e}"[:1000]}
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
