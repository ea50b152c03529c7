"""Recorder overhead and CFG-cutoff savings on an SD1.5-architecture pipeline (random weights).

UNet: diffusers' default ``UNet2DConditionModel`` config with ``cross_attention_dim=768`` (the
SD1.5 architecture), fp16, 512×512 (64×64 latents), 25 steps, DPM-Solver++. The text encoder and
VAE are small random models (no weights can be downloaded); calls use ``output_type="latent"``
so the figures are the denoising loop alone, the strictest denominator for an overhead.

Variants run interleaved (one call of each per round), medians of ``--reps`` rounds, eager and
``torch.compile(mode="reduce-overhead")`` (CUDA graphs):
  bare                  the pipeline alone, full CFG
  attach                dlx.attach with no parts: the session and denoiser tap alone
  record                dlx.record: latents, embeddings, cond + uncond predictions, x0, timing
  record-latents        dlx.record(keep=("latents",))
  record-scalars        dlx.record(keep=()): per-step scalars and call timing only (the sweep's cost model)
  cutoff-0.5            dlx.CFGCutoff(ratio=0.5) attached (unguided steps skip the uncond pass; after
                        step 12 the run leaves CFG as diffusers' callbacks do)
  official-cutoff-0.5   diffusers' SDCFGCutoffCallback(cutoff_step_ratio=0.5) (guides 13 of 25)
  no-cfg                guidance_scale=1 (the floor a cutoff approaches)

Usage: python bench/bench_recorder.py --out results.json  (GPU)
       python bench/bench_recorder.py --quick  (CPU smoke test: 64², 4 steps, 2 rounds, eager)

Issue 10 item 10 (a cutoff never slower than full CFG; recording overhead), on the GPU box:
  python bench/bench_recorder.py --modes eager --reps 30 \
      --variants cutoff-0.5,official-cutoff-0.5,record,record-scalars --out $OUT/item10_eager.json
  python bench/bench_recorder.py --modes compiled --reps 30 \
      --variants cutoff-0.5,official-cutoff-0.5,record,record-scalars --out $OUT/item10_compiled.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from _stats import bootstrap_ci


def build(device, dtype, size, tiny=False):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dlx.testing import _clip_tokenizer  # the offline tokenizer of dlx's tiny pipelines

    torch.manual_seed(0)
    if tiny:  # --quick: a small UNet of the same kind, so a CPU smoke test takes seconds
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=size // 8, block_out_channels=(32, 64),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                    attention_head_dim=8, norm_num_groups=32)
    else:
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=size // 8)  # SD1.5 architecture
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32)
    tok = _clip_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=1024, num_attention_heads=12,
                                      num_hidden_layers=2, vocab_size=max(1000, len(tok)),
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, max_position_embeddings=77))
    sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        algorithm_type="dpmsolver++")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def variants(pipe):
    from diffusers.callbacks import SDCFGCutoffCallback

    import dlx

    def call(**kw):
        return lambda: pipe(**{**BASE, **kw}).images

    def attached(**rec):
        def f():
            with dlx.record(pipe, **rec):
                return pipe(**BASE).images
        return f

    return {
        "bare": call(),
        "attach": lambda: _attach_only(pipe),
        "record": attached(),
        "record-latents": attached(keep=("latents",)),
        "record-scalars": attached(keep=()),
        # the target: latents, embeddings and both predictions (no x0)
        "record-target": attached(keep=("latents", "embeds", "cond", "uncond")),
        "cutoff-0.5": lambda: _attach_only(pipe, dlx.CFGCutoff(ratio=0.5)),
        "official-cutoff-0.5": lambda: pipe(**BASE, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5)).images,
        "no-cfg": call(guidance_scale=1.0),
    }


def _attach_only(pipe, *parts):
    import dlx

    with dlx.attach(pipe, *parts):
        return pipe(**BASE).images


BASE: dict = {}


CPU_MS: list = []  # this thread's CPU time of each timed call (the host's work, without waits for a core)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    c0 = time.thread_time()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = (time.perf_counter() - t0) * 1e3
    CPU_MS.append((time.thread_time() - c0) * 1e3)
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--variants", default=None, help="comma-separated subset (bare is always run)")
    ap.add_argument("--hooks", type=int, default=0, metavar="N",
                    help="also time dlx from inside (bench/_hookclock.py) over N more rounds per mode: its host "
                         "time, which is the overhead itself when the host bounds the run (eager)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: a small UNet, --device cpu --size 64 "
                                                          "--steps 4 --reps 2 --modes eager")
    args = ap.parse_args()
    if args.quick:
        args.device, args.size, args.steps, args.reps, args.modes = "cpu", 64, 4, 2, "eager"
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = build(device, dtype, args.size, tiny=args.quick)
    BASE.update(prompt="a photo of a red circle", num_inference_steps=args.steps, guidance_scale=7.5,
                height=args.size, width=args.size, output_type="latent")
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "torch": torch.__version__, "size": args.size, "steps": args.steps, "reps": args.reps,
               "date": time.strftime("%Y-%m-%d"), "modes": {}}
    import diffusers

    results["diffusers"] = diffusers.__version__
    eager_unet = pipe.unet
    for mode in args.modes.split(","):
        # each mode sets the UNet afresh: an earlier "compiled" must not leak into "eager"
        pipe.unet = (torch.compile(eager_unet, mode="reduce-overhead", fullgraph=True)
                     if mode == "compiled" else eager_unet)
        fns = variants(pipe)
        if args.variants:
            want = {"bare", *args.variants.split(",")}
            fns = {k: v for k, v in fns.items() if k in want}
        for name, fn in fns.items():  # warm-up: compile every batch size, fill caches
            for _ in range(3):
                BASE["generator"] = torch.Generator(device="cpu").manual_seed(0)
                fn()
        times = {k: [] for k in fns}
        cpu = {k: [] for k in fns}
        import gc

        gc.collect()
        gc.disable()  # a collection landing in one variant's call is noise, not its cost
        names = list(fns)
        for r in range(args.reps):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
                BASE["generator"] = torch.Generator(device="cpu").manual_seed(0)
                times[name].append(timed(fns[name], device))
                cpu[name].append(CPU_MS[-1])
        gc.enable()
        med = {k: statistics.median(v) for k, v in times.items()}
        inside = {}
        if args.hooks:
            from _hookclock import HookClock

            gc.disable()
            with HookClock() as clock:
                inside = {k: [] for k in names if k not in ("bare", "official-cutoff-0.5", "no-cfg")}
                for _ in range(args.hooks):
                    for k in inside:
                        BASE["generator"] = torch.Generator(device="cpu").manual_seed(0)
                        clock.take()
                        timed(fns[k], device)
                        inside[k].append(clock.take() * 1e3)
            gc.enable()
        # paired: the median over rounds of (variant / bare of the same round) cancels slow drifts
        paired = {k: 100 * (statistics.median(a / b for a, b in zip(v, times["bare"])) - 1) for k, v in times.items()}
        ci = {k: [100 * (c - 1) for c in bootstrap_ci([a / b for a, b in zip(v, times["bare"])])]
              for k, v in times.items()}
        # per-step times from the trace's CUDA events: guided vs unguided steps (3 runs, medians)
        import dlx

        guided, unguided = [], []
        for _ in range(3):
            BASE["generator"] = torch.Generator(device="cpu").manual_seed(0)
            with dlx.record(pipe, dlx.CFGCutoff(ratio=0.5)) as tr:
                pipe(**BASE)
            df = tr.to_frame()
            guided += list(df[df.cfg_active].step_ms.iloc[1:])
            unguided += list(df[~df.cfg_active].step_ms)
        step_guided, step_unguided = statistics.median(guided), statistics.median(unguided)
        results["modes"][mode] = {
            "median_ms": med, "all_ms": times,
            "overhead_pct": {k: 100 * (v / med["bare"] - 1) for k, v in med.items()},
            "paired_overhead_pct": paired, "paired_ci95_pct": ci,
            "step_ms_guided": step_guided, "step_ms_unguided": step_unguided,
            "thread_cpu_ms": cpu,
            # meaningful where the host bounds the run (eager); a final synchronize spins on a core,
            # so with CUDA graphs it counts the GPU's tail as well
            "paired_thread_cpu_pct": {k: 100 * (statistics.median(a / b for a, b in zip(v, cpu["bare"])) - 1)
                                      for k, v in cpu.items()},
            "paired_thread_cpu_ci95_pct": {k: [100 * (c - 1) for c in bootstrap_ci([a / b for a, b in zip(v, cpu["bare"])])]
                                           for k, v in cpu.items()},
            "dlx_host_ms": inside,
            "dlx_host_pct_of_bare": {k: 100 * statistics.median(v) / med["bare"] for k, v in inside.items()},
        }
        print(f"\n== {mode} ({results['device']}, {args.size}², {args.steps} steps, {args.reps} interleaved rounds) ==")
        print(f"{'variant':22s} {'median ms':>10s} {'vs bare':>9s} {'paired':>9s} {'paired 95% CI':>18s} "
              f"{'min ms':>8s} {'max ms':>8s}")
        for k, v in med.items():
            print(f"{k:22s} {v:10.1f} {100 * (v / med['bare'] - 1):+8.2f}% {paired[k]:+8.2f}% "
                  f"  [{ci[k][0]:+.2f}, {ci[k][1]:+.2f}]% {min(times[k]):8.1f} {max(times[k]):8.1f}")
        tc = results["modes"][mode]
        print("thread CPU time, paired: " + ", ".join(
            f"{k} {tc['paired_thread_cpu_pct'][k]:+.2f}% [{tc['paired_thread_cpu_ci95_pct'][k][0]:+.2f}, "
            f"{tc['paired_thread_cpu_ci95_pct'][k][1]:+.2f}]" for k in cpu if k != "bare"))
        print(f"per-step from CUDA events (cutoff 0.5 run): guided {step_guided:.2f} ms, unguided {step_unguided:.2f} ms")
        if inside:
            print(f"time inside dlx ({args.hooks} rounds, median; the overhead itself only where the host bounds "
                  f"the run): " + ", ".join(f"{k} {statistics.median(v):.2f} ms = "
                                           f"{100 * statistics.median(v) / med['bare']:.2f}%" for k, v in inside.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
