"""Where users see it: a gallery and a live run in JupyterLab and in Jupyter Notebook 7, and the HTML
report, in headless Chromium.

Each front end's own server (``jupyter lab``, ``jupyter notebook``) starts on a free local port with
a token, and the same checks run in both: the gallery's image renders, dragging its slider changes
the image shown, Stop ends a ``live`` run early and says why, and galleries of 1, 4 and 16 samples
lay their tiles out legibly (caption above, shown at the size rendered, a sensible grid). One
Chromium serves every test. Playwright's Python API drives Debian's ``chromium``
(``executable_path``: Playwright's own browser download is not used). Screenshots go to
``test-artifacts/browser/`` (gitignored). The tests skip, saying why, only where no browser can be
found or installed (``apt-get install -y chromium`` is tried when running as root).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# front end -> (module that `python -m` starts, its minimum version, the notebook's URL, its own options)
FRONT_ENDS = {
    "jupyterlab": ("jupyterlab", "4", "/lab/tree/{nb}",
                   ["--LabApp.news_url=", "--LabServerApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]),
    "notebook7": ("notebook", "7", "/notebooks/{nb}", []),
}


def _find_browser() -> str | None:
    for name in BROWSERS:
        p = shutil.which(name)
        if p:
            return p
    return None


@pytest.fixture(scope="session")
def browser_path():
    path = _find_browser()
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        # what .ci/run does first; tried here too so a plain `pytest` on a fresh root box works
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            subprocess.run(["apt-get", "install", "-y", "chromium"], env=env, capture_output=True, timeout=300)
            if _find_browser() is None:
                subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300)
                subprocess.run(["apt-get", "install", "-y", "chromium"], env=env, capture_output=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            pass
        path = _find_browser()
    if path is None:
        pytest.skip("no Chromium: none of chromium/chromium-browser/google-chrome on PATH, and "
                    "`apt-get install -y chromium` was not possible here (needs root and apt)")
    return path


@pytest.fixture(scope="session")
def browser(browser_path):
    """One headless Chromium for every test of this file (starting one costs seconds)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]' installs it)")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()
    finally:
        pw.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_NOTEBOOK = [
    # 0: a recorded run and its gallery
    """import time, torch, dlx
from IPython.display import display
from dlx import widgets
from dlx.testing import example_inputs, tiny_pipeline
torch.set_num_threads(1)
pipe = tiny_pipeline("sd")
with dlx.record(pipe) as trace:
    pipe(**example_inputs("sd", steps=6))
g = widgets.gallery(trace)
g""",
    # 1: a live run slowed down so that Stop lands mid-run
    """def slow(p, step, t, kw):
    time.sleep(0.4)
    return kw
run = widgets.live(pipe, kind="latent", size=128, callback_on_step_end=slow, **example_inputs("sd", steps=60))
run""",
    # 2: what the kernel holds once Stop was pressed
    """t = run.wait(60)
print(f"kernel: {len(t.steps)} steps recorded; stop_reason={t.stop_reason!r}")""",
    # 3: the embedded model's previews, legible tiles for 1, 4 and 16 samples
    """from dlx import zoo
shapes = zoo.load("shapes")
with dlx.record(shapes) as t16:
    shapes("a red circle on the left and a blue star on the right", num_images_per_prompt=16,
           num_inference_steps=6, guidance_scale=6.0, generator=torch.Generator().manual_seed(0), output_type="latent")
for n in (1, 4, 16):
    display(widgets.gallery(t16, samples=range(n)))""",
]


def _write_notebook(path: Path):
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": src, "outputs": [], "execution_count": None}
                    for src in _NOTEBOOK],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


