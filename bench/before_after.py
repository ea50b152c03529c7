"""Is the redesign slower? dlx's host time per step and the demo's CPU sweep, before and after.

Two source trees (``--before`` and ``--after``, each a checkout of dlx) run the same measurement
in fresh processes, alternately (before, after, after, before, ...), so a slow spell of this shared
machine falls on both. Two measurements:

* ``overhead``: ``bench/overhead_cpu.py`` of each tree (a stub UNet, so dlx's own per-step Python
  and kernels show): the "added µs/step" of ``attach``, ``record`` and ``cutoff-0.5`` over the bare
  pipeline, process CPU time;
* ``sweep``: the demo's grid (6 cutoffs × 4 prompts × 4 seeds of the embedded model, 25 steps,
  adherence, PSNR and SSIM) through ``dlx.sweep`` into a fresh folder with the options both trees
  share (no kept previews, no cost model), wall time of the call in one thread.

It prints, per measurement, the median of each tree with a 95 % bootstrap interval and the
median of the paired after/before ratios with its interval, and writes JSON with ``--json``.

Usage: python bench/before_after.py --before ../before --after . [--rounds 5] [--what overhead,sweep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = r"""
import time, sys, torch
torch.set_num_threads(1)
import dlx
from dlx.demo import STUDY_CUTOFFS, STUDY_PROMPTS
out = sys.argv[1]
t0 = time.perf_counter()
res = dlx.sweep("shapes", prompts=list(STUDY_PROMPTS), seeds=range(4), cutoffs=list(STUDY_CUTOFFS),
                metrics=["adherence", "psnr", "ssim"], out=out, num_inference_steps=25, guidance_scale=6.0,
                timing=(), progress=False)
dt = time.perf_counter() - t0
f = res.frame
assert (f.status == "ok").all()
import hashlib, pathlib
h = hashlib.sha256()
for rid, img in sorted(zip(f.row_id, f.image)):
    h.update(rid.encode() + pathlib.Path(img).read_bytes())
print(f"SWEEP_S {dt:.4f} {dlx.__file__} {h.hexdigest()[:16]}")
"""

VARIANTS = ("attach", "record", "cutoff-0.5")


def run_overhead(tree: Path, rounds: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(tree / "bench" / "overhead_cpu.py"), "--rounds", str(rounds)],
                         cwd=tree / "bench", env=env, capture_output=True, text=True, check=True).stdout
    assert f"dlx from {tree}" in out or str(tree) in out, out[:400]
    got = {}
    for v in VARIANTS:
        m = re.search(rf"^{re.escape(v)}\s+\S+\s+\S+\s+(-?[\d.]+)", out, re.M)
        got[v] = float(m.group(1))
    return got


def run_sweep(tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([sys.executable, "-c", SWEEP, d], cwd=d, env=env, capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"SWEEP_S ([\d.]+) (\S+) (\w+)", out)
    assert m and m.group(2).startswith(str(tree)), out
    return {"sweep_s": float(m.group(1)), "pngs": m.group(3)}


def ci(values, level=0.95, n=4000, seed=0):
    import numpy as np

    v = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(0, len(v), (n, len(v)))], axis=1)
    a = (1 - level) / 2
    return float(np.median(v)), float(np.quantile(meds, a)), float(np.quantile(meds, 1 - a))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved pairs of runs per measurement")
    ap.add_argument("--overhead-rounds", type=int, default=20, help="rounds inside each overhead_cpu.py run")
    ap.add_argument("--what", default="overhead,sweep")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    what = a.what.split(",")
    res: dict = {k: {"before": [], "after": []} for k in what}
    t0 = time.time()
    for i in range(a.rounds):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        for k in what:
            for side in order:
                r = run_overhead(trees[side], a.overhead_rounds) if k == "overhead" else run_sweep(trees[side])
                res[k][side].append(r)
        print(f"round {i + 1}/{a.rounds} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    report = {"rounds": a.rounds, "trees": {k: str(v) for k, v in trees.items()}, "results": {}}
    for k in what:
        keys = [key for key in res[k]["before"][0] if key != "pngs"]
        if "pngs" in res[k]["before"][0]:
            hashes = {side: sorted({r["pngs"] for r in res[k][side]}) for side in ("before", "after")}
            report["results"]["pngs"] = hashes
            print(f"every row's PNG, hashed: before {hashes['before']}, after {hashes['after']}: "
                  f"{'bitwise equal' if hashes['before'] == hashes['after'] and len(hashes['before']) == 1 else 'DIFFERENT'}")
        for key in keys:
            b = [r[key] for r in res[k]["before"]]
            f = [r[key] for r in res[k]["after"]]
            ratios = [y / x for x, y in zip(b, f)] if all(x > 0 for x in b) else []
            report["results"][f"{k}:{key}"] = {"before": ci(b), "after": ci(f), "ratio": ci(ratios) if ratios else None,
                                               "before_runs": b, "after_runs": f}
            line = f"{k}:{key:12s} before {ci(b)[0]:9.2f} [{ci(b)[1]:.2f}, {ci(b)[2]:.2f}]   after {ci(f)[0]:9.2f} " \
                   f"[{ci(f)[1]:.2f}, {ci(f)[2]:.2f}]"
            if ratios:
                r = ci(ratios)
                line += f"   after/before {r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"
            print(line)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
