"""Per-image quality metrics for sweeps: a functional core, each metric with ``higher_is_better``.

Every metric is a callable ``f(images, prompts, reference_images) -> per-image values`` with
images float tensors (B, 3, H, W) in [0, 1]:

* ``psnr``, ``ssim``: fidelity to the reference image (full guidance, same prompt and seed),
  from torchmetrics (``peak_signal_noise_ratio``, ``structural_similarity_index_measure``,
  data range 1). PSNR of identical images is infinite; it is reported as ``PSNR_CAP`` (100 dB)
  so means and plots stay finite.
* ``lpips``: torchmetrics' LPIPS computation with the network the user passes
  (``networks={"lpips": net}``: torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` or its
  ``.net``, called as ``net(a, b, normalize=True)``); no weights are downloaded here.
* ``clip``: CLIP score (torchmetrics' definition, 100 · max(cos, 0)) with the model and
  processor the user passes (``networks={"clip": (model, processor)}``).
* ``adherence``: the embedded shapes model's check (``dlx.zoo.adherence``), 1.0 or 0.0 per image.
* any user callable with that signature (its ``higher_is_better`` attribute, default True).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import DlxError

__all__ = ["Metric", "resolve", "BUILTIN", "PSNR_CAP", "psnr", "ssim", "adherence"]

PSNR_CAP = 100.0


@dataclass(frozen=True)
class Metric:
    """A named per-image metric. ``reference``: it compares with the full-guidance image.
    ``on_device``: the sweep hands it images on the pipeline's device (else on the CPU)."""

    name: str
    fn: Callable
    higher_is_better: bool = True
    reference: bool = False
    on_device: bool = False
    #: what the values depend on besides the name: a callable's code, a network's weights
    #: (a resumed sweep refuses a metric whose identity changed since its values were stored)
    identity: str | None = None

    def __call__(self, images, prompts, reference_images=None) -> list[float]:
        """One float per image; anything else (a scalar, a (B, 2) tensor, too few values, a
        non-number) is a DlxError saying what came back, which the sweep records as the
        metric's failure on those rows."""
        return _per_image(self.name, self.fn(images, prompts, reference_images), len(prompts))


def _per_image(name: str, vals, n: int) -> list[float]:
    import numbers

    shape = getattr(vals, "shape", None)
    if shape is not None:
        shape = tuple(int(x) for x in shape)
        if len(shape) == 0:
            raise DlxError(f"metric {name!r} returned one value (a 0-d {type(vals).__name__}) for {n} images; "
                           f"it must return one value per image")
        if len(shape) > 1 and [x for x in shape if x != 1] != [n]:
            raise DlxError(f"metric {name!r} returned shape {shape} for {n} images; it must return one value "
                           f"per image ({n},)")
        vals = vals.reshape(-1).tolist()
    elif isinstance(vals, (numbers.Number, str, bytes)) or not hasattr(vals, "__iter__"):
        raise DlxError(f"metric {name!r} returned {type(vals).__name__} {vals!r} for {n} images; it must "
                       f"return one value per image")
    vals = list(vals)
    if len(vals) != n:
        raise DlxError(f"metric {name!r} returned {len(vals)} values for {n} images")
    out = []
    for v in vals:
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
            v = v.item()
        if not isinstance(v, numbers.Real):  # a bool is 1.0 or 0.0 (a yes/no metric)
            raise DlxError(f"metric {name!r} returned {type(v).__name__} {v!r} among its values; each must be "
                           f"a real number")
        out.append(float(v))
    return out


def psnr(images, prompts, reference_images) -> list[float]:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    v = peak_signal_noise_ratio(images.float(), reference_images.float(), data_range=1.0, reduction="none",
                                dim=(1, 2, 3))
    return [min(float(x), PSNR_CAP) for x in v.reshape(-1)]


def ssim(images, prompts, reference_images) -> list[float]:
    from torchmetrics.functional.image import structural_similarity_index_measure

    v = structural_similarity_index_measure(images.float(), reference_images.float(), data_range=1.0,
                                            reduction="none")
    return [float(x) for x in v.reshape(-1)]


def adherence(images, prompts, reference_images=None) -> list[float]:
    from .zoo import adherence as _adherence

    return [1.0 if ok else 0.0 for ok in _adherence(images, list(prompts))["ok"].tolist()]


def _lpips(net):
    import torch

    inner = getattr(net, "net", net)  # torchmetrics' metric object or its network

    def fn(images, prompts, reference_images):
        p = next(inner.parameters(), None)
        dev = p.device if p is not None else images.device
        with torch.no_grad():
            v = inner(images.float().to(dev), reference_images.float().to(dev), normalize=True)
        return [float(x) for x in v.reshape(-1)]

    return fn


def _features(out):
    """Embeddings from ``get_*_features``: a tensor, or (newer transformers) an output object."""
    if hasattr(out, "norm"):
        return out
    for k in ("image_embeds", "text_embeds", "pooler_output"):
        v = getattr(out, k, None)
        if v is not None:
            return v
    raise DlxError(f"the CLIP model returned {type(out).__name__}, not embeddings")


