"""dlx._quiet drops transformers' torchvision fallback line and nothing else."""

import logging
import subprocess
import sys


def test_the_filter_drops_only_the_known_line():
    import dlx  # noqa: F401  (installs the filter)

    logger = logging.getLogger("transformers.utils.import_utils")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    other = logging.getLogger("transformers.something_else")
    other.addHandler(handler)
    try:
        noise = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
                 "for backward compatibility.")
        logger.warning(noise)
        logger.warning("Could not import module 'x': a real problem")
        other.warning(noise)  # the same words from another logger are not ours to drop
    finally:
        logger.removeHandler(handler)
        other.removeHandler(handler)
    assert seen == ["Could not import module 'x': a real problem", noise]


def test_loading_a_pipeline_prints_no_torchvision_fallback_line():
    code = ("import dlx; pipe = dlx.testing.tiny_pipeline('sd'); import transformers; "
            "transformers.utils.logging.get_logger('transformers.utils.import_utils').warning('still here')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    assert "falling back to" not in text, text
    assert "still here" in text