@pytest.fixture(params=list(FRONT_ENDS))
def jupyter(request, tmp_path):
    """A front end's own server (``python -m jupyterlab`` or ``python -m notebook``) on a free port with
    a token, the notebook written and its kernel started; yields (name, notebook URL, sessions API URL)."""
    name = request.param
    module, minversion, url, options = FRONT_ENDS[name]
    pytest.importorskip(module, minversion=minversion,
                        reason=f"{module}>={minversion} is not installed (pip install -e '.[test]' installs it)")
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"), JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"))
    _write_notebook(tmp_path / "gallery.ipynb")
    # no "get Jupyter news?" toast over the page (both front ends read these user settings)
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    log = open(tmp_path / "jupyter.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--ServerApp.open_browser=False",
         "--allow-root", *options],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"{module} did not start: {(tmp_path / 'jupyter.log').read_text()[-2000:]}")
            time.sleep(0.3)
        # start the notebook's kernel first, so the page opens attached to it (no kernel dialog)
        req = urllib.request.Request(
            f"{base}/api/sessions?token={token}", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"path": "gallery.ipynb", "name": "gallery.ipynb", "type": "notebook",
                             "kernel": {"name": "python3"}}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 201, r.status
        yield name, f"{base}{url.format(nb='gallery.ipynb')}?token={token}", f"{base}/api/sessions?token={token}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _shot(page_or_locator, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    kw = {"full_page": True} if hasattr(page_or_locator, "goto") else {}
    page_or_locator.screenshot(path=str(ARTIFACTS / name), **kw)


def _src(img):
    return img.evaluate("e => e.src")


def _loaded(page, img, timeout=30_000):
    img.wait_for(state="visible", timeout=timeout)
    page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=img.element_handle(), timeout=timeout)


def _wait_attached(sessions_url, timeout=90):
    """Until the page holds a websocket to the notebook's kernel and the kernel is idle: before that,
    a front end shown as "Idle" may still have no kernel, and Shift+Enter opens a kernel dialog."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(sessions_url, timeout=10) as r:
            kernels = [s["kernel"] for s in json.load(r) if s.get("path") == "gallery.ipynb"]
        if kernels and all(k.get("connections", 0) > 0 and k.get("execution_state") == "idle" for k in kernels):
            return
        assert time.monotonic() < deadline, f"the page did not attach to the kernel: {kernels}"
        time.sleep(0.3)


def _run_cell(page, k):
    """Click into cell ``k``'s editor and run it (Shift+Enter), as a user does; returns the cell."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(k)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    return cell


# Where each tile's image and caption sit, read from the page (CSS pixels; the page's scale is 1).
_TILES_JS = """g => [...g.querySelectorAll('img')].map(i => {
  const r = i.getBoundingClientRect(), c = i.parentElement.querySelector('.widget-html');
  const cr = c.getBoundingClientRect(), cc = c.firstElementChild || c;
  return {x: r.left, y: r.top, w: r.width, h: r.height, nw: i.naturalWidth, nh: i.naturalHeight,
          cx: cr.left, cy: cr.top, cw: cr.width, ch: cr.height, text: c.innerText,
          clipped: cc.scrollWidth > cc.clientWidth + 1 || c.scrollWidth > c.clientWidth + 1
                   || c.scrollHeight > c.clientHeight + 1,
          parts: [...c.querySelectorAll('span')].map(
            s => s.getBoundingClientRect().height / parseFloat(getComputedStyle(s).lineHeight))};
})"""


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] - 0.5 and b[0] < a[0] + a[2] - 0.5 and a[1] < b[1] + b[3] - 0.5 and b[1] < a[1] + a[3] - 0.5


