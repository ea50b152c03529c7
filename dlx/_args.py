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
