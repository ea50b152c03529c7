"""What goes wrong around a sweep is seen, named and recoverable (issue 23): a failing metric warns
and is recomputed from the stored images once fixed; a lost image is recomputed on rerun; failed
rows fail the command line; damaged, empty, read-only and full stores give one-line errors; outputs
follow the umask; YAML types are checked; the progress bar moves during a batch; and each row's
reproducibility is what ``dlx.sweeps.store.REPRODUCIBILITY`` says, no more."""

from __future__ import annotations

import errno
import io
import os
import sqlite3
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dlx
from dlx import DlxError
from dlx.__main__ import main
from dlx.sweeps import SweepResult, SweepWarning, engine
from dlx.sweeps.store import REPRODUCIBILITY, Store

from .helpers import pipe_for

CALL = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32)


def _sweep(out, **kw):
    args = dict(prompts=["a red circle", "a blue square"], seeds=[0], cutoffs=[0.0, 1.0], out=out, timing=(),
                progress=False, max_batch=1, **CALL)
    args.update(kw)
    return dlx.sweep(args.pop("pipe", pipe_for("sd")), **args)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


@pytest.fixture
def calls(monkeypatch):
    """Rows each pipeline call of the sweep ran (a list of row-id lists)."""
    seen = []
    real = engine.run_batch

    def counting(pipe, spec, rows, **k):
        seen.append([r["row_id"] for r in rows])
        return real(pipe, spec, rows, **k)

    monkeypatch.setattr(engine, "run_batch", counting)
    return seen


# -- 1. a failing metric is reported, counted, and recomputed without images once fixed -------------------

def _raises(images, prompts, reference_images):
    raise RuntimeError("no GPU for the judge")


def _pairs(images, prompts, reference_images):
    return torch.zeros(len(images), 2)


def _scalar(images, prompts, reference_images):
    return torch.tensor(0.5)


def _short(images, prompts, reference_images):
    return [0.5] * (len(images) - 1)


@pytest.mark.parametrize("bad, says", [(_raises, "RuntimeError: no GPU for the judge"),
                                       (_pairs, r"returned shape \(1, 2\) for 1 images"),
                                       (_scalar, r"returned one value \(a 0-d Tensor\) for 1 images"),
                                       (_short, "returned 0 values for 1 images")])
def test_a_failing_metric_warns_with_its_first_error_and_is_stored_per_row(bad, says, tmp_path):
    def judge(images, prompts, reference_images):
        return bad(images, prompts, reference_images)

    with pytest.warns(SweepWarning, match=rf"metric 'judge' failed on 4 of 4 rows \(NaN there\); first error: .*{says}"):
        res = _sweep(tmp_path, metrics=["psnr", judge])
    f = res.frame
    assert (f.status == "ok").all() and f.judge.isna().all() and f.psnr.notna().all()
    rows = Store(tmp_path, readonly=True).rows()
    assert all(list(r["metric_errors"]) == ["judge"] for r in rows)


def test_a_fixed_metric_is_recomputed_from_the_stored_images_without_the_model(tmp_path, calls):
    def judge(images, prompts, reference_images):
        raise RuntimeError("broken")

    with pytest.warns(SweepWarning, match="metric 'judge' failed"):
        _sweep(tmp_path, metrics=["psnr", judge])
    images_before = {p.name: p.read_bytes() for p in (tmp_path / "images").iterdir()}
    calls.clear()

    def judge(images, prompts, reference_images):  # noqa: F811 - the fixed code, same name
        return (images - reference_images).abs().mean(dim=(1, 2, 3))

    with warnings.catch_warnings():
        warnings.simplefilter("error", SweepWarning)  # nothing left incomplete: no warning
        res = _sweep(tmp_path, metrics=["psnr", judge])
    assert calls == []  # no pipeline call: only the metric ran, on the stored PNGs
    assert {p.name: p.read_bytes() for p in (tmp_path / "images").iterdir()} == images_before
    assert not any(r["metric_errors"] for r in Store(tmp_path, readonly=True).rows())
    # the values equal those a fresh sweep computes on the images it has in memory (the PNGs hold
    # exactly the uint8 pixels the metric judges)
    fresh = _sweep(tmp_path / "fresh", metrics=["psnr", judge]).frame
    assert res.frame.judge.tolist() == fresh.judge.tolist()
    assert res.frame.judge.notna().all() and (res.frame.judge > 0).any()


