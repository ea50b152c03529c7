"""dlx.widgets: the widget trees, the slider and toggle picking the right cached bytes, Stop ending a live run."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import dlx
from dlx import DlxError, widgets
from dlx.render import render_steps, to_pil
from dlx.testing import example_inputs, tiny_pipeline

ipywidgets = pytest.importorskip("ipywidgets")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


@pytest.fixture(scope="module")
def trace(pipe):
    with dlx.record(pipe, dlx.CFGCutoff(ratio=0.5)) as t:
        pipe(**example_inputs("sd", steps=4, batch=2))
    return t


def _png(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def test_gallery_tree(trace):
    g = widgets.gallery(trace)
    assert isinstance(g.widget, ipywidgets.VBox)
    controls, header, grid, hider = g.widget.children
    assert "display:none" in hider.value  # hides the static PNG beside a live widget
    assert list(controls.children) == [g.play, g.slider, g.toggle]
    assert isinstance(g.play, ipywidgets.Play) and isinstance(g.slider, ipywidgets.IntSlider)
    assert (g.slider.min, g.slider.max, g.slider.value) == (0, 3, 3)  # opens on the last step
    assert g.toggle.options == (("x_t", "latent"), ("x0", "x0")) and g.toggle.value == "x0"
    assert isinstance(grid, ipywidgets.GridBox) and len(grid.children) == 2  # one tile per sample
    caption, image = grid.children[1].children
    assert isinstance(image, ipywidgets.Image) and image.format == "png"
    assert "sample 1" in caption.value
    # The label says step, timestep, sigma, scale and whether CFG ran.
    s = trace.steps[3]
    assert f"step 4/4 · t={s.timestep:.0f} · σ={s.sigma:.3g} · scale 5 · CFG off" in header.value
    assert "CFG on 2/2 samples" in g.label(0)
    # 2 tiles: 192 px each, rendered at that size (no browser rescaling)
    assert _png(image.value).shape == (192, 192, 3) and image.layout.width == "192px"


def test_labels_read_each_samples_own_guidance():
    """Per-sample scales that differ are shown as their range, never as a mean nothing ran at."""
    from pathlib import Path

    from dlx.labels import sample_label as _sample_label, step_label as _step_label

    t = dlx.Trace.load(Path(__file__).parent / "data" / "trace_v1" / "cutoff_b2.safetensors")
    assert _step_label(t, 0).endswith("· scale 2–3 per sample · CFG on 2/2 samples")
    assert _step_label(t, 1).endswith("· scale 2.5–4 per sample · CFG on 1/2 samples")
    assert _step_label(t, 3).endswith("· scale 5 · CFG off")
    # a gallery of some samples counts those it shows
    assert _step_label(t, 1, [1]).endswith("· scale 4 · CFG off")
    assert _step_label(t, 1, [0]).endswith("· scale 2.5 · CFG on")
    assert widgets.gallery(t, kind="latent", samples=[1]).label(1).endswith("· scale 4 · CFG off")
    assert _sample_label(t, 1, 0).endswith("· scale 2.5 · CFG ✓")
    assert _sample_label(t, 1, 1).endswith("· scale 4 · CFG –")


def test_slider_shows_the_right_steps_bytes(trace):
    g = widgets.gallery(trace)
    want = render_steps(trace, "x0")
    for step in (0, 2, 1):
        g.slider.value = step  # what dragging does: the observer picks cached bytes
        for j, im in enumerate(g.images_w):
            assert np.array_equal(_png(im.value), np.asarray(to_pil(want[step, j], 192)))
        assert g.label().startswith(f"step {step + 1}/4")
    assert not np.array_equal(_png(g.images_w[0].value), _png(g.images(3)[0]))  # steps differ


def test_toggle_switches_between_x_t_and_x0(trace):
    g = widgets.gallery(trace)
    g.slider.value = 1
    x0 = _png(g.images_w[0].value)
    g.toggle.value = "latent"
    lat = _png(g.images_w[0].value)
    assert np.array_equal(lat, np.asarray(to_pil(render_steps(trace, "latent")[1, 0], 192)))
    assert not np.array_equal(lat, x0)
    assert "x_t" in g.header.value
    g.toggle.value = "x0"
    assert np.array_equal(_png(g.images_w[0].value), x0)


def test_layout_for_1_4_and_16_tiles():
    assert [(widgets.tile_size(n), widgets.columns(n)) for n in (1, 2, 4, 9, 16, 32)] == [
        (256, 1), (192, 2), (192, 2), (128, 3), (128, 4), (96, 6)]


def test_captions_wrap_between_parts_not_inside_them():
    # 16 tiles are 128 px: "sample 12 · scale 6 · CFG ✓" takes two lines there; it may break after a
    # " · ", never between "scale" and "6" (tests/test_browser.py checks how Chromium lays it out)
    html = widgets.caption_html("sample 12 · scale 6 · CFG ✓ · <b>")
    spans = html.split("<span ")[1:]
    assert [s.split(">", 1)[1].split("</span>")[0] for s in spans] == [
        "sample 12 ·", "scale 6 ·", "CFG ✓ ·", "&lt;b&gt;"]
    assert all("display:inline-block" in s for s in spans)


def test_gallery_without_a_front_end_is_a_png_strip(trace):
    g = widgets.gallery(trace, samples=[1], size=64)
    bundle = g._repr_mimebundle_()  # no kernel here: text and a PNG strip, never a failure
    assert "1 tile(s) × 4 steps" in bundle["text/plain"]
    strip = Image.open(io.BytesIO(bundle["image/png"]))
    assert strip.width >= 4 * 64 and strip.height > 64  # 4 steps in a row, labels above


def test_gallery_bad_arguments(trace):
    with pytest.raises(DlxError, match="trace"):
        widgets.gallery("not a trace")
    with pytest.raises(DlxError, match="kind"):
        widgets.gallery(trace, kind="noise")
    with pytest.raises(DlxError, match="samples"):
        widgets.gallery(trace, samples=[2])
    with pytest.raises(DlxError, match="size"):
        widgets.gallery(trace, size=-1)
    with pytest.raises(DlxError, match="step"):
        widgets.gallery(trace).show_step(4)


def test_compare_traces_on_one_slider(pipe, trace):
    with dlx.record(pipe) as full:
        pipe(**example_inputs("sd", steps=4, batch=2))
    c = widgets.compare({"full CFG": full, "cutoff 0.5": trace}, sample=1)
    assert len(c.images_w) == 2 and "full CFG" in c.captions_w[0].value
    assert "NFE" in c.captions_w[1].value
    c.slider.value = 0
    a = render_steps(full, "x0", [1])
    b = render_steps(trace, "x0", [1])
    assert np.array_equal(_png(c.images_w[0].value), np.asarray(to_pil(a[0, 0], 192)))
    assert np.array_equal(_png(c.images_w[1].value), np.asarray(to_pil(b[0, 0], 192)))
    c.slider.value = 3  # the cutoff changed the late steps: the two tiles differ
    assert not np.array_equal(_png(c.images_w[0].value), _png(c.images_w[1].value))
    auto = widgets.compare([full, trace])  # labels from the recorded controls
    assert auto.captions_w[0].value.count("full CFG") == 1
    # NFE and guided steps from the trace's record, CFG at the step shown, prompt and seed; no wall clock
    assert auto.captions(3) == [
        "full CFG · NFE 8 · guided 4/4 steps · CFG on at step 4 · 'a red circle' · seed 0",
        "CFGCutoff(ratio=0.5) · NFE 6 · guided 2/4 steps · CFG off at step 4 · 'a red circle' · seed 0"]
    assert auto.captions(0)[1].endswith("CFG on at step 1 · 'a red circle' · seed 0")
    assert " s loop" not in "".join(auto.captions(3))
    with pytest.raises(DlxError, match="labels"):
        widgets.compare([full, trace], labels=["one"])


def test_live_stop_ends_the_run_early(pipe):
    reached, gate = threading.Event(), threading.Event()

    def hold(p, step, t, kw):  # the run waits at step 1 until the test has pressed Stop
        if step == 1:
            reached.set()
            gate.wait(30)
        return kw

    run = widgets.live(pipe, kind="latent", size=64, callback_on_step_end=hold,
                       **example_inputs("sd", steps=8))
    assert reached.wait(60), "the run never reached step 1"
    assert run.running and run.thread is not threading.main_thread()
    assert isinstance(run.widget, ipywidgets.VBox) and run.stop_button.description == "Stop"
    run.stop_button.click()
    assert run.event.is_set()
    gate.set()
    trace = run.wait(60)
    assert len(trace) == 2 and "stop requested" in trace.stop_reason
    assert run.output is not None and run.steps_seen == 2
    assert _png(run.image_w.value).shape == (64, 64, 3) and run.stop_button.disabled
    # one short sentence, steps counted from 1 as the progress bar counts them
    assert run.status == "Stopped by the Stop button after step 2 of 8." and run.status in run.label_w.value
    assert run.progress_w.value == 2 and run.progress_w.max == 8
    assert run.about == "'a red circle' · seed 0 · scale 5" and "seed 0 · scale 5" in run.about_w.value


def test_live_runs_to_the_end_and_reports_errors(pipe):
    run = widgets.live(pipe, kind="latent", **example_inputs("sd", steps=3))
    assert len(run.wait(60)) == 3 and run.trace.stop_reason in (None, "completed")
    assert run.status == "Finished: all 3 steps ran."
    png = Image.open(io.BytesIO(run._repr_mimebundle_()["image/png"]))  # the picture a saved notebook keeps
    assert png.width >= 256 and png.height > 256
    bad = widgets.live(pipe, kind="latent", **example_inputs("sd", steps=2, height=33))
    with pytest.raises(Exception):
        bad.wait(60)
    assert bad.error is not None and bad.status.startswith("Failed after 0 step(s): ") and "Failed" in bad.label_w.value
    with pytest.raises(DlxError, match="kind"):
        widgets.live(pipe, kind="noise")


# --- compare over a sweep -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, pipe):
    call = dict(num_inference_steps=3, height=32, width=32)
    kw = dict(prompts=["a red circle"], seeds=[0], cutoffs=[0, 0.5, 1.0], timing=(), progress=False, **call)
    kept = dlx.sweep(pipe, out=tmp_path_factory.mktemp("kept"), keep_previews=True, **kw)
    final = dlx.sweep(pipe, out=tmp_path_factory.mktemp("final"), **kw)
    return kept, final


def test_compare_a_sweep_with_kept_previews(sweeps):
    kept, _ = sweeps
    c = widgets.compare(kept)
    f = kept.frame
    assert len(c.images_w) == 3 and c.n_steps == 3 and c.slider.max == 2
    shares = dict(zip(kept.summary().config, kept.summary().time_eager_vs_full)) if "time_eager_vs_full" in kept.summary() else {}
    assert c.captions(0) == [f"cutoff=0 · NFE 3 · CFG off at step 1 · psnr {f.psnr[0]:.3g}",
                             f"cutoff=0.5 · NFE 5 · CFG on at step 1 · psnr {f.psnr[1]:.3g}",
                             "cutoff=1 · NFE 6 · CFG on at step 1 · psnr ∞ (identical)"] or shares
    assert c.captions(2)[1] == f"cutoff=0.5 · NFE 5 · CFG off at step 3 · psnr {f.psnr[1]:.3g}"
    assert "seed 0" in c.title and "'a red circle'" in c.title
    for j, r in enumerate(f.itertuples()):
        assert r.config in c.captions_w[j].value and "NFE" in c.captions_w[j].value
        c.slider.value = 1
        want = kept.previews(r.row_id)[1]  # uint8 (128, 128, 3) kept by the sweep for step 1
        assert np.array_equal(_png(c.images_w[j].value), np.asarray(to_pil(want, 192)))


def test_compare_a_sweep_shows_final_images_without_previews(sweeps):
    _, final = sweeps
    c = widgets.compare(final, metric="psnr")
    assert c.n_steps == 1 and "final images" in c.label()
    r = final.frame.iloc[2]
    with Image.open(r.image) as im:
        want = np.asarray(im.convert("RGB"))
    assert np.array_equal(_png(c.images_w[2].value), np.asarray(to_pil(torch.from_numpy(want.copy()), 192)))
    with pytest.raises(DlxError, match="metric"):
        widgets.compare(final, metric="fid")
    with pytest.raises(DlxError, match="prompt"):
        widgets.compare(final, prompt="a blue square")


# --- labels: one config format, shown the same in compare and the report ----------------------------

CONTROLS = [  # (control with non-default arguments, the label compare and the report must show)
    (lambda: dlx.CFGCutoff(ratio=0.2), "CFGCutoff(ratio=0.2)"),
    (lambda: dlx.CFGCutoff(step=3), "CFGCutoff(step=3)"),
    (lambda: dlx.CFGCutoff(sigma=2.5), "CFGCutoff(sigma=2.5)"),
    (lambda: dlx.CFGCutoff(ratio=0.25, compat="diffusers"), "CFGCutoff(ratio=0.25, compat='diffusers')"),
    (lambda: dlx.CFGCutoff(ratio=[0.2, 0.6]), "CFGCutoff(ratio=[0.2, 0.6])"),
    (lambda: dlx.GuidanceInterval(0.25, 0.75), "GuidanceInterval(start=0.25, stop=0.75)"),
    (lambda: dlx.GuidanceInterval(stop=0.5), "GuidanceInterval(stop=0.5)"),
    (lambda: dlx.GuidanceSchedule("cosine", low=2.0, high=6.0), "GuidanceSchedule(schedule='cosine', low=2, high=6)"),
    (lambda: dlx.AdaptiveCutoff(0.95), "AdaptiveCutoff(threshold=0.95)"),
]


@pytest.mark.parametrize("make,want", CONTROLS, ids=[w for _, w in CONTROLS])
def test_every_control_is_labelled_with_its_arguments(pipe, make, want):
    from dlx import labels, report

    with dlx.record(pipe, make()) as t:
        pipe(**example_inputs("sd", steps=4, batch=2))
    assert labels.config_label(t) == want
    c = widgets.compare([t], sample=1)
    assert c.captions(0)[0].startswith(want + " · NFE ")
    doc = report.report([t])  # the report of a list of traces labels each by its controls
    import html
    import re

    cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", doc)]
    assert want in cells  # the configs table
    (g,) = [json.loads(m.replace("<\\/", "</")) for m in re.findall(r"class='dlx-data'>(.*?)</script>", doc, re.S)]
    assert g["captions"][0][0].startswith(want + " · NFE ")  # the gallery's caption, as compare shows it


def test_ip_adapter_cutoff_and_an_unknown_part_are_labelled():
    from dlx import labels

    assert labels.part_label(dlx.IPAdapterCutoff(step=2).config()) == "IPAdapterCutoff(step=2)"
    assert labels.part_label(dlx.IPAdapterCutoff(ratio=0.4).config()) == "IPAdapterCutoff(ratio=0.4)"
    # a user's own control: every argument shown (dlx does not know its defaults)
    assert labels.part_label({"type": "MyGuidance", "args": {"k": 3, "mode": "soft"}}) == "MyGuidance(k=3, mode='soft')"
    # the flat form a sweep spec stores
    assert labels.part_label({"type": "CFGCutoff", "ratio": 0.4}) == "CFGCutoff(ratio=0.4)"


# --- views that survive a saved notebook, and respond ---------------------------------------------


def test_a_displayed_view_leaves_its_widget_and_a_static_png(trace, monkeypatch):
    """In a kernel: the widget, then a PNG output (what a saved notebook, nbconvert or GitHub shows)."""
    import IPython.display

    from dlx import _notebook

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, **kw: shown.append((obj, kw)))
    monkeypatch.setattr(widgets, "in_kernel", lambda: True)
    g = widgets.gallery(trace)
    g._ipython_display_()
    (w, _), (static, kw) = shown
    assert w is g.widget and kw["raw"] is True
    strip = Image.open(io.BytesIO(static["image/png"]))
    assert strip.width >= 4 * 96  # 2 tiles: the strip over the 4 steps
    assert "display:none" in _notebook.STATIC_HIDER and ".dlx-view" in _notebook.STATIC_HIDER
    assert "dlx-view" in g.widget._dom_classes


def test_toggle_before_the_background_render_shows_a_busy_state(trace, monkeypatch):
    g = widgets.gallery(trace)
    g.tiles._threads[("latent", g.size)].join(60)
    g.tiles._png.pop(("latent", g.size), None)  # as if the background render had not finished
    gate = threading.Event()
    real = g.tiles.png

    def slow(kind, size):
        if kind == "latent":
            gate.wait(30)
        return real(kind, size)

    monkeypatch.setattr(g.tiles, "png", slow)
    monkeypatch.setattr(widgets, "in_kernel", lambda: True)
    before = _png(g.images_w[0].value)
    g.toggle.value = "latent"  # returns at once: the kernel is not blocked
    assert g.busy and g.toggle.disabled and "rendering x_t" in g.header.value
    assert np.array_equal(_png(g.images_w[0].value), before)
    gate.set()
    for _ in range(600):
        if not g.busy:
            break
        threading.Event().wait(0.05)
    assert not g.busy and not g.toggle.disabled and "rendering" not in g.header.value
    assert np.array_equal(_png(g.images_w[0].value), np.asarray(to_pil(render_steps(trace, "latent")[3, 0], 192)))


def test_the_other_kind_renders_in_the_background(trace):
    g = widgets.gallery(trace)
    t = g.tiles._threads.get(("latent", g.size))
    assert t is not None and t.name == "dlx-render-latent"
    t.join(60)
    assert g.tiles.ready("latent", g.size)
