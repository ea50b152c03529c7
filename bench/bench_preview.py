"""Per-step cost of live previews (issue 4): bare pipeline vs dlx.Preview vs the diffusers guide's snippet.

An SD1.5-architecture pipeline with random weights (the default ``UNet2DConditionModel`` config
with ``cross_attention_dim=768``; a 1-layer CLIP text encoder and a small 4-level VAE from configs,
since no weights can be downloaded), DPM-Solver++, CFG 7.5, eager, ``output_type="latent"``.
Variants run interleaved (the order rotates every round) after warm-up rounds; each figure is the
median of ``--reps`` rounds, and the overhead is also given paired (median over rounds of
variant / bare of the same round − 1), which cancels slow drifts of the card's clock.

    python bench/bench_preview.py --out preview.json                     # GPU: fp16, 512², 25 steps
    python bench/bench_preview.py --device cpu --size 64 --steps 4      # CPU smoke test (small UNet)
    python bench/bench_preview.py --model shapes --device cpu --steps 25 # the zoo model: VAE vs map previews

Variants:
  bare            the pipeline alone
  attach          ``dlx.attach(pipe)`` with no parts: dlx's session and denoiser tap alone
  preview-x0      ``dlx.attach(pipe, dlx.Preview(fn, kind="x0"))``; fn keeps the lazy image
  preview-latent  ``dlx.Preview(fn, kind="latent")`` as a plain ``callback_on_step_end``; fn keeps it
  preview-x0-pil  as preview-x0, but fn turns every preview into a PIL image (a host copy per step)
  guide           the guide's ``latents_to_rgb`` (einsum, ``.cpu()``, PIL) per step, no file written
  preview-x0-map      as preview-x0 with ``decoder="map"`` (the family's linear map, never a VAE)
  preview-x0-map-pil  as preview-x0-pil with ``decoder="map"``

With ``--model shapes`` (the embedded ``dlx.zoo`` model, 64² images from 16×16 latents) the default
``decoder="auto"`` decodes previews with the model's own VAE: preview-x0-pil then pays one VAE
decode per step, which is the per-step cost of legible previews; preview-x0-map-pil is the map's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _stats import bootstrap_ci

# transformers logs optional-dependency notices (torchvision) at import; they are not results.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Run from anywhere without relying on how dlx was installed (an editable install seen from
# another directory can resolve `dlx` to a namespace package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("bare", "attach", "preview-x0", "preview-latent", "preview-x0-pil", "guide", "preview-x0-map",
            "preview-x0-map-pil")


def guide_latents_to_rgb(latents):
    """The diffusers callbacks guide's snippet, verbatim."""
    from PIL import Image

    weights = (
        (60, -60, 25, -70),
        (60, -5, 15, -50),
        (60, 10, -5, -35),
    )
    weights_tensor = torch.t(torch.tensor(weights, dtype=latents.dtype).to(latents.device))
    biases_tensor = torch.tensor((150, 140, 130), dtype=latents.dtype).to(latents.device)
    rgb_tensor = torch.einsum("...lxy,lr -> ...rxy", latents, weights_tensor) + biases_tensor.unsqueeze(-1).unsqueeze(-1)
    image_array = rgb_tensor.clamp(0, 255).byte().cpu().numpy().transpose(1, 2, 0)
    return Image.fromarray(image_array)


def guide_callback(pipe, step, timestep, callback_kwargs):
    latents = callback_kwargs["latents"]
    guide_latents_to_rgb(latents[0])  # the guide then saves it; file I/O is left out here
    return callback_kwargs


# "sd15": the default UNet2DConditionModel config (SD1.5's architecture, 860M parameters).
# "small": the same block layout with narrow blocks, so a CPU smoke run takes seconds, not minutes.
UNETS = {
    "sd15": dict(cross_attention_dim=768, sample_size=64),
    "small": dict(cross_attention_dim=768, sample_size=64, block_out_channels=(32, 64, 64, 64), layers_per_block=1),
}


