"""Full-size SDXL, SD3 and Flux denoisers with random weights, for ``bench_sweep.py --model sdxl|sd3|flux``.

No weights can be downloaded on the GPU box, so each pipeline is built from configs: the
denoiser at the architecture's full size (the published model's config), random weights, fp16,
built on the GPU; the text encoders and the VAE are small random models (the denoiser is what a
sweep's time is made of), with the widths the denoiser expects (the VAE downsamples by 8, so
1024x1024 images have the real latent sizes: 128x128, 4 channels for SDXL, 16 for SD3 and Flux).

  sdxl  UNet2DConditionModel with SDXL-base's config (2.57 B parameters), EulerDiscrete
  sd3   SD3Transformer2DModel with SD3-medium's config (24 layers, 1536 wide: 2.03 B), no T5
        (the pipeline's zeros stand in for it, 4096 wide), FlowMatchEuler shift 3
  flux  FluxTransformer2DModel with FLUX.1's widths (3072, 24 heads, 4096-wide T5 context) at
        reduced depth (``FLUX_DEPTH``: double, single blocks; the full model is 19 and 38, 11.9 B),
        guidance embedding off, true CFG (``true_cfg_scale`` with a negative prompt)

``pipe._bench_build`` records what was built (parameters, seconds). ``tiny=True`` builds the same
pipelines with tiny denoisers, for a CPU smoke test of the script.
"""

from __future__ import annotations

import time

import torch

FLUX_DEPTH = (2, 4)  # double-stream, single-stream blocks (full FLUX.1: 19, 38)


def _clip(hidden: int, proj: int | None, tok, layers: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=256, num_attention_heads=max(1, hidden // 64),
                         num_hidden_layers=layers, vocab_size=max(1000, len(tok)), projection_dim=proj or hidden,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, max_position_embeddings=77)
    return (CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg).eval()


def _vae(latent_channels: int, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=latent_channels,
                         norm_num_groups=32, layers_per_block=1, **kw).eval()


def _on(dev, make):
    """Build a module with its parameters made on ``dev`` (random init on the GPU: seconds, not minutes)."""
    with torch.device(dev):
        return make()


def build(model: str, dev, size: int = 1024, tiny: bool = False):
    import diffusers

    from dlx.testing import _clip_tokenizer, _t5_tokenizer

    torch.manual_seed(0)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    tok = _clip_tokenizer()
    prompt = "a photo of a red circle"
    if model == "sdxl":
        ucfg = dict(sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                    attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
                    addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816)
        if tiny:
            ucfg.update(block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 1),
                        attention_head_dim=(2, 4, 4), layers_per_block=1)
        den = _on(dev, lambda: diffusers.UNet2DConditionModel(**ucfg).eval())
        sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading")
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=_vae(4, scaling_factor=0.13025, force_upcast=False), text_encoder=_clip(768, None, tok),
            tokenizer=tok, text_encoder_2=_clip(1280, 1280, tok), tokenizer_2=tok, unet=den, scheduler=sched,
            add_watermarker=False)
        call = dict(guidance_scale=5.0, height=size, width=size)
    elif model == "sd3":
        tcfg = dict(sample_size=size // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
        if tiny:
            tcfg.update(num_layers=2, num_attention_heads=2, caption_projection_dim=128)
        den = _on(dev, lambda: diffusers.SD3Transformer2DModel(**tcfg).eval())
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=den, vae=_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                                      use_post_quant_conv=False),
            text_encoder=_clip(768, 768, tok), tokenizer=tok, text_encoder_2=_clip(1280, 1280, tok),
            tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
        call = dict(guidance_scale=5.0, height=size, width=size)
    elif model == "flux":
        from transformers import T5Config, T5EncoderModel

        double, single = FLUX_DEPTH
        tcfg = dict(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                    pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
        if tiny:
            tcfg.update(num_layers=1, num_single_layers=1, num_attention_heads=2)
        den = _on(dev, lambda: diffusers.FluxTransformer2DModel(**tcfg).eval())
        t5tok = _t5_tokenizer()
        t5 = T5EncoderModel(T5Config(vocab_size=max(1000, len(t5tok)), d_model=4096, d_kv=64, d_ff=256,
                                     num_layers=1, num_heads=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
        pipe = diffusers.FluxPipeline(
            transformer=den, vae=_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                                      use_post_quant_conv=False),
            text_encoder=_clip(768, None, tok), tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5tok,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
            image_encoder=None, feature_extractor=None)
        call = dict(guidance_scale=4.0, true_cfg_scale=4.0, negative_prompt="blurry", height=size, width=size,
                    max_sequence_length=256)
    else:
        raise ValueError(model)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(dev, dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    pipe._bench_build = {"model": model, "denoiser": type(den).__name__, "config": {k: v for k, v in den.config.items()
                                                                                   if not k.startswith("_")},
                         "denoiser_params_b": sum(p.numel() for p in den.parameters()) / 1e9,
                         "build_s": time.perf_counter() - t0, "dtype": str(dtype), "tiny": tiny,
                         "flux_depth": FLUX_DEPTH if model == "flux" else None}
    return pipe, prompt, call