def _check_tiles(gallery, n: int, area_right: float):
    """n tiles, each shown at exactly the size it was rendered (no browser rescaling, so no blur),
    captioned above and unclipped, no caption over any image, in ``columns(n)`` columns, all inside
    the output area."""
    from dlx.widgets import columns, tile_size

    tiles = gallery.evaluate(_TILES_JS)
    assert len(tiles) == n
    size = tile_size(n)
    imgs = [(t["x"], t["y"], t["w"], t["h"]) for t in tiles]
    for j, t in enumerate(tiles):
        assert (t["w"], t["h"]) == (size, size) and (t["nw"], t["nh"]) == (size, size), t
        assert t["text"].startswith(f"sample {j} · scale 6 · CFG"), t
        # wrapped, if at all, between " · " parts: each part ("scale 6") keeps to one line
        assert len(t["parts"]) == 3 and all(lines < 1.5 for lines in t["parts"]), t
        assert t["cy"] + t["ch"] <= t["y"] + 0.5 and t["cy"] >= t["y"] - 60, t  # right above its image
        assert not t["clipped"], t
        assert not any(_overlap((t["cx"], t["cy"], t["cw"], t["ch"]), im) for im in imgs), t
        assert t["x"] + t["w"] <= area_right + 0.5, (t, area_right)
    assert len({round(t["x"]) for t in tiles}) == columns(n)
    assert len({round(t["y"]) for t in tiles}) == -(-n // columns(n))


def test_gallery_and_live_run_in_jupyter(browser, jupyter):
    """JupyterLab and Notebook 7 alike: the gallery renders and follows its slider, Stop ends a live
    run early and says why, and tiles for 1, 4 and 16 samples are legible."""
    fe, url, sessions_url = jupyter
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(60_000)
    try:
        page.goto(url)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
        _wait_attached(sessions_url)
        # a front end that asks for a kernel anyway: keep the one it offers (the notebook's python3)
        page.add_locator_handler(page.locator(".jp-Dialog").filter(has_text="Select Kernel"),
                                 lambda d: d.get_by_role("button", name="Select", exact=True).click())
        # -- the gallery -------------------------------------------------------------------------
        gal = _run_cell(page, 0).locator(".dlx-gallery")
        gal.wait_for(timeout=90_000)
        img = gal.locator("img").first
        _loaded(page, img)
        label = gal.locator(".widget-html").first
        assert "step 6/6" in label.inner_text()
        _shot(page, f"{fe}-1-gallery.png")
        before = _src(img)
        handle = gal.locator(".noUi-handle, .ui-slider-handle").first
        box = handle.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] - 400, box["y"] + box["height"] / 2, steps=8)  # drag to the start
        page.mouse.up()
        page.wait_for_function("([e, s]) => e.src !== s", arg=[img.element_handle(), before], timeout=30_000)
        _loaded(page, img)
        page.wait_for_function("e => e.innerText.includes('step 1/6')", arg=label.element_handle())
        _shot(page, f"{fe}-2-gallery-dragged.png")
        # -- a live run, stopped -----------------------------------------------------------------
        page.keyboard.press("Escape")
        lv = _run_cell(page, 1).locator(".dlx-live")
        lv.wait_for(timeout=90_000)
        about, status = lv.locator(".widget-html").nth(0), lv.locator(".widget-html").nth(1)
        assert "seed" in about.inner_text() and "scale" in about.inner_text()
        page.wait_for_function("e => /step [3-9]\\//.test(e.innerText)", arg=status.element_handle(),
                               timeout=60_000)
        _loaded(page, lv.locator("img"))
        lv.get_by_role("button", name="Stop").click()
        page.wait_for_function("e => e.innerText.includes('Stopped by')", arg=status.element_handle(),
                               timeout=60_000)
        text = status.inner_text()
        m = re.fullmatch(r"Stopped by the Stop button after step (\d+) of 60\.", text.strip())
        assert m, text
        assert 3 <= int(m[1]) < 60, text
        assert lv.get_by_role("button", name="Stop").is_disabled()
        _shot(page, f"{fe}-3-live-stopped.png")
        # the kernel agrees: the trace ends where the widget said, for the reason it showed
        out = _run_cell(page, 2).locator(".jp-OutputArea-output")
        out.wait_for(timeout=60_000)
        assert (f"kernel: {m[1]} steps recorded; stop_reason='stop requested (event set) after step "
                f"{int(m[1]) - 1}'" in out.inner_text()), out.inner_text()  # the trace counts steps from 0
        # -- tiles for 1, 4 and 16 samples of the embedded model ---------------------------------
        cell = _run_cell(page, 3)
        gals = cell.locator(".dlx-gallery")
        gals.nth(2).wait_for(timeout=120_000)
        area = cell.locator(".jp-OutputArea").bounding_box()
        for k, n in enumerate((1, 4, 16)):
            g = gals.nth(k)
            g.scroll_into_view_if_needed()
            for i in range(n):
                _loaded(page, g.locator("img").nth(i))
            _shot(g, f"{fe}-4-tiles-{n}.png")
            _check_tiles(g, n, area["x"] + area["width"])
    except Exception:
        _shot(page, f"{fe}-failure.png")  # what the page showed when it failed
        raise
    finally:
        page.close()