def test_a_metric_failing_on_some_rows_is_counted_and_only_those_are_retried(tmp_path, calls):
    def judge(images, prompts, reference_images):
        if "square" in prompts[0]:
            raise ValueError("squares are not judged")
        return [1.0] * len(images)

    with pytest.warns(SweepWarning, match=r"metric 'judge' failed on 2 of 4 rows .*ValueError: squares"):
        res = _sweep(tmp_path, metrics=[judge])
    f = res.frame
    assert f[f.prompt == "a red circle"].judge.tolist() == [1.0, 1.0]
    assert f[f.prompt == "a blue square"].judge.isna().all()
    calls.clear()
    with pytest.warns(SweepWarning, match="failed on 2 of 4"):  # the same code: retried, still failing, said again
        _sweep(tmp_path, metrics=[judge])
    assert calls == []
    ev = [e for e in SweepResult(tmp_path).events if e["kind"] == "metrics_recomputed"]
    assert ev[-1]["rows"] == 2


def test_a_changed_metric_with_real_values_is_still_refused(tmp_path):
    def judge(images, prompts, reference_images):
        return [1.0] * len(images)

    _sweep(tmp_path, metrics=[judge])

    def judge(images, prompts, reference_images):  # noqa: F811
        return [2.0] * len(images)

    with pytest.raises(DlxError, match="metric 'judge' is not the one that made the values"):
        _sweep(tmp_path, metrics=[judge])


# -- 2. a lost image is recomputed on rerun, or named --------------------------------------------------

def test_a_deleted_or_truncated_image_is_recomputed_on_rerun(tmp_path, calls):
    res = _sweep(tmp_path)
    f = res.frame
    lost = f[f.config == "cutoff=0"].iloc[0]  # not a reference
    cut = f[f.config == "cutoff=0"].iloc[1]
    before = {r.row_id: Path(r.image).read_bytes() for r in f.itertuples()}
    Path(lost.image).unlink()
    Path(cut.image).write_bytes(before[cut.row_id][:40])  # cut short, as a failed copy leaves it
    calls.clear()
    res = _sweep(tmp_path)
    assert sorted(r for c in calls for r in c) == sorted([lost.row_id, cut.row_id])
    after = {r.row_id: Path(r.image).read_bytes() for r in res.frame.itertuples()}
    assert after == before  # max_batch=1 both times: the same batch composition, bitwise the same
    assert any(e["kind"] == "rows_recomputed" and e["count"] == 2 for e in res.events)


def test_a_lost_reference_image_recomputes_its_whole_prompt_and_seed(tmp_path, calls):
    res = _sweep(tmp_path)
    f = res.frame
    ref = f[(f.config == "cutoff=1") & (f.prompt == "a red circle")].iloc[0]
    Path(ref.image).unlink()
    psnr_before = f.psnr.tolist()
    calls.clear()
    res = _sweep(tmp_path)
    unit = set(f[f.prompt == "a red circle"].row_id)
    assert {r for c in calls for r in c} == unit
    assert res.frame.psnr.tolist() == psnr_before and res.frame.psnr.notna().all()


def test_a_missing_image_without_a_rerun_is_named(tmp_path):
    from dlx import report

    f = _sweep(tmp_path).frame
    gone = f.image.iloc[0]
    Path(gone).unlink()
    with pytest.warns(UserWarning, match="missing or damaged"):
        res = SweepResult(tmp_path)
    with pytest.raises(DlxError, match=rf"image '{gone}' of this sweep is missing or damaged.*rerun the sweep"):
        res.images()
    assert len(res.images(prompt="a blue square")) == 2  # the rows whose images are there
    assert res.frame.image.isna().sum() == 1
    assert report.report(res, tmp_path / "report.html").is_file()  # the report shows the rest
    dlx.widgets.compare(res)  # and so does the comparison view


