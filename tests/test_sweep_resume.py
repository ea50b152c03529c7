"""A sweep killed with SIGKILL mid-way resumes: nothing lost, nothing duplicated, nothing recomputed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import torch
from PIL import Image

import dlx

from .helpers import pipe_for

CALL = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32)
ARGS = dict(prompts=["a red circle", "a blue square"], seeds=[0, 1, 2], cutoffs=[0, 0.5, 1.0], max_batch=1,
            timing=(), progress=False, **CALL)

CHILD = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    import dlx
    from dlx.sweeps import engine
    from dlx.testing import tiny_pipeline
    real = engine.run_batch
    def slow(*a, **k):  # slow rows, so the parent can kill the sweep mid-way
        time.sleep(0.4)
        return real(*a, **k)
    engine.run_batch = slow
    dlx.sweep(tiny_pipeline("sd", seed=0), out=sys.argv[1], **{args})
""")


def _rows(db):
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def _finished(db) -> dict:
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT row_id, finished_at FROM rows"))
    finally:
        con.close()


def test_sigkill_mid_sweep_then_resume(tmp_path):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(args=repr(ARGS)), str(out)],
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE)
    db = out / "sweep.sqlite"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None and (not db.exists() or _rows(db) < 4):
        time.sleep(0.05)
    assert child.poll() is None, child.stderr.read().decode()[-2000:]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done_before = _rows(db)
    total = len(ARGS["prompts"]) * len(ARGS["seeds"]) * len(ARGS["cutoffs"])
    assert 4 <= done_before < total
    before = _finished(db)

    pipe = pipe_for("sd")
    res = dlx.sweep(pipe, out=out, **ARGS)
    f = res.frame
    assert len(f) == total and f.row_id.is_unique and (f.status == "ok").all()
    # only the missing rows ran: one batch (of one row) per row, plus at most the row in flight at the kill
    batches = [e for e in res.events if e["kind"] == "batch"]
    assert total <= len(batches) <= total + 1
    # rows stored before the kill were kept as they were; every row equals its standalone run bitwise
    after = _finished(db)
    assert {k: after[k] for k in before} == before
    cfgs = {c.name: c for c in res.spec.configs}
    for r in f.itertuples():
        with dlx.attach(pipe, *cfgs[r.config].parts()):
            ref = pipe(r.prompt, generator=torch.Generator().manual_seed(r.seed), output_type="np", **CALL).images[0]
        with Image.open(r.image) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), (ref * 255).round().astype("uint8")), r.config


def test_a_store_written_in_the_older_flat_config_format_still_resumes(tmp_path, monkeypatch):
    # Issue 21 item 3: stores written before the one config format (controls as flat
    # {"type": "CFGCutoff", "ratio": 0.5, "compat": ...}) open and resume, nothing recomputed.
    import json

    from dlx.sweeps import engine

    pipe = pipe_for("sd")
    configs = {"cut": dlx.CFGCutoff(0.5), "win": dlx.GuidanceInterval(0.25, 0.75), "full": None}
    kw = dict(prompts=["a red circle"], seeds=[0], configs=configs, out=tmp_path, timing=(), progress=False,
              metrics=["psnr"], **CALL)
    first = dlx.sweep(pipe, **kw).frame
    con = sqlite3.connect(tmp_path / "sweep.sqlite")
    spec = json.loads(con.execute("SELECT value FROM meta WHERE key='spec'").fetchone()[0])
    for c in spec["configs"]:  # back to the flat form dlx wrote before
        c["controls"] = [{"type": x["type"], **x["args"], **({"compat": "dlx"} if x["type"] == "CFGCutoff" else {})}
                         for x in c["controls"]]
    assert spec["configs"][0]["controls"] == [{"type": "CFGCutoff", "ratio": 0.5, "compat": "dlx"}]
    con.execute("UPDATE meta SET value=? WHERE key='spec'", (json.dumps(spec),))
    con.commit()
    con.close()
    monkeypatch.setattr(engine, "run_batch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a row ran")))
    again = dlx.sweep(pipe, **kw)
    assert again.frame[["row_id", "nfe", "psnr"]].equals(first[["row_id", "nfe", "psnr"]])
    assert again.spec.configs[0].controls == [{"type": "CFGCutoff", "args": {"ratio": 0.5}}]
