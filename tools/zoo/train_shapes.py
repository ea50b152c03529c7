"""Train the shipped "shapes" text-to-image pipeline (dlx/zoo/shapes/).

    python tools/zoo/train_shapes.py --workdir ckpt --export out/shapes --vae-seconds 60 \
        --unet-minutes 6.5 --sweep out/sweep.json

Stages, all in one process and time-boxed so a run fits a 10-minute GPU lease:
  1. vae:   AutoencoderKL 64x64x3 -> 16x16x4 on fresh renders (L1 + MSE + tiny KL);
            then the latent scaling factor = 1 / std of the latents;
  2. unet:  UNet2DConditionModel + CLIPTextModel from scratch, v-prediction on a
            zero-terminal-SNR "scaled_linear" schedule, caption dropout to the empty
            caption "" (exactly the pipeline's unconditional input), EMA of the weights;
  3. export: StableDiffusionPipeline (DDIM, trailing spacing) in fp16 with save_pretrained;
  4. sweep: adherence over guidance scales on the 200 held-out (prompt, seed) pairs, one
            dlx.sweep (--sweep-rows keeps its rows and resumes a stopped sweep).

Reproducible from --seed: data come from torch generators seeded from it, whose states
are checkpointed with the models, the EMA and the optimiser in <workdir>/ckpt.pt every
--ckpt-every seconds; --resume continues from there (same data stream, same optimiser
state).  --init-from <exported pipeline folder> warm-starts the UNet and the text encoder
from an exported (fp16) pipeline and keeps its VAE: a resume for when only the exported
pipeline could be carried between machines (the optimiser moments restart with a short
warm-up).

Not part of the dlx package: nothing at runtime imports it (tools/zoo/measure_shapes.py and the
tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # dlx from this checkout, installed or not

from dlx.zoo import shapes_data as sd  # noqa: E402
from shapes_tokenizer import build_vocab_merges, write_tokenizer  # noqa: E402

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=32,
)
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(64, 128, 160),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128, attention_head_dim=32, norm_num_groups=32,
)
TEXT_CONFIG = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=sd.MAX_TOKENS, projection_dim=128,
    bos_token_id=0, eos_token_id=1, pad_token_id=1,
)
SCHEDULE = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
    beta_end=0.012, prediction_type="v_prediction", rescale_betas_zero_snr=True,
    timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)
SWEEP_SCALES = [float(s) for s in os.environ.get("DLX_SWEEP_SCALES", "1,1.5,2,3,4,5,6,7.5").split(",")]


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def build_models(vocab_size: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **TEXT_CONFIG))
    return vae, unet, te


def make_pipeline(vae, unet, te, tokenizer):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched = DDIMScheduler(**SCHEDULE)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export(vae, unet, te, folder: Path, tok_dir: Path):
    """save_pretrained in fp16 (loads in fp32 with torch_dtype); tokenizer with its
    vocab.json and merges.txt."""
    import copy

    from transformers import CLIPTokenizer

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    pipe = make_pipeline(copy.deepcopy(vae).half(), copy.deepcopy(unet).half(),
                         copy.deepcopy(te).half(), tok)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(tok_dir / f, folder / "tokenizer" / f)
    return folder


def relation(images, prompts, reference_images=None) -> list[float]:
    """A sweep metric: 1.0 / 0.0 whether the two objects stand as a relation caption says
    (``dlx.zoo.adherence``'s ``relation`` column), NaN for captions without a relation."""
    from dlx.zoo.metric import adherence

    rows = adherence(images, list(prompts), as_frame=False)
    return [float("nan") if r["relation"] is None else float(r["relation"]) for r in rows]


def measure(pipe, pairs, scales, steps: int = 25, batch: int = 200, log=log, out=None) -> dict:
    """Adherence (share of images judged ok) per guidance scale on (prompt, seed) pairs, with
    its breakdown by template, the relation share and the first 32 pairs' share.

    One ``dlx.sweep`` over ``scales`` x ``pairs`` at full guidance, at most ``batch`` rows per
    pipeline call. Noise comes from CPU generators seeded per pair, so any device draws the
    same; the images are judged as their stored 8-bit PNGs. The sweep packs rows by prompt, not
    in pair order, so with fewer rows a call than pairs its batches differ from a loop over
    pair chunks, and float32 arithmetic may differ in the last bits: on the CPU with batch 25
    (the card's 200 pairs, 25 steps) 12 of 200 images at scale 6 and 14 at scale 1 differ from
    the loop's by one 8-bit level in a few pixels, and no verdict changes (98.0% and 63.5%).
    ``out``: the sweep folder (resumes; it must hold rows of these weights only); default a
    temporary folder removed afterwards."""
    import tempfile

    import dlx.sweeps

    scales = list(dict.fromkeys(float(s) for s in scales))
    with tempfile.TemporaryDirectory(prefix="dlx-zoo-sweep-") as tmp:
        res = dlx.sweep(pipe, pairs=list(pairs), configs={"full CFG": None}, guidance_scales=scales,
                        metrics=["adherence", relation], out=out or tmp, num_inference_steps=steps,
                        max_batch=batch, timing=(), progress=False)
        frame = res.frame
    failed = frame[frame.status != "ok"]
    if len(failed):
        raise RuntimeError(f"{len(failed)} sweep rows failed, e.g. {failed.error.iloc[0]}")
    frame["template"] = [sd.parse(p)["template"] for p in frame.prompt]
    result = {}
    for s in scales:
        df = frame[frame.guidance_scale == s].reset_index(drop=True)  # the pairs, in order
        by_t = df.groupby("template")["adherence"].mean().round(4).to_dict()
        rel = df["relation"].dropna()
        result[str(s)] = {"adherence": round(float(df["adherence"].mean()), 4), "by_template": by_t,
                          "relation": round(float(rel.mean()), 4) if len(rel) else None,
                          "n": len(df), "first32": round(float(df["adherence"].iloc[:32].mean()), 4)}
        log(f"scale {s}: adherence {result[str(s)]['adherence']:.3f} {by_t}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="ckpt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-seconds", type=float, default=60)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--unet-minutes", type=float, default=6.0, help="time box of this run's UNet stage")
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--dropout", type=float, default=0.15, help="caption dropout to the empty caption")
    ap.add_argument("--caption-noise", type=float, default=0.0,
                    help="share of training captions with one fact wrong (shapes_data.corrupt_captions)")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--mix", default="0.2,0.65,0.15",
                    help="training shares of the single, relation and and templates")
    ap.add_argument("--high-t", type=float, default=0.0,
                    help="share of samples with t drawn from the noisier half (layout is decided there)")
    ap.add_argument("--ckpt-every", type=float, default=120, help="seconds")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-from", default=None)
    ap.add_argument("--export", default=None, help="folder to save the fp16 pipeline in")
    ap.add_argument("--sweep", default=None, help="json file for the guidance-scale sweep")
    ap.add_argument("--sweep-only", action="store_true", help="only sweep the pipeline in --export")
    ap.add_argument("--sweep-n", type=int, default=200)
    ap.add_argument("--sweep-steps", type=int, default=25)
    ap.add_argument("--sweep-rows", default=None,
                    help="keep the sweep's rows (SQLite + PNGs) under this folder, one subfolder per "
                         "exported weights, and resume from them (default: a temporary folder)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.sweep_only:
        return sweep(args, dev)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    write_tokenizer(tok_dir)
    vocab, _ = build_vocab_merges()
    torch.manual_seed(args.seed)

    vae, unet, te = build_models(len(vocab))
    ckpt_path = work / "ckpt.pt"
    state = {"stage": "vae", "vae_step": 0, "step": 0, "scaling_factor": None,
             "history": [], "unet_seconds": 0.0}
    ema_unet = ema_te = None
    opt_state = None
    g = torch.Generator(device=dev).manual_seed(args.seed)
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        vae.load_state_dict(ck["vae"]); unet.load_state_dict(ck["unet"]); te.load_state_dict(ck["te"])  # noqa: E702
        ema_unet, ema_te, opt_state = ck["ema_unet"], ck["ema_te"], ck.get("opt")
        state = ck["state"]
        g.set_state(ck["gen_state"])
        log(f"resumed from {ckpt_path}: stage {state['stage']} step {state['step']}")
    elif args.init_from:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        src = Path(args.init_from)
        vae = AutoencoderKL.from_pretrained(src / "vae", torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(src / "unet", torch_dtype=torch.float32)
        te = CLIPTextModel.from_pretrained(src / "text_encoder", torch_dtype=torch.float32)
        if te.config.vocab_size != len(vocab):  # the language grew: new words get new rows
            log(f"text encoder vocabulary {te.config.vocab_size} -> {len(vocab)}")
            te.resize_token_embeddings(len(vocab))
        prev = json.loads((src / "train_state.json").read_text()) if (src / "train_state.json").exists() else {}
        state.update({"stage": "unet", "scaling_factor": vae.config.scaling_factor,
                      "step": prev.get("step", 0), "vae_step": prev.get("vae_step", 0),
                      "history": prev.get("history", []), "unet_seconds": prev.get("unet_seconds", 0.0),
                      "init_from": str(src)})
        g.manual_seed(args.seed + 7919 * (1 + state["step"]))  # a fresh, seeded data stream
        log(f"warm start from {src} at step {state['step']}")
    vae.to(dev); unet.to(dev); te.to(dev)  # noqa: E702

    def save_ckpt():
        torch.save({"vae": vae.state_dict(), "unet": unet.state_dict(), "te": te.state_dict(),
                    "ema_unet": ema_unet, "ema_te": ema_te,
                    "opt": opt.state_dict() if state["stage"] != "vae" else None,
                    "state": state, "gen_state": g.get_state(), "args": vars(args)},
                   str(ckpt_path) + ".tmp")
        os.replace(str(ckpt_path) + ".tmp", ckpt_path)

    # ---------------- stage 1: the VAE ----------------
    if state["stage"] == "vae":
        vopt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
        t0 = time.time()
        vae.train()
        while time.time() - t0 < args.vae_seconds and state["vae_step"] < args.max_steps:
            sc = sd.sample_scenes(args.vae_batch, g, device=dev)
            x = sd.render(sc) * 2 - 1
            with torch.autocast(**amp):
                post = vae.encode(x).latent_dist
                rec = vae.decode(post.sample()).sample.float()
            kl = post.kl().mean()
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * kl
            lr = 1e-3 * min(1.0, (state["vae_step"] + 1) / 200)
            for pg in vopt.param_groups:
                pg["lr"] = lr
            vopt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            vopt.step()
            state["vae_step"] += 1
            if state["vae_step"] % 200 == 0:
                log(f"vae step {state['vae_step']} loss {loss.item():.4f} kl {kl.item():.1f}")
        vae.eval()
        with torch.no_grad():
            sc = sd.sample_scenes(2048, g, device=dev)
            x = sd.render(sc) * 2 - 1
            z = vae.encode(x).latent_dist.sample()
            rec = vae.decode(z).sample.clamp(-1, 1)
            err = (rec - x).abs().mean().item()
            state["scaling_factor"] = float(1.0 / z.std())
            state["vae_l1"] = err
            state["latent_mean"] = z.mean(dim=(0, 2, 3)).tolist()
        vae.register_to_config(scaling_factor=state["scaling_factor"])
        log(f"vae done: {state['vae_step']} steps, recon L1 {err:.4f} (in [-1,1]), "
            f"scaling factor {state['scaling_factor']:.4f}, latent mean {state['latent_mean']}")
        state["stage"] = "unet"
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    vae.requires_grad_(False).eval()

    # ---------------- stage 2: UNet + text encoder ----------------
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULE.items()
                                   if k not in ("set_alpha_to_one", "steps_offset")})
    acp = noise_sched.alphas_cumprod.to(dev)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    warm_base = state["step"]
    if opt_state is not None:
        opt.load_state_dict(opt_state)
        warm_base = -10**9  # the optimiser carries on: no new warm-up
    if ema_unet is None:
        ema_unet = {k: v.detach().float().clone().cpu() for k, v in unet.state_dict().items()}
        ema_te = {k: v.detach().float().clone().cpu() for k, v in te.state_dict().items()}
    ema_u = {k: v.to(dev) for k, v in ema_unet.items()}
    ema_t = {k: v.to(dev) for k, v in ema_te.items()}
    empty = sd.empty_ids(vocab, args.batch, device=dev)
    unet.train(); te.train()  # noqa: E702
    t0 = time.time()
    last_ck = t0
    losses = []
    sf = state["scaling_factor"]
    mix = dict(zip(sd.TEMPLATE_NAMES, (float(v) for v in args.mix.split(","))))
    while time.time() - t0 < args.unet_minutes * 60 and state["step"] < args.max_steps:
        sc = sd.sample_scenes(args.batch, g, device=dev, template_weights=mix)
        with torch.no_grad():
            x = sd.render(sc) * 2 - 1
            with torch.autocast(**amp):
                lat = vae.encode(x).latent_dist.sample(generator=g).float() * sf
            cap = sd.corrupt_captions(sc, args.caption_noise, g) if args.caption_noise > 0 else sc
            ids = sd.token_ids(cap, vocab)
            drop = torch.rand(args.batch, generator=g, device=dev) < args.dropout
            ids = torch.where(drop.view(-1, 1), empty, ids)
            t = torch.randint(0, 1000, (args.batch,), generator=g, device=dev)
            hi_t = torch.randint(500, 1000, (args.batch,), generator=g, device=dev)
            t = torch.where(torch.rand(args.batch, generator=g, device=dev) < args.high_t, hi_t, t)
            noise = torch.randn(lat.shape, generator=g, device=dev)
            a = acp[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
            target = a.sqrt() * noise - (1 - a).sqrt() * lat  # v
        with torch.autocast(**amp):
            enc = te(ids)[0]
            pred = unet(noisy, t, encoder_hidden_states=enc).sample
        loss = F.mse_loss(pred.float(), target)
        lr = args.lr * min(1.0, (state["step"] - warm_base + 1) / args.warmup)
        for pg in opt.param_groups:
            pg["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["step"] += 1
        d = min(args.ema, (1 + state["step"]) / (10 + state["step"]))
        with torch.no_grad():
            for src_sd, ema in ((unet.state_dict(), ema_u), (te.state_dict(), ema_t)):
                keys = [k for k in ema if ema[k].is_floating_point()]
                torch._foreach_lerp_([ema[k] for k in keys], [src_sd[k].float() for k in keys], 1 - d)
        losses.append(loss.detach())
        if state["step"] % 250 == 0:
            m = torch.stack(losses).mean().item()
            losses = []
            el = time.time() - t0
            state["history"].append([state["step"], round(m, 5)])
            log(f"step {state['step']} loss {m:.4f} lr {lr:.2e} {el:.0f}s "
                f"({(state['step'] - (warm_base if warm_base > 0 else 0)) / max(el, 1e-9):.1f} it/s this run)")
        if time.time() - last_ck > args.ckpt_every:
            state["unet_seconds"] += time.time() - last_ck
            ema_unet = {k: v.cpu() for k, v in ema_u.items()}
            ema_te = {k: v.cpu() for k, v in ema_t.items()}
            save_ckpt()
            last_ck = time.time()
    state["unet_seconds"] += time.time() - last_ck
    ema_unet = {k: v.cpu() for k, v in ema_u.items()}
    ema_te = {k: v.cpu() for k, v in ema_t.items()}
    save_ckpt()
    log(f"unet stage done at step {state['step']}; {state['unet_seconds']:.0f} s of UNet training in all")

    # ---------------- stage 3: export the EMA weights ----------------
    if args.export:
        unet.load_state_dict(ema_unet)
        te.load_state_dict(ema_te)
        vae_c, unet_c, te_c = vae.cpu().float(), unet.cpu().float(), te.cpu().float()
        folder = export(vae_c, unet_c, te_c, Path(args.export), tok_dir)
        info = dict(state)
        info.update({"batch": args.batch, "lr": args.lr, "dropout": args.dropout, "ema": args.ema,
                     "caption_noise": args.caption_noise, "mix": mix, "high_t": args.high_t, "seed": args.seed, "device_name": torch.cuda.get_device_name() if cuda else "cpu"})
        (folder / "train_state.json").write_text(json.dumps(info, indent=1))
        log(f"exported to {folder}")

    if args.sweep:
        sweep(args, dev, state["step"])


def weights_digest(folder: Path) -> str:
    """Short SHA-1 of an exported pipeline's weight files: the sweep folder of those weights, so
    a resumed sweep never mixes rows of two trainings exported to the same place."""
    import hashlib

    h = hashlib.sha1()
    for f in sorted(Path(folder).rglob("*.safetensors")):
        h.update(str(f.relative_to(folder)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def sweep(args, dev, step=None):
    """Stage 4: adherence over guidance scales for the pipeline in --export."""
    from diffusers import StableDiffusionPipeline

    folder = Path(args.export)
    if step is None and (folder / "train_state.json").exists():
        step = json.loads((folder / "train_state.json").read_text()).get("step")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    pairs = sd.heldout_pairs(args.sweep_n)
    rows = Path(args.sweep_rows) / weights_digest(folder) if args.sweep_rows else None
    res = measure(pipe, pairs, SWEEP_SCALES, steps=args.sweep_steps, out=rows)
    Path(args.sweep).write_text(json.dumps({"step": step, "steps": args.sweep_steps,
                                            "n": len(pairs), "scales": res}, indent=1))
    return res

if __name__ == "__main__":
    main()