# -- 3. failed rows fail the command line ----------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_pipe(tmp_path_factory):
    from dlx.testing import tiny_pipeline

    p = tmp_path_factory.mktemp("pipe") / "pipe"
    tiny_pipeline("sd").save_pretrained(p)
    return p


def _spec(tmp_path, saved_pipe, extra: str = "", call="{num_inference_steps: 2, guidance_scale: 5.0, height: 32, width: 32}"):
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""
        model: {saved_pipe}
        out: out
        prompts: ["a red circle"]
        seeds: 1
        cutoffs: [0, 1.0]
        timing: []
        call: {call}
    """) + extra)
    return spec


def test_a_sweep_whose_rows_all_fail_exits_non_zero_with_the_first_error(tmp_path, saved_pipe, capsys):
    spec = _spec(tmp_path, saved_pipe, call="{num_inference_steps: 2, guidance_scale: 5.0, height: 20, width: 20}")
    assert main(["sweep", str(spec), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "error: 2 of 2 rows failed; first error: ValueError: `height` and `width` have to be divisible by 8" in err
    assert "warning: 2 of 2 rows failed" in err and "Traceback" not in err
    with pytest.raises(DlxError, match="no finished row to plot.*ValueError"):
        SweepResult(tmp_path / "out").plot()


def test_a_failing_metric_is_a_line_on_stderr_and_a_non_zero_exit(tmp_path, saved_pipe, capsys, monkeypatch):
    import dlx.metrics

    def broken(images, prompts, reference_images):
        raise RuntimeError("judge is down")

    monkeypatch.setattr(dlx.metrics, "ssim", broken)  # resolve() reads the built-in by its module name
    assert main(["sweep", str(_spec(tmp_path, saved_pipe, "metrics: [psnr, ssim]\n")), "--quiet"]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(lines) == 1 and "metric 'ssim' failed on 2 of 2 rows" in lines[0] and "judge is down" in lines[0]


# -- 4. damaged, empty and read-only stores --------------------------------------------------------------

def test_a_zero_byte_store_is_named_with_what_to_do(tmp_path, capsys):
    _sweep(tmp_path)
    db = tmp_path / "sweep.sqlite"
    db.write_bytes(b"")
    with pytest.raises(DlxError, match=rf"'{db}' is empty \(0 bytes\).*rerun the sweep"):
        SweepResult(tmp_path)
    with pytest.raises(DlxError, match=rf"'{db}' is empty \(0 bytes\) but .*images.* holds images.*restore it"):
        _sweep(tmp_path)


def test_an_empty_store_without_images_is_a_new_sweep(tmp_path):
    (tmp_path / "sweep.sqlite").write_bytes(b"")  # SQLite makes a new database as such a file
    assert len(_sweep(tmp_path).frame) == 4


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_store_is_named_with_what_to_do(damage, tmp_path, saved_pipe, capsys):
    spec = _spec(tmp_path, saved_pipe)
    assert main(["sweep", str(spec), "--quiet"]) == 0
    capsys.readouterr()
    db = tmp_path / "out" / "sweep.sqlite"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"x" * len(data))
    with pytest.raises(DlxError, match=rf"the sweep database '{db}' is damaged \(.*\); restore it from a copy, "
                                       r"or move it away and rerun"):
        SweepResult(tmp_path / "out").frame
    assert main(["sweep", str(spec), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is damaged" in err and str(db) in err and "Traceback" not in err


def _as_nobody(fn):
    """Run ``fn()`` where the sweep folder cannot be written: as root (which writes anywhere) in
    a forked child that dropped to the unprivileged user; returns what it returned or raised."""
    import pickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                out = ("ok", fn())
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                out = ("error", f"{type(e).__name__}: {e}")
            os.write(w, pickle.dumps(out))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


@pytest.mark.parametrize("copied", [False, True])
def test_a_finished_sweep_on_a_read_only_location_opens(copied, tmp_path):
    import shutil
    import tempfile

    import pandas  # noqa: F401 - imported before the child drops its rights
    import dlx.sweeps.cost  # noqa: F401

    warm = tmp_path / "warm"
    _sweep(warm)
    SweepResult(warm).frame  # every module the read needs is imported now
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="dlx-ro-"))
    try:
        os.chmod(base, 0o755)
        out = base / "archive"
        _sweep(out)
        if copied:  # a copy of the closed database alone, as an archive holds it
            for ext in ("-wal", "-shm"):
                Path(str(out / "sweep.sqlite") + ext).unlink(missing_ok=True)
        for p in [out, *out.rglob("*")]:
            os.chmod(p, 0o555 if p.is_dir() else 0o444)
        before = (out / "sweep.sqlite").read_bytes()
        expect = SweepResult(warm).frame[["row_id", "status", "psnr"]].to_dict("list")
        got = _as_nobody(lambda: SweepResult(out).frame[["row_id", "status", "psnr"]].to_dict("list"))
        assert got == ("ok", expect), got
        assert (out / "sweep.sqlite").read_bytes() == before
        # the same sweep again there: finished, so its results come back as they are, read-only
        again = _as_nobody(lambda: _sweep(out).frame[["row_id", "status", "psnr"]].to_dict("list"))
        assert again == ("ok", expect), again
        assert (out / "sweep.sqlite").read_bytes() == before
        # another sweep there is refused before any model work, saying why
        tried = _as_nobody(lambda: _sweep(out, seeds=[0, 1, 2]))
        assert tried[0] == "error" and "cannot be written and holds another sweep" in tried[1], tried
    finally:
        for p in [base, *base.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        shutil.rmtree(base)


# -- 5. a full disk is one line, and a resume after it completes ------------------------------------------

def test_a_full_disk_writing_an_image_is_one_line_and_resumes(tmp_path, monkeypatch):
    import dlx.sweeps.store as store_mod

    real = store_mod.write_bytes
    n = {"images": 0}

    def filling(path, data, **k):
        n["images"] += 1
        if n["images"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, **k)

    monkeypatch.setattr(store_mod, "write_bytes", filling)
    with pytest.raises(DlxError) as e:
        _sweep(tmp_path)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("no space left on the device writing") and "rerun the same sweep" in str(e.value)
    assert len(Store(tmp_path, readonly=True).rows()) == 2  # what was written is kept
    monkeypatch.setattr(store_mod, "write_bytes", real)  # space freed
    res = _sweep(tmp_path)
    assert len(res.frame) == 4 and (res.frame.status == "ok").all()


def test_a_full_database_is_one_line_and_resumes(tmp_path, monkeypatch):
    real_add = Store.add_row
    n = {"rows": 0}

    class Full:
        """The connection as SQLite answers on a full disk: "database or disk is full" on writes."""

        def __init__(self, con):
            self._con = con

        def execute(self, sql, *a):
            if sql.startswith("INSERT"):
                raise sqlite3.OperationalError("database or disk is full")
            return self._con.execute(sql, *a)

        def __getattr__(self, name):
            return getattr(self._con, name)

    def filling(self, row):
        n["rows"] += 1
        if n["rows"] == 3:
            self.con = Full(self.con)
        return real_add(self, row)

    args = dict(prompts=["a red circle", "a green star", "a blue square", "a yellow heart"], cutoffs=[0.0, 0.5, 1.0])
    monkeypatch.setattr(Store, "add_row", filling)
    with pytest.raises(DlxError) as e:
        _sweep(tmp_path, **args)
    assert "\n" not in str(e.value) and str(e.value).startswith("no space left on the device writing")
    assert str(tmp_path / "sweep.sqlite") in str(e.value)
    assert 2 <= len(Store(tmp_path, readonly=True).rows()) < 12  # the rows stored before are kept
    monkeypatch.setattr(Store, "add_row", real_add)  # space freed
    res = _sweep(tmp_path, **args)
    assert len(res.frame) == 12 and (res.frame.status == "ok").all()


def test_the_cli_says_a_full_disk_in_one_line(tmp_path, saved_pipe, capsys, monkeypatch):
    import dlx.sweeps.store as store_mod

    def full(path, data, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(store_mod, "write_bytes", full)
    assert main(["sweep", str(_spec(tmp_path, saved_pipe)), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left on the device" in err


def test_the_record_demo_says_a_full_disk_in_one_line(tmp_path, capsys, monkeypatch):
    import dlx.trace

    def full(self, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(dlx.trace.Trace, "save", full)
    assert main(["demo", "--record", "--model", "tiny", "--steps", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left on the device" in err


# -- 6. files others can read --------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_follow_the_umask(umask, mode, tmp_path):
    from dlx import report

    old = os.umask(umask)
    try:
        res = _sweep(tmp_path, keep_previews=True)
        files = [Path(p) for p in res.frame.image]
        files += list((tmp_path / "previews").iterdir())
        files.append(report.report(res, tmp_path / "report.html"))
        files.append(report.save_gif(tmp_path / "steps.gif", [[torch.zeros(8, 8, 3, dtype=torch.uint8)]] * 2))
        files.append(tmp_path / "sweep.sqlite")
    finally:
        os.umask(old)
    assert len(files) >= 4 + 4 + 3
    for p in files:
        assert (p.stat().st_mode & 0o777) == mode, (p, oct(p.stat().st_mode & 0o777))


# -- 7. YAML values of the wrong type -------------------------------------------------------------------

@pytest.mark.parametrize("line, key, shown", [
    ("seeds: true", "seeds", "True"), ("seeds: 2.5", "seeds", "2.5"), ("seeds: -3", "seeds", "-3"),
    ("seeds: 0", "seeds", "0"), ("prompts: 5", "prompts", "5"), ("prompts: {a: 1}", "prompts", "{'a': 1}"),
    ("metrics: 5", "metrics", "5"), ('out: ""', "out", "''"), ('share: "no"', "share", "'no'"),
    ('pad: "false"', "pad", "'false'"), ('keep_previews: "yes"', "keep_previews", "'yes'"),
    ("retry_failed: 1", "retry_failed", "1"), ("max_batch: 0", "max_batch", "0"),
    ("timing: 5", "timing", "5"), ("cutoffs: [0, yes]", "cutoffs", "[0, True]"),
    ("pairs: [[a red circle]]", "pairs", "[['a red circle']]"), ("steps: [2.5]", "steps", "[2.5]"),
])
def test_yaml_values_of_the_wrong_type_name_the_key_and_the_value(line, key, shown, tmp_path):
    from dlx.sweeps.yaml_spec import read_yaml

    lines = {"model": "model: shapes", "out": "out: o", "prompts": 'prompts: ["a red circle"]', "cutoffs": "cutoffs: [0, 1]"}
    lines[line.split(":")[0]] = line
    (tmp_path / "s.yaml").write_text("\n".join(lines.values()) + "\n")
    with pytest.raises(DlxError) as e:
        read_yaml(tmp_path / "s.yaml")
    assert f"`{key}` must be" in str(e.value) and f"got {shown}" in str(e.value), str(e.value)


def test_yaml_takes_one_string_as_a_list_of_one(tmp_path):
    from dlx.sweeps.yaml_spec import read_yaml

    (tmp_path / "s.yaml").write_text("model: shapes\nout: o\nprompts: a red circle\nmetrics: psnr\nseeds: 2\n")
    kw = read_yaml(tmp_path / "s.yaml")
    assert kw["prompts"] == ["a red circle"] and kw["metrics"] == ["psnr"] and kw["seeds"] == [0, 1]


# -- 8. smaller ones ------------------------------------------------------------------------------------

def test_a_refused_spec_shows_the_config_that_was_added(tmp_path):
    cutoffs = [round(0.05 * i, 2) for i in range(12)]  # long enough that a 160-character cut hides the end
    _sweep(tmp_path, prompts=["a red circle"], cutoffs=cutoffs, num_inference_steps=1)
    with pytest.raises(DlxError, match=r"configs\['cutoff=0\.9'\]: stored \"\(absent\)\", given .*\"ratio\": 0\.9"):
        _sweep(tmp_path, prompts=["a red circle"], cutoffs=cutoffs + [0.9], num_inference_steps=1)


def test_a_config_name_with_broken_mathtext_plots_and_reports(tmp_path):
    from dlx import report

    res = _sweep(tmp_path, cutoffs=None, configs={r"$\frac{1}{$": dlx.CFGCutoff(ratio=0.0), "full": None})
    fig, _ = res.plot()
    fig.savefig(io.BytesIO(), format="png")  # drawing is where mathtext is parsed
    assert report.report(res, tmp_path / "r.html").is_file()


def test_validators_for_other_entry_points():
    from dlx import _args

    with pytest.raises(DlxError, match=r"`size` must be a positive int up to 8192 .*got 1000000"):
        _args.image_size("size", 10 ** 6)
    with pytest.raises(DlxError, match=r"`num_inference_steps` must be at least 1; got 0"):
        _args.steps("num_inference_steps", 0)
    with pytest.raises(DlxError, match=r"`seed` must be below 2\*\*63"):
        _args.seed("seed", 2 ** 64)
    with pytest.raises(DlxError, match=r"`share` must be true or false; got 'no'"):
        _args.boolean("share", "no")


# -- 9. progress that is true ---------------------------------------------------------------------------

def test_the_progress_bar_moves_with_the_denoising_steps(tmp_path, monkeypatch):
    import re
    import time

    import tqdm.auto
    import tqdm.std

    seen, bars = [], []

    class Bar(tqdm.std.tqdm):
        def __init__(self, *a, **k):
            self.buf = io.StringIO()
            super().__init__(*a, file=self.buf, mininterval=0, **k)
            bars.append(self)

        def update(self, n=1):
            super().update(n)
            seen.append(self.n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    t0 = time.perf_counter()
    _sweep(tmp_path, max_batch=2, progress=True, num_inference_steps=4)
    elapsed = time.perf_counter() - t0
    assert seen == sorted(seen) and seen[-1] == 4  # 4 rows, in 2 calls of 2
    assert seen[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # 2 rows x (step + 1) / 4, during the first call
    assert bars[0].smoothing == 0
    shown = bars[0].buf.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "4.0/4 rows" in shown, shown
    m = re.search(r"([\d.]+)(s/row|row/s)", shown)
    per_row = float(m.group(1)) if m.group(2) == "s/row" else 1 / float(m.group(1))
    assert 0.2 * elapsed / 4 <= per_row <= elapsed / 4 * 1.05, (shown, elapsed)  # not a burst's rate


# -- 10. reproducibility: what the store states, tested as stated --------------------------------------

def _flat(text: str) -> str:
    return " ".join(text.split())


def test_each_row_records_what_it_was_computed_with_and_the_guarantee_is_stated(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _sweep(tmp_path, max_batch=4)
    finally:
        torch.set_num_threads(threads)
    store = Store(tmp_path, readonly=True)
    rows = store.rows()
    assert store.meta("reproducibility") == REPRODUCIBILITY
    # one statement, word for word, in the store, the docstring and the README
    assert _flat(REPRODUCIBILITY) in _flat(dlx.sweeps.sweep.__doc__)
    assert _flat(REPRODUCIBILITY) in _flat(dlx.sweeps.__doc__)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert _flat(REPRODUCIBILITY) in _flat(readme.replace("`", ""))
    assert len(rows) == 4 and len({r["batch_key"] for r in rows}) == 1  # one call of all 4 rows
    for r in rows:
        assert r["threads"] == 1 and r["device"] == "cpu" and r["dtype"] == "torch.float32" and r["batch"] == 4
        assert set(r["versions"]) >= {"torch", "diffusers", "dlx"} and len(r["batch_key"]) == 16


def _images(out) -> dict:
    return {r.row_id: _pixels(r.image) for r in SweepResult(out).frame.itertuples()}


def _keys(out) -> dict:
    return {r["row_id"]: (r["batch_key"], r["threads"]) for r in Store(out, readonly=True).rows()}


SHAPES = dict(prompts=["a red circle on the left and a blue square on the right",
                       "a green star on the top and a yellow heart on the bottom"],
              seeds=[0], cutoffs=[0.0, 0.4, 1.0], metrics=["psnr"], num_inference_steps=6, guidance_scale=6.0)


@pytest.fixture(scope="module")
def shapes_runs(tmp_path_factory):
    """The embedded model's rows computed at several batch compositions and thread counts."""
    base = tmp_path_factory.mktemp("repro")
    runs = {}
    threads = torch.get_num_threads()
    pipe = dlx.zoo.load("shapes")  # loaded once: the sweep by name would load it per run
    try:
        for name, nthreads, mb in (("t1_b6", 1, 6), ("t1_b6_again", 1, 6), ("t1_b1", 1, 1), ("t2_b6", 2, 6)):
            torch.set_num_threads(nthreads)
            dlx.sweep(pipe, out=base / name, max_batch=mb, timing=(), progress=False, **SHAPES)
            runs[name] = base / name
    finally:
        torch.set_num_threads(threads)
    return runs


