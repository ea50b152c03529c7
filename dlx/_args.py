"""Argument checks shared by the public entry points: each names the argument and the value.

Eager checks (torchmetrics' habit): a bad argument is a ``DlxError`` before any model is built
or any step runs, never an error from inside torch, diffusers or safetensors later on.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import torch

from .errors import DlxError


def float_dtype(arg: str, value, *, allow_none: bool = False) -> torch.dtype | None:
    """A floating torch dtype, given as one (``torch.float16``) or by name (``"float16"``,
    ``"torch.float16"``, ``"half"``); anything else is a DlxError naming ``arg``."""
    if value is None and allow_none:
        return None
    dtype = value
    if isinstance(value, str):
        name = value.strip()
        name = name[len("torch."):] if name.startswith("torch.") else name
        dtype = getattr(torch, name, None) if name else None
    if not isinstance(dtype, torch.dtype):
        raise DlxError(f"argument `{arg}` must be a floating torch dtype or its name "
                       f"(torch.float32, 'float16', 'bfloat16'); got {value!r}")
    if not dtype.is_floating_point:
        raise DlxError(f"argument `{arg}` must be a floating dtype (float32, float16, bfloat16, ...); "
                       f"got {value!r}, which is not floating point")
    return dtype


def device(arg: str, value) -> torch.device:
    """A torch device from a device or a string such as ``"cpu"`` or ``"cuda:0"``."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str) and value.strip():
        try:
            return torch.device(value)
        except (RuntimeError, ValueError):
            pass
    raise DlxError(f"argument `{arg}` must be a torch.device or a device name such as 'cpu' or 'cuda'; got {value!r}")


def integer(arg: str, value, *, minimum: int | None = None) -> int:
    """An int (a bool is not one), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DlxError(f"argument `{arg}` must be an int; got {value!r}")
    if minimum is not None and value < minimum:
        raise DlxError(f"argument `{arg}` must be at least {minimum}; got {value!r}")
    return int(value)


def finite(arg: str, value, *, minimum: float | None = None) -> float:
    """A finite real number (not a bool, not NaN or inf), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise DlxError(f"argument `{arg}` must be a finite number; got {value!r}")
    if minimum is not None and value < minimum:
        raise DlxError(f"argument `{arg}` must be at least {minimum}; got {value!r}")
    return float(value)


def path(arg: str, value) -> Path:
    """A filesystem path from a str or ``os.PathLike``; not empty."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise DlxError(f"argument `{arg}` must be a path (str or os.PathLike); got {value!r}")
    p = Path(value)
    if str(value) == "":
        raise DlxError(f"argument `{arg}` must name a file; got an empty path")
    return p


def fraction(arg: str, value) -> float:
    """A real number in [0, 1] (a share of a run's steps)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise DlxError(f"argument `{arg}` must be a number in [0, 1]; got {value!r}")
    return float(value)


def in_unit_interval(arg: str, value) -> float:
    """A real number in (0, 1] (a similarity threshold)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise DlxError(f"argument `{arg}` must be in (0, 1]; got {value!r}")
    return float(value)


def per_sample(arg: str, value, check):
    """``value`` checked by ``check(arg, v)``: one value, or a non-empty list/tuple of them (one
    per sample: ``arg[i]`` names an entry)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise DlxError(f"argument `{arg}` must be a value or a non-empty list of values (one per sample); "
                           f"got {value!r}")
        return [check(f"{arg}[{i}]", v) for i, v in enumerate(value)]
    if type(value).__name__ == "Tensor":
        raise DlxError(f"argument `{arg}` must be a number or a list of numbers (one per sample); got a tensor")
    return check(arg, value)


def one_per_sample(arg: str, value, batch: int) -> list:
    """One value per sample of a run of ``batch`` samples: a list must have ``batch`` entries."""
    if isinstance(value, list):
        if len(value) != batch:
            raise DlxError(
                f"argument `{arg}` has {len(value)} values (one per sample) but the run has {batch} "
                f"sample{'s' if batch != 1 else ''}; got {arg}={value!r}"
            )
        return value
    return [value] * batch


def available_device(arg: str, value) -> torch.device:
    """A device (``device``) that this machine has: ``cuda`` needs CUDA (and its index a card),
    ``mps`` needs Apple's backend."""
    dev = device(arg, value)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DlxError(f"argument `{arg}` is {value!r} but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DlxError(f"argument `{arg}` is {value!r} but this machine has {torch.cuda.device_count()} CUDA "
                           f"device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DlxError(f"argument `{arg}` is {value!r} but MPS is not available on this machine")
    return dev


#: torch generators and SQLite both take signed 64-bit seeds
SEED_LIMIT = 2 ** 63


def seed(arg: str, value) -> int:
    """A generator seed: an int in [0, 2**63)."""
    value = integer(arg, value, minimum=0)
    if value >= SEED_LIMIT:
        raise DlxError(f"argument `{arg}` must be below 2**63 (torch generators and SQLite take signed 64-bit "
                       f"seeds); got {value!r}")
    return value


def boolean(arg: str, value) -> bool:
    """True or False, nothing else: ``"no"`` or ``"false"`` from a file is not a boolean (both
    strings are truthy), nor is 0 or 1."""
    if not isinstance(value, bool):
        raise DlxError(f"argument `{arg}` must be true or false; got {value!r}")
    return value


#: the largest side of a rendered image or preview (a 10**6-pixel side would need terabytes)
MAX_IMAGE_SIZE = 8192


def image_size(arg: str, value, *, allow_none: bool = True) -> int | None:
    """The longer side of an image in pixels: an int in [1, ``MAX_IMAGE_SIZE``] (or None where the
    image keeps its own size). For ``Preview(size=...)`` (``dlx.render._check_size``) and the
    live view."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_IMAGE_SIZE:
        raise DlxError(f"argument `{arg}` must be a positive int up to {MAX_IMAGE_SIZE} (longer side in pixels)"
                       f"{' or None' if allow_none else ''}; got {value!r}")
    return int(value)


def steps(arg: str, value) -> int:
    """A number of denoising steps: an int >= 1 (``live(num_inference_steps=0)`` would fail on
    its worker inside diffusers with a ZeroDivisionError)."""
    return integer(arg, value, minimum=1)
