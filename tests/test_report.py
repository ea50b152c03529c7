"""dlx.report and the per-step curves of dlx.plots: self-contained HTML, strips, GIFs, plots."""

from __future__ import annotations

import base64
import html
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

import dlx
from dlx import DlxError, plots, report
from dlx.render import png_bytes, render_steps
from dlx.testing import example_inputs, tiny_pipeline


@pytest.fixture(scope="module")
def traces():
    pipe = tiny_pipeline("sd")
    with dlx.record(pipe) as full:
        pipe(**example_inputs("sd", steps=4, batch=2))
    with dlx.record(pipe, dlx.CFGCutoff(ratio=0.5)) as cut:
        pipe(**example_inputs("sd", steps=4, batch=2))
    return full, cut


# --- plots ---------------------------------------------------------------------------------------


def test_step_curves_draw_the_frame_values(traces):
    full, cut = traces
    fig, ax = plots.step_curves({"full": full, "cut": cut}, "cond_uncond_cos")
    lines = {l.get_label(): l for l in ax.get_lines()}
    assert set(lines) == {"full", "cut"}
    np.testing.assert_array_equal(lines["full"].get_xdata(), [1, 2, 3, 4])  # steps from 1, as galleries say
    np.testing.assert_array_equal(lines["full"].get_ydata(), full.to_frame()["cond_uncond_cos"].to_numpy(float))
    y = lines["cut"].get_ydata()
    assert np.isfinite(y[:2]).all() and np.isnan(y[2:]).all()  # no unconditional pass after the cutoff
    _, ax2 = plots.step_curves(full, "step_ms")
    np.testing.assert_array_equal(ax2.get_lines()[0].get_ydata(), full.to_frame()["step_ms"].to_numpy(float))
    _, ax3 = plots.step_curves([full, cut], "x0_std", sample=1)
    f1 = full.to_frame(per_sample=True)
    np.testing.assert_array_equal(ax3.get_lines()[0].get_ydata(), f1[f1["sample"] == 1]["x0_std"].to_numpy(float))


def test_divergence_from_a_reference(traces):
    full, cut = traces
    fig, ax = plots.step_curves({"full": full, "cut": cut}, "divergence", reference="full")
    (line,) = ax.get_lines()
    want = cut.compare(full)["latents_rmse"].to_numpy(float)
    np.testing.assert_array_equal(line.get_ydata(), want)
    assert want[0] == 0 and want[-1] > 0  # the runs agree until the cutoff, then part
    # an axis is reused, never shown
    fig2, ax2 = plots.step_curves(full, "latent_std", ax=ax)
    assert ax2 is ax and fig2 is fig and len(ax.get_lines()) == 2
    with pytest.raises(DlxError, match="what"):
        plots.step_curves(full, "psnr")
    with pytest.raises(DlxError, match="reference"):
        plots.step_curves({"a": full}, "divergence", reference="b")
    with pytest.raises(DlxError, match="traces"):
        plots.step_curves("trace.safetensors")


# --- strips and GIFs -----------------------------------------------------------------------------


def test_strip_is_steps_by_samples(traces):
    full, _ = traces
    im = report.strip(full, samples=[0, 1], size=32)
    assert im.width >= 4 * 32 and im.height >= 2 * 32
    # the tiles are the renders, enlarged with sharp edges: find step 3, sample 1 in the strip
    tile = np.asarray(Image.open(io.BytesIO(png_bytes(render_steps(full, "x0", [1], steps=[3])[0, 0], 32))))
    a = np.asarray(im)
    found = any(np.array_equal(a[y:y + 32, x:x + 32], tile) for y in range(0, a.shape[0] - 31)
                for x in range(a.shape[1] - 32 - 40, a.shape[1] - 31))
    assert found


def test_gif_has_a_frame_per_step(traces, tmp_path):
    from dlx import widgets

    p = widgets.gallery(traces[0], size=32).save_gif(tmp_path / "g.gif")
    with Image.open(p) as im:
        assert im.format == "GIF" and im.n_frames == 4
    assert not list(tmp_path.glob(".*tmp"))  # written atomically


# --- HTML ----------------------------------------------------------------------------------------


def _galleries(doc):
    return [json.loads(m.replace("<\\/", "</")) for m in
            re.findall(r"<script type='application/json' class='dlx-data'>(.*?)</script>", doc, re.S)]


