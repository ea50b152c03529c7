"""Small models that ship inside dlx (no downloads): `load`, `info`, `adherence`.

    import dlx.zoo, torch
    pipe = dlx.zoo.load("shapes", device="cpu", dtype=torch.float32)
    facts = dlx.zoo.info("shapes")           # language, recommended scale, measured numbers
    img = pipe("a red circle on the left and a blue square on the right",
               guidance_scale=facts["recommended_guidance_scale"], num_inference_steps=25,
               generator=torch.Generator().manual_seed(0)).images[0]
    dlx.zoo.adherence([img], ["a red circle on the left and a blue square on the right"])   # DataFrame

Importing this module is light: torch, diffusers, transformers and pandas are imported only
when a model is loaded or adherence is measured. On import each model registers its small VAE
with the rendering floor (``dlx.render.register_vae``), so previews of its latents decode through
it (``decoder="auto"``); ``import dlx`` imports this module for that. The scripts that trained and
measured the models live outside the package, in ``tools/zoo/``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path, PurePath

from dlx.render.registry import register_vae

MODELS = ("shapes",)
_ROOT = Path(__file__).resolve().parent

# files a pipeline folder must hold, beside its JSON configs
_WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors")


def path(name: str = "shapes") -> Path:
    """The folder of a shipped model."""
    from dlx.errors import DlxError

    if not isinstance(name, str) or name not in MODELS:
        raise DlxError(f"argument `name`: unknown zoo model {name!r}; shipped: {', '.join(MODELS)}")
    return _ROOT / name


def info(name: str = "shapes") -> dict:
    """The model card's facts as data: caption language (colours, shapes, relations,
    templates), recommended guidance scale, image size, measured numbers."""
    from dlx.errors import DlxError

    f = path(name) / "info.json"
    if not f.is_file():
        raise DlxError(f"model facts missing: {f} (folder {f.parent})")
    try:
        facts = json.loads(f.read_text())
    except (ValueError, RecursionError) as e:
        raise DlxError(f"model facts damaged: {f} is not valid JSON ({e})") from None
    if not isinstance(facts, dict):
        raise DlxError(f"model facts damaged: {f} holds {type(facts).__name__}, not an object")
    return facts


def load(name: str = "shapes", device="cpu", dtype=None, folder: str | Path | None = None):
    """The shipped StableDiffusionPipeline, loaded offline with from_pretrained (fp16 files
    cast to `dtype`: a floating torch dtype or its name such as "float16"; float32 by default),
    progress bar off, no safety checker. `folder` loads a copy of the model's folder instead
    of the shipped one."""
    import torch
    from dlx import _args
    from dlx.errors import DlxError

    shipped = path(name)  # checks `name` also when a copy's `folder` is given
    folder = _args.path("folder", folder) if folder is not None else shipped
    dtype = _args.float_dtype("dtype", dtype, allow_none=True)
    device = _args.device("device", device)
    if not (folder / "model_index.json").is_file():
        raise DlxError(f"not a pipeline folder (no model_index.json): {folder}")
    missing = [w for w in _WEIGHTS if not (folder / w).is_file()]
    if missing:
        raise DlxError(f"zoo model {name!r} in {folder} lacks its weights file(s): "
                       f"{', '.join(missing)} (renamed or deleted?)")
    from diffusers import StableDiffusionPipeline

    from dlx._quiet import no_load_bars

    try:
        with no_load_bars():  # a 5-component local load needs no progress bars
            pipe = StableDiffusionPipeline.from_pretrained(
                str(folder), dtype=dtype or torch.float32, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise DlxError(f"could not load zoo model {name!r} from {folder}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def adherence(images, prompts, **kw):
    """Per image, whether it shows its shapes-language prompt (see dlx.zoo.metric):
    a pandas DataFrame with one row per image, boolean columns and an overall `ok`."""
    from dlx.zoo.metric import adherence as _adherence

    return _adherence(images, prompts, **kw)


def latent_rgb(name: str = "shapes", vae=None, n: int = 32, seed: int = 0):
    """Latent→RGB preview map for this model's VAE, fitted by least squares on ``n`` fresh
    renders (``dlx.fit_latent_rgb``); pass the loaded pipeline's ``vae`` to skip loading it."""
    import torch

    from dlx import _args
    from dlx.render.fit import fit_latent_rgb
    from dlx.zoo.shapes_data import render, sample_scenes

    path(name)
    _args.integer("n", n, minimum=1)
    _args.integer("seed", seed)
    if vae is not None and not (isinstance(vae, torch.nn.Module) and callable(getattr(vae, "encode", None))):
        from dlx.errors import DlxError

        raise DlxError(f"argument `vae` must be a diffusers VAE (with encode) or None; got {vae!r:.80}")
    if vae is None:
        vae = load(name).vae
    images = render(sample_scenes(n, torch.Generator().manual_seed(seed)))
    return fit_latent_rgb(vae, images, name=f"{name}-fitted")


# --- what rendering needs: each model's own small VAE ---------------------------------------------


def _names_model(name: str, p: PurePath) -> bool:
    """Whether a pipeline's ``name_or_path`` is a folder ``.../zoo/<name>``: the shipped model, on any
    machine (a trace recorded elsewhere names that machine's install)."""
    return p.name == name and p.parent.name == "zoo"


def _load_vae(name: str, device, dtype):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(path(name) / "vae"), dtype=dtype, local_files_only=True)


for _name in MODELS:
    register_vae(_name, functools.partial(_names_model, _name), functools.partial(_load_vae, _name))