def _clip(pair):
    """CLIP score as torchmetrics defines it: 100 · max(cos(image, text), 0), per image. Computed
    here with the user's model and processor (torchmetrics' ``clip_score`` reads
    ``get_image_features`` as a tensor, which newer transformers return wrapped)."""
    model, processor = pair

    def fn(images, prompts, reference_images):
        import torch

        x = [(img.float().clamp(0, 1) * 255).round().to(torch.uint8) for img in images]
        batch = processor(text=list(prompts), images=x, return_tensors="pt", padding=True)
        dev = next(model.parameters()).device
        with torch.no_grad():
            img = _features(model.get_image_features(pixel_values=batch["pixel_values"].to(dev)))
            txt = _features(model.get_text_features(input_ids=batch["input_ids"].to(dev),
                                                    attention_mask=batch["attention_mask"].to(dev)))
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return (100 * cos.clamp_min(0)).tolist()

    return fn


BUILTIN = {
    "psnr": dict(higher_is_better=True, reference=True, on_device=True),
    "ssim": dict(higher_is_better=True, reference=True, on_device=True),
    "lpips": dict(higher_is_better=False, reference=True),
    "clip": dict(higher_is_better=True, reference=False),
    "adherence": dict(higher_is_better=True, reference=False),
}
_NETWORKS = {"lpips": "networks={'lpips': net} (torchmetrics LPIPS or its .net)",
             "clip": "networks={'clip': (model, processor)} (a transformers CLIPModel and CLIPProcessor)"}


def resolve(metrics, networks=None) -> list[Metric]:
    """Names and callables -> Metric objects, checked before any model work."""
    networks = dict(networks or {})
    for k in networks:
        if k not in _NETWORKS:
            raise DlxError(f"argument `networks` has unknown key {k!r}; it takes {list(_NETWORKS)}")
    if isinstance(metrics, (str, Metric)) or callable(metrics):
        metrics = [metrics]
    out: list[Metric] = []
    for m in metrics or []:
        if isinstance(m, Metric):
            out.append(m)
        elif isinstance(m, str):
            if m not in BUILTIN:
                raise DlxError(f"argument `metrics` has unknown metric {m!r}; built in: {list(BUILTIN)} "
                               f"(or pass a callable f(images, prompts, reference_images))")
            if m in _NETWORKS and m not in networks:
                raise DlxError(f"argument `metrics`: {m!r} needs its network: pass {_NETWORKS[m]}; "
                               f"no weights are downloaded")
            fn = {"psnr": psnr, "ssim": ssim, "adherence": adherence}.get(m)
            ident = None
            if m == "lpips":
                fn = _lpips(networks["lpips"])
                ident = _weights_id(getattr(networks["lpips"], "net", networks["lpips"]))
            elif m == "clip":
                pair = networks["clip"]
                if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                    raise DlxError(f"argument `networks`: 'clip' must be (model, processor); got {pair!r}")
                fn = _clip(pair)
                ident = _weights_id(pair[0])
            out.append(Metric(m, fn, **BUILTIN[m], identity=ident))
        elif callable(m):
            name = getattr(m, "__name__", type(m).__name__)
            # a user metric gets the full-guidance images, as its documented signature says,
            # unless it sets ``reference = False`` (then None, and no reference PNG is read)
            out.append(Metric(name, m, bool(getattr(m, "higher_is_better", True)),
                              bool(getattr(m, "reference", True)), identity=_code_id(m)))
        else:
            raise DlxError(f"argument `metrics` takes metric names or callables; got {m!r}")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise DlxError(f"argument `metrics` names a metric twice: {names}")
    for n in names:
        if n in FRAME_COLUMNS or n.startswith("time_"):
            raise DlxError(f"argument `metrics`: a metric named {n!r} would clash with the results' column of "
                           f"that name; rename it (set its __name__)")
    return out


#: the columns of a sweep's frame besides its metrics (a metric may not take their names)
FRAME_COLUMNS = ("row_id", "config", "config_json", "cutoff", "guidance_scale", "steps", "prompt", "seed", "status",
                 "error", "nfe", "guided_steps", "evaluations", "image", "batch", "device")


def _code_id(fn) -> str:
    """A short hash of a callable's code (its source where Python has it, else its bytecode and
    constants), so an edited metric function is told from the one that made stored values."""
    import hashlib
    import inspect

    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn)
    try:
        text = inspect.getsource(target)
    except (OSError, TypeError):
        code = getattr(getattr(target, "__func__", target), "__code__", None)
        text = repr((code.co_code, code.co_consts)) if code is not None else repr(target)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _weights_id(module) -> str | None:
    """A short fingerprint of a network's weights (``dlx.sweeps.weights_fingerprint``)."""
    import torch

    if not isinstance(module, torch.nn.Module):
        return None
    from .fingerprint import weights_fingerprint

    fp = weights_fingerprint(module)
    return fp[:16] if fp else None