def test_trace_report_is_self_contained(traces, tmp_path):
    full, _ = traces
    path = report.report(full, tmp_path / "r.html")
    doc = path.read_text()
    assert doc.startswith("<!DOCTYPE html>")
    # no network: no external scripts, styles, images or fonts
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", doc)
    assert "<link" not in doc and "@import" not in doc
    (g,) = _galleries(doc)
    assert g["kinds"] == ["x0", "latent"] and len(g["frames"]["x0"]) == 4 and len(g["frames"]["x0"][0]) == 2
    # the frames are the renders, at the decoder's resolution (shown pixelated by the browser)
    want = render_steps(full, "latent", [1], steps=[2])[0, 0].numpy()
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(g["frames"]["latent"][2][1]))))
    assert np.array_equal(got, want)
    assert g["labels"][0].startswith("step 1/4")
    assert "image-rendering:pixelated" in doc and "cond_uncond_l2" in doc  # CSS and the per-step table
    assert doc.count("data:image/png;base64,") >= 4  # the plots, inline


def test_report_of_several_traces_and_bad_input(traces):
    full, cut = traces
    doc = report.report({"full": full, "cut": cut})
    (g,) = _galleries(doc)
    assert len(g["frames"]["x0"][0]) == 2 and "alt='divergence'" in doc
    with pytest.raises(DlxError, match="obj"):
        report.report(42)
    with pytest.raises(DlxError, match="obj"):
        report.report([full, "x"])


def test_sweep_report(tmp_path):
    pipe = tiny_pipeline("sd")
    res = dlx.sweep(pipe, prompts=["a red circle", "a blue square"], seeds=[0, 1], cutoffs=[0, 1.0], timing=(),
                    progress=False, out=tmp_path / "s", keep_previews=True, num_inference_steps=3, height=32, width=32)
    doc = report.report(res)
    gals = _galleries(doc)
    assert len(gals) == 4  # every prompt-seed group, each with its own slider
    g = gals[0]
    assert len(g["frames"]["x0"]) == 3 and len(g["frames"]["x0"][0]) == 2  # steps × configs
    f = res.frame
    row = f[(f.config == "cutoff=1") & (f.prompt == "a red circle") & (f.seed == 0)].row_id.item()
    kept = res.previews(row)[2].numpy()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(g["frames"]["x0"][2][1])))), kept)
    # captions per step: CFG on or off at the step shown (cutoff=0 never guides, full guidance always)
    assert g["captions"][0][0].startswith("cutoff=0 · NFE 3 · CFG off at step 1")
    assert g["captions"][2][1].startswith("cutoff=1 · NFE 6 · CFG on at step 3")
    for (prompt, seed) in [("a red circle", 0), ("a red circle", 1), ("a blue square", 0), ("a blue square", 1)]:
        assert f"prompt {prompt!r} · seed {seed}".replace("'", "&#x27;") in doc
    # the answer first: the recommendation (where this dlx has one), then speed against quality
    assert doc.index("Which config?") < doc.index("alt='speed against") < doc.index("Summary (one row per config")
    if hasattr(res, "recommend"):
        assert str(res.recommend()) in html.unescape(doc)
    # key columns "mean [lo, hi]"; the reference shown as such, not as 100 dB
    assert re.search(r"<td>cutoff=1 \(reference\)</td>|<td>cutoff=1</td>", doc)
    assert re.search(r"<td>\d+\.\d \[\d+\.\d, \d+\.\d\]</td>", doc)  # psnr of cutoff=0 with its interval
    # provenance: versions, device, weights, scheduler, steps, scale, resolution, each config's JSON
    prov = doc[doc.index("<h2>Provenance</h2>"):]
    import diffusers
    import torch

    for want in (f"{torch.__version__}", f"{diffusers.__version__}", "transformers", "rows computed on",
                 "weights fingerprint", "scheduler", "32×32", "torch threads", '"type": "CFGCutoff"'):
        assert want in prov.replace("&quot;", '"'), want
    # the full summary table scrolls in its own box, not the page
    assert re.search(r"Summary \(one row per config[^<]*</h2><div class='wide'><table", doc)
    from dlx.demo import write_outputs  # python -m dlx demo writes report.html beside its other files

    files = write_outputs(res, tmp_path / "s")
    assert files["report"] == tmp_path / "s" / "report.html" and "<script>" in files["report"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", doc)


def test_sweep_report_without_previews_shows_final_images(tmp_path):
    pipe = tiny_pipeline("sd")
    res = dlx.sweep(pipe, prompts=["a red circle"], seeds=[0], cutoffs=[0, 1.0], timing=(), progress=False,
                    out=tmp_path / "s", num_inference_steps=3, height=32, width=32)
    doc = report.report(res)
    (g,) = _galleries(doc)
    assert g["labels"] == ["final images"] and "run with keep_previews=True" in doc
    assert g["captions"][0][0].startswith("cutoff=0 · NFE 3 · CFG off at step 3")
    with pytest.raises(DlxError, match="metric"):
        report.report(res, metric="fid")
