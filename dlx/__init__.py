"""dlx: research instruments for the denoising loop of diffusers pipelines.

run → trace → rows → metrics → frames → plots and widgets. Heavy parts import lazily, so
``import dlx`` stays fast.
"""

from __future__ import annotations

import importlib

from . import _quiet, zoo  # noqa: F401  (zoo: its models register their decoders with dlx.render; light)
from .errors import DlxError

_quiet.install()  # drops transformers' "requires torchvision ... falling back" line, nothing else

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "attach": "session",
    "Part": "protocol",
    "Guide": "protocol",
    "DenoiserCall": "protocol",
    "RunInfo": "protocol",
    "Recorder": "recorder",
    "record": "recorder",
    "Trace": "trace",
    "Step": "trace",
    "family_of": "families",
    "CFGCutoff": "guidance",
    "GuidanceInterval": "guidance",
    "GuidanceSchedule": "guidance",
    "AdaptiveCutoff": "guidance",
    "IPAdapterCutoff": "guidance",
    "Guider": "guiders",
    "Interrupt": "interrupt",
    "Share": "share",
    "part_from_config": "parts",
    "sweep": "sweeps",
    "Preview": "preview",
    "fit_latent_rgb": "render",
    "latents_to_rgb": "render",
}
_SUBMODULES = {"testing", "zoo", "preview", "families", "guidance", "guiders", "trace", "recorder", "session", "parts", "protocol",
               "sweeps", "stats", "labels", "tiles", "metrics", "plots", "render", "widgets", "report"}

__all__ = ["DlxError", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dlx' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
