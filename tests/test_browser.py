"""Where users see it: a gallery and a live run in JupyterLab, and the HTML report, in headless Chromium.

JupyterLab starts on a free local port with a token; Playwright's Python API drives Debian's
``chromium`` (``executable_path``: Playwright's own browser download is not used). Screenshots go
to ``test-artifacts/browser/`` (gitignored). The test skips, saying why, only where no browser can
be found or installed (``apt-get install -y chromium`` is tried when running as root).
"""

from __future__ import annotations

import json
import os
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
def playwright_api():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]' installs it)")
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_NOTEBOOK = [
    # 0: a recorded run and its gallery
    """import time, torch, dlx
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
]


def _write_notebook(path: Path):
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": src, "outputs": [], "execution_count": None}
                    for src in _NOTEBOOK],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


@pytest.fixture
def jupyterlab(tmp_path):
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (pip install -e '.[test]' installs it)")
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"))
    _write_notebook(tmp_path / "gallery.ipynb")
    log = open(tmp_path / "jupyter.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--ServerApp.open_browser=False", "--allow-root",
         "--LabApp.news_url=", "--LabServerApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
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
                pytest.fail(f"JupyterLab did not start: {(tmp_path / 'jupyter.log').read_text()[-2000:]}")
            time.sleep(0.3)
        # start the notebook's kernel first, so the page opens attached to it (no kernel dialog)
        req = urllib.request.Request(
            f"{base}/api/sessions?token={token}", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"path": "gallery.ipynb", "name": "gallery.ipynb", "type": "notebook",
                             "kernel": {"name": "python3"}}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 201, r.status
        yield base, token, tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _shot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def _src(img):
    return img.evaluate("e => e.src")


def _loaded(page, img, timeout=30_000):
    img.wait_for(state="visible", timeout=timeout)
    page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=img.element_handle(), timeout=timeout)


def test_gallery_live_and_report_in_chromium(browser_path, playwright_api, jupyterlab):
    base, token, root = jupyterlab
    from dlx import report
    from dlx.testing import example_inputs, tiny_pipeline
    import dlx

    pipe = tiny_pipeline("sd")
    with dlx.record(pipe) as trace:
        pipe(**example_inputs("sd", steps=5, batch=4))
    report_path = report.report(trace, root / "report.html")

    with playwright_api() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(60_000)
            # -- the gallery in JupyterLab ---------------------------------------------------
            page.goto(f"{base}/lab/tree/gallery.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            page.wait_for_selector("#jp-main-statusbar :text('Idle')", timeout=90_000)
            select = page.get_by_role("button", name="Select", exact=True)
            if select.count():  # a JupyterLab that asks anyway
                select.click()
            page.locator(".jp-Cell").first.click()
            page.keyboard.press("Shift+Enter")  # run the gallery cell
            gal = page.locator(".dlx-gallery")
            gal.wait_for(timeout=90_000)
            img = gal.locator("img").first
            _loaded(page, img)
            label = gal.locator(".widget-html").first
            assert "step 6/6" in label.inner_text()
            _shot(page, "1-gallery.png")
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
            _shot(page, "2-gallery-dragged.png")
            # -- a live run, stopped ---------------------------------------------------------
            page.keyboard.press("Escape")
            page.locator(".jp-Cell").nth(1).click()
            page.keyboard.press("Shift+Enter")
            lv = page.locator(".dlx-live")
            lv.wait_for(timeout=90_000)
            status = lv.locator(".widget-html")
            page.wait_for_function("e => /step [3-9]\\//.test(e.innerText)", arg=status.element_handle(),
                                   timeout=60_000)
            _loaded(page, lv.locator("img"))
            lv.get_by_role("button", name="Stop").click()
            page.wait_for_function("e => e.innerText.includes('stopped early')", arg=status.element_handle(),
                                   timeout=60_000)
            text = status.inner_text()
            n = int(text.split("after ")[-1].split(" preview")[0])
            assert 3 <= n < 60, text
            _shot(page, "3-live-stopped.png")
            # -- the HTML report, no kernel and no network -----------------------------------
            page.route("http*://**", lambda route: route.abort())  # no network from here on
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
            _shot(page, "4-report.png")
        except Exception:
            _shot(page, "failure.png")  # what the page showed when it failed
            raise
        finally:
            browser.close()