def test_equal_batch_composition_and_threads_reproduce_rows_bitwise(shapes_runs):
    a, b = shapes_runs["t1_b6"], shapes_runs["t1_b6_again"]
    assert _keys(a) == _keys(b)
    for rid, px in _images(a).items():
        assert np.array_equal(px, _images(b)[rid])
    for p in (a / "images").iterdir():
        assert p.read_bytes() == (b / "images" / p.name).read_bytes()


@pytest.mark.parametrize("other", ["t1_b1", "t2_b6"])
def test_other_batch_compositions_or_threads_stay_within_one_level(other, shapes_runs):
    a, b = _images(shapes_runs["t1_b6"]), _images(shapes_runs[other])
    ka, kb = _keys(shapes_runs["t1_b6"]), _keys(shapes_runs[other])
    diffs = {rid: np.abs(a[rid] - b[rid]).max() for rid in a}
    assert max(diffs.values()) <= 1  # the stated bound
    for rid, d in diffs.items():
        if ka[rid] == kb[rid]:
            assert d == 0  # the same recorded batch and threads: bitwise
    assert any(ka[rid] != kb[rid] for rid in a)  # the records tell the runs apart


def test_a_row_at_max_batch_one_is_the_config_run_alone_bitwise_and_any_batch_within_one_level(shapes_runs):
    pipe = dlx.zoo.load("shapes")
    res = SweepResult(shapes_runs["t1_b1"])
    many = _images(shapes_runs["t1_b6"])
    cfgs = {c.name: c for c in res.spec.configs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r in res.frame.itertuples():
            with dlx.attach(pipe, *cfgs[r.config].parts()):
                im = pipe(r.prompt, generator=torch.Generator().manual_seed(r.seed), num_inference_steps=6,
                          guidance_scale=6.0, output_type="np").images[0]
            alone = (im * 255).round().clip(0, 255).astype(int)
            assert np.array_equal(_pixels(r.image), alone), r.config
            assert np.abs(many[r.row_id] - alone).max() <= 1
    finally:
        torch.set_num_threads(threads)
