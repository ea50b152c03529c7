"""Measure the shipped shapes pipeline on this machine's CPU and write its card's facts.

    python -m dlx.zoo.measure_shapes --sweep sweep.json [--n 200] [--threads 2]

Writes dlx/zoo/shapes/info.json (the facts `dlx.zoo.info("shapes")` returns) and fills the
measured numbers into dlx/zoo/shapes/README.md between the MEASURED markers:
  - size on disk of the pipeline folder, largest file;
  - CPU time of 25 DDIM steps at 64x64, batch 1, with CFG (median of several runs);
  - adherence at the recommended guidance scale and at 1.0 on the 200 held-out
    (prompt, seed) pairs, float32 on the CPU;
  - the metric's own accuracy on fresh renders.
The recommended scale is read from the GPU sweep (--sweep, written by train_shapes) as the
scale of highest adherence; --scale overrides.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dlx.zoo import shapes_data as sd

FOLDER = Path(__file__).resolve().parent / "shapes"


def folder_size(folder: Path) -> tuple[int, int, str]:
    files = [f for f in folder.rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    big = max(files, key=lambda f: f.stat().st_size)
    return total, big.stat().st_size, str(big.relative_to(folder))


def time_generation(pipe, runs: int = 7, steps: int = 25, scale: float = 4.0) -> dict:
    ts = []
    for i in range(runs + 1):
        g = torch.Generator().manual_seed(i)
        t = time.perf_counter()
        pipe("a red circle left of a blue square", num_inference_steps=steps, guidance_scale=scale,
             generator=g, output_type="pt")
        if i:  # the first run warms up
            ts.append(time.perf_counter() - t)
    return {"median_s": round(statistics.median(ts), 3), "min_s": round(min(ts), 3),
            "max_s": round(max(ts), 3), "runs": runs}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", required=True)
    ap.add_argument("--scale", type=float, default=None)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing-runs", type=int, default=7)
    ap.add_argument("--skip-adherence", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import dlx.zoo
    from dlx.zoo.metric import evaluate_metric
    from dlx.zoo.train_shapes import measure

    sweep = json.loads(Path(args.sweep).read_text())
    scales = {float(k): v["adherence"] for k, v in sweep["scales"].items()}
    rec = args.scale if args.scale is not None else max(scales, key=lambda s: (scales[s], -s))
    train = json.loads((FOLDER / "train_state.json").read_text())
    info_path = FOLDER / "info.json"
    old = json.loads(info_path.read_text()) if info_path.exists() else {}

    pipe = dlx.zoo.load("shapes", device="cpu", dtype=torch.float32)
    total, big, big_name = folder_size(FOLDER)
    timing = time_generation(pipe, runs=args.timing_runs, scale=rec)
    print("timing", timing, flush=True)
    measured = dict(old.get("measured", {}))
    measured.update({
        "size_on_disk_bytes": total, "largest_file_bytes": big, "largest_file": big_name,
        "cpu_seconds_25_steps_cfg_batch1": timing,
        "cpu": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "gpu_sweep": {"scales": scales, "n": sweep["n"], "steps": sweep["steps"],
                      "by_template": {k: v["by_template"] for k, v in sweep["scales"].items()},
                      "note": "float32 on the training GPU, same pairs and CPU-seeded noise"},
    })
    if not args.skip_adherence:
        pairs = sd.heldout_pairs(args.n)
        res = measure(pipe, pairs, [rec, 1.0], steps=25, batch=25)
        measured["adherence_recommended"] = res[str(rec)]
        measured["adherence_scale_1"] = res["1.0"]
        measured["adherence_n_pairs"] = len(pairs)
    measured["metric_on_fresh_renders"] = evaluate_metric(n=1000, seed=777)
    measured["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    info = {
        "name": "shapes",
        "image_size": sd.IMAGE_SIZE,
        "latent_size": sd.IMAGE_SIZE // 4,
        "colours": sd.COLOURS,
        "palette_rgb": [[round(v, 3) for v in c] for c in sd.PALETTE.tolist()],
        "shapes": sd.SHAPES,
        "relations": sd.RELATIONS,
        "templates": sd.TEMPLATES,
        "template_weights_eval": sd.TEMPLATE_WEIGHTS,
        "two_objects_differ_in_colour": True,
        "tokenizer_max_length": sd.MAX_TOKENS,
        "recommended_guidance_scale": rec,
        "recommended_steps": 25,
        "scheduler": "DDIMScheduler (v-prediction, zero terminal SNR, trailing spacing)",
        "negative_prompt": "",
        "heldout_pairs": "dlx.zoo.shapes_data.heldout_pairs(200)",
        "training": {k: train.get(k) for k in ("step", "vae_step", "batch", "lr", "dropout", "ema",
                                                "seed", "device_name", "unet_seconds", "scaling_factor",
                                                "vae_l1", "runs")},
        "measured": measured,
    }
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(measured, indent=1))


if __name__ == "__main__":
    main()
