"""A fingerprint of a pipeline's (or one module's) weights: what a sweep and a metric compare on resume."""

from __future__ import annotations

import torch

from .errors import DlxError

__all__ = ["weights_fingerprint"]


def weights_fingerprint(pipe, per_tensor: int = 256) -> str | None:
    """A fingerprint of a pipeline's weights (or of one torch module's: a metric's network),
    compared when a sweep resumes: SHA-256 over every module component's parameters and
    buffers (by component name, in module order), each tensor's shape, dtype and
    ``per_tensor`` values taken at an even stride through it (as float32).

    A sample, not a full hash, so it stays cheap on a multi-GB model (one small gather per
    tensor, one copy to the host per component): fine-tuned or LoRA-fused weights, another
    checkpoint under the same name, an added adapter or a different dtype all change it; two
    sets of weights that differ only between the sampled values do not. None where weights
    cannot be read (offloaded to the ``meta`` device)."""
    import hashlib

    comps = {"": pipe} if isinstance(pipe, torch.nn.Module) else getattr(pipe, "components", None)
    if not isinstance(comps, dict):
        raise DlxError(f"argument `pipe` must be a diffusers pipeline (with .components) or a torch module; "
                       f"got {pipe!r}")
    if isinstance(per_tensor, bool) or not isinstance(per_tensor, int) or per_tensor < 1:
        raise DlxError(f"argument `per_tensor` must be a positive int; got {per_tensor!r}")
    h = hashlib.sha256()
    for name in sorted(comps):
        mod = comps[name]
        if not isinstance(mod, torch.nn.Module):
            continue
        samples = []
        for t in list(mod.parameters()) + list(mod.buffers()):
            if t.is_meta:
                return None
            flat = t.detach().reshape(-1)
            stride = max(1, flat.numel() // per_tensor)
            samples.append(flat[::stride][:per_tensor].to(torch.float32))
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if samples:
            by_dev: dict = {}
            for x in samples:
                by_dev.setdefault(x.device, []).append(x)
            for xs in by_dev.values():
                h.update(torch.cat(xs).cpu().numpy().tobytes())
    return h.hexdigest()[:32]
