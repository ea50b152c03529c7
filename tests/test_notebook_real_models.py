"""notebooks/06_real_models.ipynb on a local folder: a tiny pipeline saved with save_pretrained.

tests/test_notebooks.py runs the notebook as committed (no GPU here: its first cell says so and
the rest is skipped). This test sets the notebook's parameters to a saved tiny pipeline on the
CPU, as a user would edit its first cell, and runs the whole study: record, previews, sweep, plots.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "06_real_models.ipynb"


def _set(source: str, **params) -> str:
    """Replace ``NAME = ...`` assignments of the parameters cell, continuation lines included
    (each must be there exactly once)."""
    for name, value in params.items():
        source, n = re.subn(rf"^{name} = .*(?:\n[ \t]+.*)*", f"{name} = {value}", source, flags=re.M)
        assert n == 1, f"parameter {name} not found once in the first cell"
    return source


def _run(nb, tmp_path):
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def _text(cell) -> str:
    out = []
    for o in cell.outputs:
        if o.output_type == "stream":
            out.append(o.text)
        elif "text/plain" in o.get("data", {}):
            out.append(o["data"]["text/plain"])
    return "".join(out)


def test_local_folder_runs_the_whole_study_on_the_cpu(tmp_path):
    from dlx.testing import tiny_pipeline

    tiny_pipeline("sd").save_pretrained(tmp_path / "tiny-sd")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = nb.cells[1]
    assert first.source.startswith("# --- parameters"), "the first code cell holds the parameters"
    first.source = _set(first.source, MODEL=repr(str(tmp_path / "tiny-sd")), DEVICE='"cpu"', DTYPE='"float32"',
                        PROMPTS='["a red circle", "a blue square"]', SEEDS="range(2)", CUTOFFS="[0, 0.5, 1.0]",
                        STEPS="4", SIZE="32", OUT=repr(str(tmp_path / "out")))
    _run(nb, tmp_path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert _text(code[0]).startswith("ready: StableDiffusionPipeline from"), _text(code[0])
    assert "Trace(4 steps" in _text(code[1])
    # the sweep: one summary row per cutoff, stored in OUT, and figures drawn
    import dlx

    res = dlx.sweeps.SweepResult(tmp_path / "out")
    assert len(res.frame) == 3 * 2 * 2 and (res.frame.status == "ok").all()
    assert list(res.summary()["config"]) == ["cutoff=0", "cutoff=0.5", "cutoff=1"]
    figures = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 3  # previews, speed-quality + quality-vs-cutoff, images per cutoff


@pytest.mark.parametrize("params, reason", [
    (dict(DEVICE='"cuda:0"'), "no CUDA GPU on this machine"),
    (dict(DEVICE='"cpu"', MODEL='"nobody/no-such-model"'), "could not be loaded"),
])
def test_without_gpu_or_model_the_first_cell_says_so_and_the_rest_is_skipped(params, reason, tmp_path):
    import torch

    if "cuda" in params["DEVICE"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells[1].source = _set(nb.cells[1].source, **params)
    _run(nb, tmp_path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert _text(code[0]).startswith("SKIPPED: ") and reason in _text(code[0])
    assert all(c.outputs == [] for c in code[1:]), "later cells must not run"
