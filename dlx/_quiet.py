"""Silence noise a dlx user sees on every run and can do nothing about; nothing else.

transformers 5 warns, the first time diffusers imports its pipelines, that ``CLIPImageProcessor``
(and the Siglip ones) "requires torchvision (not installed); falling back to `...Pil`": the
fallback is the PIL processor diffusers always used, so on a machine without torchvision (CPU
installs, CI) the line is noise printed on every ``python -m dlx demo`` and in every notebook.
A filter on the one logger that emits it drops exactly that message; every other record of that
logger, and every other logger and warning, passes untouched. Installing it imports nothing.
"""

from __future__ import annotations

import contextlib
import logging

__all__ = ["install", "no_load_bars"]

_LOGGER = "transformers.utils.import_utils"
_NOISE = ("requires torchvision (not installed); falling back to `",)


class _DropKnownNoise(logging.Filter):
    """Drops records whose message contains one of ``_NOISE``; passes everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(n in msg for n in _NOISE)


def install() -> None:
    """Add the filter to transformers' import-utils logger (once per process)."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
        logger.addFilter(_DropKnownNoise())


@contextlib.contextmanager
def no_load_bars():
    """diffusers' and transformers' progress bars off while a pipeline loads (a local load of a few
    components needs none), put back as they were afterwards."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()