def build_pipeline(device: str, dtype: torch.dtype, unet_kind: str = "sd15"):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging as dlog
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging as tlog

    # Casting random-weight models logs advice meant for from_pretrained(); keep the output clean.
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    torch.manual_seed(0)
    with torch.device(device):  # initialise the UNet where it will run (860M parameters for sd15)
        unet = UNet2DConditionModel(**UNETS[unet_kind])
        vae = AutoencoderKL(
            block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=768, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=12,
            vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        ))
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    # No tokenizer files can be fetched: embed fixed random token ids once with the tiny encoder.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ids = torch.randint(0, 1000, (2, 77), generator=g).to(device)
        emb = text_encoder(ids)[0].to(dtype)
    return pipe, emb[:1], emb[1:]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="float16 (default on cuda) or float32 (default on cpu)")
    ap.add_argument("--model", choices=("random", "shapes"), default="random",
                    help="random: an SD1.5-architecture pipeline with random weights (default); "
                         "shapes: the embedded dlx.zoo model (previews decode with its VAE)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 512; 64 for shapes)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 10 on cuda, 3 on cpu)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--unet", choices=sorted(UNETS), default=None,
                    help="sd15 (default on cuda) or small (default on cpu: a smoke test, not a measurement)")
    ap.add_argument("--compile", action="store_true",
                    help='torch.compile(unet, mode="reduce-overhead", fullgraph=True) (CUDA graphs)')
    ap.add_argument("--hooks", type=int, default=0, metavar="N",
                    help="also time dlx from inside (bench/_hookclock.py) over N more rounds: its host time "
                         "per step, which is the overhead itself when the host bounds the run (eager)")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated subset of {','.join(VARIANTS)} (bare always runs)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    variants = VARIANTS
    if args.variants:
        want = {"bare", *args.variants.split(",")}
        unknown = want - set(VARIANTS)
        if unknown:
            ap.error(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
        variants = tuple(v for v in VARIANTS if v in want)

    import diffusers

    import dlx

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: pass --device cpu (e.g. --device cpu --size 64 --steps 4 for a smoke test)")
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    reps = args.reps or (10 if cuda else 3)
    t_build = time.perf_counter()
    unet_kind = args.unet or ("sd15" if cuda else "small")
    if args.model == "shapes":
        import dlx.zoo

        unet_kind = "zoo:shapes"
        args.size = args.size or 64
        pipe = dlx.zoo.load("shapes", device=args.device, dtype=dtype)
        with torch.no_grad():
            pos, neg = pipe.encode_prompt("a red circle on the left and a blue star on the right", args.device, 1, True,
                                          negative_prompt="")
    else:
        args.size = args.size or 512
        pipe, pos, neg = build_pipeline(args.device, dtype, unet_kind)
    if args.compile:
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    t_build = time.perf_counter() - t_build

    kept: list = []

    def keep(step, image):  # what a gallery does until it shows one: hold the lazy image
        kept.append(image)

    def show(step, image):  # a consumer that wants every preview as a PIL image now
        kept.append(image.pil())

    def call(callback=None):
        kw = dict(
            prompt_embeds=pos, negative_prompt_embeds=neg, height=args.size, width=args.size,
            num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="latent",
            generator=torch.Generator(args.device).manual_seed(0),
        )
        if callback is not None:
            kw["callback_on_step_end"] = callback
            kw["callback_on_step_end_tensor_inputs"] = ["latents"]
        return pipe(**kw)

    def run(variant: str):
        kept.clear()
        if variant == "bare":
            call()
        elif variant == "attach":
            with dlx.attach(pipe):
                call()
        elif variant == "preview-x0":
            with dlx.attach(pipe, dlx.Preview(keep, kind="x0")):
                call()
        elif variant == "preview-latent":
            call(dlx.Preview(keep, kind="latent"))
        elif variant == "preview-x0-pil":
            with dlx.attach(pipe, dlx.Preview(show, kind="x0")):
                call()
        elif variant == "guide":
            call(guide_callback)
        elif variant == "preview-x0-map":
            with dlx.attach(pipe, dlx.Preview(keep, kind="x0", decoder="map")):
                call()
        elif variant == "preview-x0-map-pil":
            with dlx.attach(pipe, dlx.Preview(show, kind="x0", decoder="map")):
                call()
        else:  # pragma: no cover
            raise ValueError(variant)

    lead: dict[str, list[float]] = {v: [] for v in variants}
    # CPU time of this thread during the call: when the host bounds the run (eager), the work the
    # host does, without the time this process waits for a core on a shared machine
    cpu_s: dict[str, list[float]] = {v: [] for v in variants}

    def timed(variant: str) -> float:
        if cuda:
            torch.cuda.synchronize()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        with torch.no_grad():
            run(variant)
        t1 = time.perf_counter()
        cpu_s[variant].append(time.thread_time() - c0)
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        # how long the GPU ran on after the call returned: ~ one step or less when the host
        # bounds the run (then dlx's host time is its overhead), most of the run when it doesn't
        lead[variant].append(t2 - t1)
        return t2 - t0

    for _ in range(args.warmup):
        for v in variants:
            timed(v)
    # Every preview variant must have produced one preview per step.
    run("preview-x0")
    assert len(kept) == args.steps and kept[-1].pil().size == (128, 128), (len(kept), kept[-1])
    # Previews are made when first used: what showing all of a run's x0 previews costs afterwards.
    render_ms = []
    for _ in range(5):
        run("preview-x0")
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for im in kept:
            im.tensor
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        for im in kept:
            im.pil()
        render_ms.append(((t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3))

    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:
        lead[v].clear()
        cpu_s[v].clear()
    import gc

    gc.collect()
    gc.disable()  # a collection landing in one variant's call is noise, not its cost
    for r in range(reps):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            times[v].append(timed(v))

    gc.enable()
    bare = times["bare"]
    med_bare = statistics.median(bare)
    results = {}
    for v in variants:
        ts = times[v]
        med = statistics.median(ts)
        paired = [t / b - 1.0 for t, b in zip(ts, bare)]
        results[v] = {
            "times_s": ts,
            "median_s": med,
            "per_step_ms": med / args.steps * 1e3,
            "overhead_pct": (med / med_bare - 1.0) * 100,
            "paired_overhead_pct": statistics.median(paired) * 100,
            "paired_ci95_pct": [100 * c for c in bootstrap_ci(paired)],
            "added_ms_per_step": (med - med_bare) / args.steps * 1e3,
            "gpu_after_return_ms": statistics.median(lead[v]) * 1e3,
            "thread_cpu_s": cpu_s[v],
            "paired_thread_cpu_pct": statistics.median(a / b - 1 for a, b in zip(cpu_s[v], cpu_s["bare"])) * 100,
            "paired_thread_cpu_ci95_pct": [100 * c for c in bootstrap_ci([a / b - 1 for a, b in zip(cpu_s[v], cpu_s["bare"])])],
        }
    if args.hooks:
        from _hookclock import HookClock

        clock = HookClock()
        inside: dict[str, list[float]] = {v: [] for v in ("attach", "preview-x0", "preview-latent", "preview-x0-pil")
                                          if v in variants}
        gc.collect()
        gc.disable()
        for r in range(args.hooks):
            for v in inside:
                clock.take()
                timed(v)
                inside[v].append(clock.take())
        gc.enable()
        for v, ts in inside.items():
            med = statistics.median(ts)
            results[v]["dlx_host_ms_per_step"] = med / args.steps * 1e3
            results[v]["dlx_host_pct_of_bare"] = 100 * med / med_bare
            results[v]["dlx_host_s"] = ts

    dev_name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    report = {
        "bench": "preview",
        "config": {
            "device": args.device, "device_name": dev_name, "dtype": str(dtype).replace("torch.", ""),
            "size": args.size, "steps": args.steps, "reps": reps, "warmup": args.warmup,
            "guidance_scale": args.guidance, "scheduler": type(pipe.scheduler).__name__,
            "unet": unet_kind, "unet_config": UNETS.get(unet_kind), "weights": "zoo" if args.model == "shapes" else "random",
            "preview_decoder": "VAE (zoo model)" if args.model == "shapes" else "family map",
            "mode": "compiled (reduce-overhead, CUDA graphs)" if args.compile else "eager", "output_type": "latent", "build_s": round(t_build, 2),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "dlx": dlx.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "target": "preview-x0 and preview-latent at most 1% per-step overhead over bare",
        "after_run_ms": {"make_all_x0_tensors": statistics.median(r[0] for r in render_ms),
                         "to_pil_all": statistics.median(r[1] for r in render_ms), "previews": args.steps},
        "results": results,
    }

    print(f"{dev_name} · unet {unet_kind} · {report['config']['dtype']} · {args.size}² · {args.steps} steps · "
          f"median of {reps} interleaved rounds")
    print(f"{'variant':<16}{'median s':>10}{'ms/step':>10}{'+ms/step':>10}{'overhead':>10}{'paired':>10}"
          f"{'paired 95% CI':>18}")
    for v, r in results.items():
        lo, hi = r["paired_ci95_pct"]
        print(f"{v:<16}{r['median_s']:>10.4f}{r['per_step_ms']:>10.2f}{r['added_ms_per_step']:>10.2f}"
              f"{r['overhead_pct']:>9.2f}%{r['paired_overhead_pct']:>9.2f}%   [{lo:+.2f}, {hi:+.2f}]%"
              f"  GPU after return {r['gpu_after_return_ms']:.2f} ms; thread CPU time paired "
              f"{r['paired_thread_cpu_pct']:+.2f}% [{r['paired_thread_cpu_ci95_pct'][0]:+.2f}, "
              f"{r['paired_thread_cpu_ci95_pct'][1]:+.2f}]")
    a = report["after_run_ms"]
    print(f"after the run, for all {args.steps} x0 previews: making the tensors {a['make_all_x0_tensors']:.2f} ms, "
          f"PIL images {a['to_pil_all']:.2f} ms")
    if args.hooks:
        print(f"time inside dlx ({args.hooks} rounds, median): "
              + ", ".join(f"{v} {r['dlx_host_ms_per_step'] * 1e3:.0f} µs/step = {r['dlx_host_pct_of_bare']:.2f}% of bare"
                          for v, r in results.items() if "dlx_host_pct_of_bare" in r))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
