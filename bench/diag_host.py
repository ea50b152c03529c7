"""Why a one-shot cost measurement can land in a slow spell (issue 12 §9 diagnostic, GPU box).

The embedded model, eager, on the GPU; for ``--seconds``: phases of ``cost.measure`` (calls back
to back, as dlx.sweep times them), of 10 pairs of the same calls back to back with thread CPU
time taken, and of 10 pairs with 100 ms pauses. Per call: wall ms, the thread's CPU ms (time.thread_time: grows only
while the thread runs, so wall >> CPU means the thread waited: preempted or blocked), and per
phase the host's load average and busy share of all cores (/proc/stat). Writes JSON to --out.
    python bench/diag_host.py --out $OUT/diag-host.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def cpu_busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v), idle


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import dlx
    from dlx.sweeps import cost

    dev = torch.device("cuda")
    pipe = dlx.zoo.load("shapes", device=dev)
    prompt = "a red circle on the left and a blue square on the right"
    kw = cost.standalone_kwargs({}, prompt, 0, 25, 6.0)
    for _ in range(3):
        pipe(**kw)
    phases = []
    t_end = time.perf_counter() + args.seconds
    k = 0
    while time.perf_counter() < t_end:
        kind = ("measure", "back-to-back", "paused")[k % 3]
        k += 1
        tot0, idle0 = cpu_busy()
        load = os.getloadavg()
        calls = []
        t0 = time.perf_counter()
        if kind == "measure":
            m = cost.measure(pipe, call={}, prompt=prompt, seed=0, steps=25, scale=6.0, repeats=5, warmup=1)
            calls = [{"pair_ms": x} for x in m["all_pairs_ms"]]
            extra = {"warmup_ms": m["warmup_ms"], "full_ms": m["full_ms"], "steady": m["steady"]}
        else:
            extra = {}
            for i in range(10):
                for kd in cost.KINDS:
                    c0 = time.thread_time()
                    ms, _ = cost.timed_call(pipe, kw, cost.kind_parts(kd))
                    calls.append({"kind": kd, "ms": ms, "cpu_ms": (time.thread_time() - c0) * 1e3})
                    if kind == "paused":
                        time.sleep(0.1)
        tot1, idle1 = cpu_busy()
        busy = 1 - (idle1 - idle0) / max(1, tot1 - tot0)
        phases.append({"kind": kind, "t_start_s": t0, "s": time.perf_counter() - t0, "loadavg": load,
                       "host_busy": busy, "calls": calls, **extra})
        med = np.median([c.get("ms", c.get("pair_ms", 0) / 2) for c in calls])
        cpu = np.median([c["cpu_ms"] for c in calls if "cpu_ms" in c]) if kind != "measure" else float("nan")
        print(f"{kind:9s} {time.perf_counter() - t0:5.1f}s median call {med:6.1f} ms, thread CPU {cpu:6.1f} ms, "
              f"load {load[0]:.1f}, host busy {100 * busy:.0f}%" + (f", warm-up {[round(x) for x in extra['warmup_ms']]}" if extra else ""),
              flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(dev), "nproc": os.cpu_count(), "phases": phases}, f, indent=1)


if __name__ == "__main__":
    main()