def test_report_slider_works_without_kernel_or_network(browser, tmp_path):
    from dlx import report
    from dlx.testing import example_inputs, tiny_pipeline
    import dlx

    pipe = tiny_pipeline("sd")
    with dlx.record(pipe) as trace:
        pipe(**example_inputs("sd", steps=5, batch=4))
    report_path = report.report(trace, tmp_path / "report.html")
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(60_000)
    try:
        page.route("http*://**", lambda route: route.abort())  # no network
        page.goto(report_path.as_uri())
        g = page.locator(".dlx-gal").first
        tile = g.locator("img.dlx-img").first
        _loaded(page, tile)
        assert g.locator("img.dlx-img").count() == 4
        first = _src(tile)
        assert "step 5/5" in g.locator(".dlx-label").inner_text()
        g.locator("input.dlx-step").fill("0")
        page.wait_for_function("([e, s]) => e.src !== s", arg=[tile.element_handle(), first])
        assert "step 1/5" in g.locator(".dlx-label").inner_text()
        g.locator("select.dlx-kind").select_option("latent")
        assert _src(tile) != first
        assert page.evaluate("[...document.images].every(i => i.src.startsWith('data:'))")
        _shot(page, "report.png")
    except Exception:
        _shot(page, "report-failure.png")
        raise
    finally:
        page.close()


def _sweep_report(tmp_path):
    import dlx
    from dlx import report
    from dlx.testing import tiny_pipeline

    res = dlx.sweep(tiny_pipeline("sd"), prompts=["a red circle", "a blue square"], seeds=[0, 1], cutoffs=[0, 0.5, 1.0],
                    timing=(), progress=False, out=tmp_path / "s", keep_previews=True, num_inference_steps=4,
                    height=32, width=32)
    return report.report(res, tmp_path / "report.html")


def test_sweep_report_answers_on_the_first_screen_and_its_sliders_work(browser, tmp_path):
    """At 1000 px: the recommendation and the speed-quality plot on the first screen, the key table
    without sideways scrolling; every prompt-seed group's slider changes its images."""
    path = _sweep_report(tmp_path)
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.set_default_timeout(60_000)
    try:
        page.route("http*://**", lambda route: route.abort())  # no network
        page.goto(path.as_uri())
        answer = page.locator(".answer").first
        plot = page.locator("img.plot").first
        _loaded(page, plot)
        for el in (answer, plot):
            box = el.bounding_box()
            assert box["y"] >= 0 and box["y"] + min(box["height"], 120) <= 800, box  # on the first screen
        assert page.evaluate("document.documentElement.scrollWidth") <= 1000  # no sideways scrolling
        key = page.locator("table.dlx").first
        assert key.bounding_box()["x"] + key.bounding_box()["width"] <= 1000
        _shot(page, "sweep-report-1000.png")
        gals = page.locator(".dlx-gal")
        assert gals.count() == 4
        g = gals.first
        tile = g.locator("img.dlx-img").first
        _loaded(page, tile)
        first, cap = _src(tile), g.locator("figcaption").first.inner_text()
        assert "step 4/4" in g.locator(".dlx-label").inner_text()
        g.locator("input.dlx-step").fill("0")
        page.wait_for_function("([e, s]) => e.src !== s", arg=[tile.element_handle(), first])
        assert "step 1/4" in g.locator(".dlx-label").inner_text()
        assert g.locator("figcaption").first.inner_text() != cap or "CFG off" in cap
        assert page.evaluate("[...document.images].every(i => i.src.startsWith('data:'))")
    except Exception:
        _shot(page, "sweep-report-failure.png")
        raise
    finally:
        page.close()


def test_notebook_04_saved_and_reopened_shows_images(browser, tmp_path):
    """Notebook 04 executed, saved and converted to HTML (as nbviewer and GitHub show a saved
    notebook, with no kernel and no widget state): every view's picture is there."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    path = ROOT / "notebooks" / "04_galleries.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, tmp_path / "04.ipynb")
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(tmp_path / "04.ipynb", as_version=4))
    (tmp_path / "04.html").write_text(body)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        page.route("http*://**", lambda route: route.abort())
        page.goto((tmp_path / "04.html").as_uri())
        for code in ("widgets.gallery(trace)", "widgets.compare(cuts)", "widgets.live("):
            cell = page.locator(".jp-CodeCell").filter(has_text=code).first
            img = cell.locator(".jp-OutputArea img").first
            img.scroll_into_view_if_needed()
            _loaded(page, img)
            assert img.bounding_box()["width"] > 100, code
        _shot(page, "notebook-04-saved.png")
    except Exception:
        _shot(page, "notebook-04-saved-failure.png")
        raise
    finally:
        page.close()
