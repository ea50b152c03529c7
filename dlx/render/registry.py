"""Models that bring their own decoder: a model registers here what rendering needs to draw its
latents, so rendering never asks for the model (it stands below every model that uses it).

A registered VAE is one small enough to decode every step (the embedded ``dlx.zoo`` models
register theirs when ``dlx.zoo`` is imported, which ``import dlx`` does). ``decoder="auto"``
(:func:`dlx.render.decoder_for`) then decodes that model's latents with it instead of the
family's linear map, wherever the model is named by its ``name_or_path``: a live pipeline's, or
``trace.meta["model"]`` of a trace recorded on another machine.

Imports nothing heavy: ``dlx.zoo`` registers at ``import dlx`` without importing torch.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Callable, NamedTuple

from ..errors import DlxError

__all__ = ["register_vae", "registered_vae"]


class RegisteredVAE(NamedTuple):
    name: str
    matches: Callable[[PurePath], bool]  # does this name_or_path (as a path) name the model?
    load: Callable  # load(device, dtype) -> the VAE module, called once per device and dtype


_VAES: dict[str, RegisteredVAE] = {}


def register_vae(name: str, matches: Callable[[PurePath], bool], load: Callable) -> None:
    """Register model ``name``'s small VAE: ``matches(path)`` says whether a pipeline's
    ``name_or_path`` (given as a ``PurePath``, ``/`` separators) names the model, ``load(device,
    dtype)`` returns its VAE. Registering a name again replaces its entry."""
    if not isinstance(name, str) or not name:
        raise DlxError(f"argument `name` must be a non-empty str; got {name!r}")
    for arg, f in (("matches", matches), ("load", load)):
        if not callable(f):
            raise DlxError(f"argument `{arg}` must be callable; got {type(f).__name__}")
    _VAES[name] = RegisteredVAE(name, matches, load)


def registered_vae(model) -> RegisteredVAE | None:
    """The registered entry whose model ``model`` (a ``name_or_path``: str or path) names, else ``None``."""
    if not isinstance(model, (str, PurePath)) or not str(model):
        return None
    p = PurePath(str(model).replace("\\", "/"))
    return next((e for e in _VAES.values() if e.matches(p)), None)
