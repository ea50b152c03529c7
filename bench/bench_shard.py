"""The sharded sweep of issue 14: the same spec with 1 process and with N processes, compared.

SD1.5-architecture random-weight pipeline (bench_recorder.build), fp16, 512², 25 steps,
DPM-Solver++, cutoffs {0, .2, .4, .6, .8, 1} x 32 seeds x 2 prompts, saved with
``save_pretrained`` so ``python -m dlx sweep spec.yaml`` loads it as a user's local model.
Runs ``python -m dlx sweep`` once with one process and, when ``--processes`` > 1 and that many
GPUs are visible, with ``accelerate launch --num_processes N``; times both (wall clock, start-up
included) and compares the merged tables row for row (same keys; metrics within ``--tol``).

    python bench/bench_shard.py --out $OUT                   # GPU box; 2 processes when 2 GPUs
    python bench/bench_shard.py --quick --out /tmp/shard      # CPU smoke test (64², 2 steps, 2 CPU processes: accelerate needs --multi_gpu for that)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

CUTOFFS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
PROMPTS = ["a photo of a red circle", "a photo of a blue square"]


def run(cmd, env) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--tol", type=float, default=1e-6, help="largest metric difference allowed between the tables")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.quick
    size, steps, seeds = (512, args.steps, args.seeds) if not args.quick else (64, 2, 2)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_recorder import build

    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"dlx-shard-model-{size}"
    if not (folder / "model_index.json").is_file():
        pipe = build(torch.device("cpu"), torch.float32, size)
        pipe.save_pretrained(folder)
        del pipe
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    res = {"bench": "bench_shard", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "gpus": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__,
           "grid": {"cutoffs": CUTOFFS, "seeds": seeds, "prompts": PROMPTS, "steps": steps, "size": size}}
    tables = {}
    for n in (1, args.processes):
        if n in tables:
            continue
        if n > 1 and cuda and torch.cuda.device_count() < n:
            res[f"p{n}"] = f"not run: {torch.cuda.device_count()} GPU(s) visible, {n} processes asked"
            continue
        spec = out / f"spec_p{n}.yaml"
        spec.write_text(json.dumps({  # JSON is YAML
            "model": str(folder), "dtype": "float16" if cuda else "float32", "out": str(out / f"runs_p{n}"),
            "prompts": PROMPTS, "seeds": seeds, "cutoffs": CUTOFFS, "metrics": ["psnr", "ssim"],
            "call": {"num_inference_steps": steps, "guidance_scale": 7.5, "height": size, "width": size},
            "timing": [] if args.quick else ["eager"]}))
        dev = ["--device", "cuda" if cuda else "cpu"]
        if n == 1:
            cmd = [sys.executable, "-m", "dlx", "sweep", str(spec), *dev]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n),
                   *(["--multi_gpu"] if n > 1 else []), "-m", "dlx", "sweep", str(spec), *dev]
        res[f"p{n}_wall_s"] = run(cmd, env)
        import pandas as pd

        tables[n] = pd.read_csv(out / f"runs_p{n}" / "results.csv") if (out / f"runs_p{n}" / "results.csv").is_file() else None
    if len(tables) == 2 and all(t is not None for t in tables.values()):
        a, b = (tables[k] for k in sorted(tables))
        key = ["config", "prompt", "seed"]
        a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
        res["same_keys"] = a[key].equals(b[key])
        res["max_metric_diff"] = {m: float((a[m] - b[m]).abs().max()) for m in ("psnr", "ssim") if m in a}
        res["speedup"] = res["p1_wall_s"] / res[f"p{args.processes}_wall_s"]
    (out / "bench_shard.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
