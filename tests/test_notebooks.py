"""Every tutorial notebook runs top to bottom on the CPU, offline, and is committed without outputs."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ is empty"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_top_to_bottom(path, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_saved_notebook_04_keeps_a_picture_of_every_view(tmp_path):
    """Notebook 04 executed and saved: every view displayed (gallery, compare, live) left an image/png
    output beside its widget, which a reopened notebook, nbconvert or GitHub shows."""
    from nbclient import NotebookClient

    path = next(p for p in NOTEBOOKS if p.name.startswith("04"))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, tmp_path / "04.ipynb")
    saved = nbformat.read(tmp_path / "04.ipynb", as_version=4)
    views = {"widgets.gallery(trace)": "gallery", "widgets.compare(cuts)": "compare", "widgets.live(": "live"}
    seen = set()
    for cell in saved.cells:
        for code, name in views.items():
            if cell.cell_type == "code" and code in cell.source:
                seen.add(name)
                kinds = [set(o.get("data", {})) for o in cell.outputs]
                widget = [i for i, k in enumerate(kinds) if "application/vnd.jupyter.widget-view+json" in k]
                assert widget, (name, kinds)
                # the picture is the output right after the widget: what the front ends show without it
                assert "image/png" in kinds[widget[0] + 1], (name, kinds)
                png = cell.outputs[widget[0] + 1]["data"]["image/png"]
                assert len(png) > 1000, name
    assert seen == set(views.values())
    live_cell = next(c for c in saved.cells if "widgets.live(" in c.source)
    # the live view's picture was updated when the run ended: its text says why it stopped
    text = live_cell.outputs[-1]["data"]["text/plain"]
    assert "Stopped by the Stop button after step" in text, text
