"""Where a sweep's results live: ``out/sweep.sqlite`` (WAL) and one PNG per row in ``out/images``.

One transaction per finished row, written after the row's PNG is in place (written to a temporary
file and renamed), so a sweep stopped at any instant (Ctrl-C, a crash, ``kill -9``) holds only
whole rows and resumes by computing the missing ones. The spec is stored once; a different spec on
the same folder is refused with what differs. Only JSON and PNG are read back: nothing is
unpickled.

(Over 400 lines: one idea, the results database; most of it is the error handling a store needs
when it is damaged, read-only or full.)
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import sqlite3
import time
import tempfile
from pathlib import Path

from .._io import write_bytes
from ..errors import DlxError
from .spec import SweepSpec

__all__ = ["Store", "check_out", "image_ok", "REPRODUCIBILITY"]

DB = "sweep.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    row_id TEXT PRIMARY KEY, config TEXT NOT NULL, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL, error TEXT, nfe REAL, evaluations REAL, guided_steps REAL,
    metrics TEXT NOT NULL, image TEXT, batch INTEGER, call_ms REAL, device TEXT,
    versions TEXT, shard INTEGER, finished_at TEXT NOT NULL,
    threads INTEGER, batch_key TEXT, dtype TEXT, metric_errors TEXT);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL,
    kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS costs (mode TEXT, steps INTEGER, scale REAL, batch INTEGER, value TEXT NOT NULL,
    PRIMARY KEY (mode, steps, scale, batch));
CREATE TABLE IF NOT EXISTS cost_pairs (id INTEGER PRIMARY KEY AUTOINCREMENT, mode TEXT, steps INTEGER, scale REAL,
    batch INTEGER, at TEXT NOT NULL, value TEXT NOT NULL);
"""
ROW_COLUMNS = ("row_id", "config", "prompt", "seed", "status", "error", "nfe", "evaluations", "guided_steps",
               "metrics", "image", "batch", "call_ms", "device", "versions", "shard", "finished_at",
               # what the row was computed with (REPRODUCIBILITY) and which metrics failed on it
               "threads", "batch_key", "dtype", "metric_errors")
#: columns added after the first stores were written (added to an older store when it is opened
#: for writing; read as None from an older store opened read-only)
_ADDED = {"threads": "INTEGER", "batch_key": "TEXT", "dtype": "TEXT", "metric_errors": "TEXT"}

#: what a sweep's rows are guaranteed to reproduce; stored in every store's meta
#: (``reproducibility``), stated in the README and ``dlx.sweep``'s docstring, and asserted by
#: tests/test_sweep_failures.py and tests/test_cli.py (the sharded case)
REPRODUCIBILITY = (
    "Each row's image is within one level (1/255 per channel) of the same config run alone (one pipeline call "
    "for its prompt and seed) on the CPU in float32, and bitwise equal to it at max_batch=1 with the same thread count; bitwise "
    "between runs only at equal batch composition (the row's batch_key: the rows of its call, prefix sharing and "
    "padding), torch thread count, device, dtype and library versions, which each row records (threads, "
    "batch, batch_key, device, dtype, versions). Batched and multi-threaded reductions round differently, so a "
    "resume or a sharded run that computes a row in another batch or with other threads may move pixels by "
    "one level, and the metrics computed from them a little. Tested on the embedded model and the tiny test pipeline; "
    "on GPUs and in half precision no bound is tested.")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def check_out(out, images: bool = True) -> Path:
    """The output folder, created and checked writable before any model work."""
    if out is None or (isinstance(out, str) and not out.strip()):
        raise DlxError(f"argument `out` must be a folder path; got {out!r}")
    try:
        p = Path(out).expanduser()
    except TypeError:
        raise DlxError(f"argument `out` must be a folder path; got {out!r}") from None
    if p.exists() and not p.is_dir():
        raise DlxError(f"argument `out` must be a folder; {str(p)!r} is a file")
    try:
        (p / "images" if images else p).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno in _FULL_ERRNOS:
            raise disk_full(p, e) from None
        raise DlxError(f"argument `out`: cannot write to {str(p)!r} ({e.strerror or e})") from None
    return p


_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def disk_full(where, e=None) -> DlxError:
    """The one-line error of a full disk (or quota) while writing ``where``."""
    why = f" ({e.strerror})" if isinstance(e, OSError) and e.strerror else ""
    return DlxError(f"no space left on the device writing {str(where)!r}{why}: free some space and rerun the "
                    f"same sweep to resume (every row stored so far is kept)")


def is_disk_full(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno in _FULL_ERRNOS) or (
        isinstance(e, sqlite3.OperationalError) and "disk is full" in str(e))


def image_ok(path) -> bool:
    """Whether a stored PNG is there and whole: PNG signature first, IEND chunk last (a file cut
    short or emptied by a failed copy is recomputed on rerun, not read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, os.SEEK_END)
            if f.tell() < 20:
                return False
            f.seek(-12, os.SEEK_END)
            tail = f.read(12)
    except OSError:
        return False
    return head == b"\x89PNG\r\n\x1a\n" and tail[4:8] == b"IEND"


def _damaged(path: Path, why: str) -> DlxError:
    return DlxError(f"the sweep database {str(path)!r} is damaged ({why}); restore it from a copy, or move it "
                    f"away and rerun the sweep with the same `out` to compute its rows again")


class Store:
    """One SQLite database (WAL) plus the images folder. ``path`` may be a shard's database.

    ``readonly=True`` reads a finished sweep where nothing may be written (an archive, a
    read-only share): the database is opened with SQLite's ``mode=ro`` (``immutable=1`` where
    even that cannot open it: no -shm file can be made there), with no WAL switch and no schema
    change. Errors of the database itself become one-line ``DlxError``s naming the file: a
    damaged or empty file (what to do), a full disk, a location that cannot be written.
    """

    def __init__(self, out: Path, db: str = DB, *, readonly: bool = False):
        self.out = Path(out)
        self.path = self.out / db
        self.readonly = readonly
        self.con = None
        if readonly:
            self._open_readonly()
            return
        self._check_not_lost()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.con = sqlite3.connect(self.path, timeout=60, isolation_level=None)  # explicit transactions
            # Several ranks open the same new database at once: switching it to WAL (and creating the
            # schema) can answer "database is locked" at once, without SQLite's busy wait, so retry.
            for attempt in range(200):
                try:
                    self.con.execute("PRAGMA journal_mode=WAL")
                    self.con.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a process kill
                    self.con.executescript(_SCHEMA)
                    self._add_columns()
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) and "busy" not in str(e) or attempt == 199:
                        raise
                    time.sleep(0.05 + 0.01 * attempt)
        except (sqlite3.DatabaseError, OSError) as e:
            if self.con is not None:
                self.con.close()
            raise self._translate(e) from None

    def _check_not_lost(self) -> None:
        """A database of zero bytes beside stored images lost its rows (truncated, or copied
        while incomplete); starting afresh would hide that. (SQLite itself makes a new database
        as a zero-byte file, so an empty one with no images is simply new.)"""
        try:
            wal = Path(str(self.path) + "-wal")
            empty = (self.path.is_file() and self.path.stat().st_size == 0
                     and (not wal.is_file() or wal.stat().st_size == 0))  # a WAL with frames still holds rows
        except OSError:
            return
        if empty and any((self.out / "images").glob("*.png")):
            raise DlxError(f"the sweep database {str(self.path)!r} is empty (0 bytes) but {str(self.out / 'images')!r} "
                           f"holds images: it was truncated or copied incompletely; restore it from a copy, or "
                           f"delete it and rerun the sweep to compute every row again")

    def _open_readonly(self) -> None:
        from urllib.parse import quote

        if not self.path.is_file():
            raise DlxError(f"argument `out`: no sweep database in {str(self.out)!r}")
        if self.path.stat().st_size == 0:
            raise DlxError(f"the sweep database {str(self.path)!r} is empty (0 bytes): no sweep was stored in it "
                           f"(or it was truncated); rerun the sweep with this `out` to compute it, or restore the "
                           f"file from a copy")
        uri = "file:" + quote(str(self.path.resolve()))
        last = None
        for mode in ("?mode=ro", "?immutable=1"):
            try:
                self.con = sqlite3.connect(uri + mode, uri=True, timeout=60, isolation_level=None)
                self.con.execute("SELECT COUNT(*) FROM meta").fetchone()
                self._columns = self._row_columns()
                return
            except sqlite3.OperationalError as e:
                last = e
                if self.con is not None:
                    self.con.close()
                    self.con = None
                if "no such table" in str(e):
                    raise DlxError(f"{str(self.path)!r} is an SQLite database but not a sweep's (no `meta` table)") from None
                if "unable to open" not in str(e) and "readonly" not in str(e):
                    raise self._translate(e) from None
            except sqlite3.DatabaseError as e:
                if self.con is not None:
                    self.con.close()
                    self.con = None
                raise self._translate(e) from None
        raise DlxError(f"cannot open the sweep database {str(self.path)!r} for reading ({last})")

    def _translate(self, e: BaseException) -> BaseException:
        """A database or file-system error as the one-line DlxError that says what to do."""
        msg = str(e)
        if is_disk_full(e):
            return disk_full(self.path, e if isinstance(e, OSError) else None)
        if isinstance(e, sqlite3.OperationalError) and ("readonly" in msg or "unable to open" in msg):
            return DlxError(f"cannot write the sweep database {str(self.path)!r} ({msg}): the folder or file is "
                            f"read-only; read a finished sweep with dlx.sweeps.SweepResult(out), or give a "
                            f"writable `out`")
        if isinstance(e, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg):
            return e
        if isinstance(e, sqlite3.DatabaseError):  # malformed, not a database, ...
            return _damaged(self.path, msg)
        if isinstance(e, OSError):
            return DlxError(f"cannot write in {str(self.out)!r} ({e.strerror or e})")
        return e

    def _row_columns(self) -> tuple:
        have = {r[1] for r in self.con.execute("PRAGMA table_info(rows)")}
        return tuple(c for c in ROW_COLUMNS if c in have)

    def _add_columns(self) -> None:
        have = {r[1] for r in self.con.execute("PRAGMA table_info(rows)")}
        for name, kind in _ADDED.items():
            if name not in have:
                try:
                    self.con.execute(f"ALTER TABLE rows ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as e:  # another rank added it first
                    if "duplicate column" not in str(e):
                        raise
        self._columns = ROW_COLUMNS

    def close(self):
        if self.con is not None:
            self.con.close()

    def _q(self, sql: str, args=()):
        """A read, its rows fetched; errors of the database translated."""
        try:
            return self.con.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise self._translate(e) from None

    # -- spec -------------------------------------------------------------------------------------
    def meta(self, key: str, default=None):
        r = self._q("SELECT value FROM meta WHERE key=?", (key,))
        return json.loads(r[0][0]) if r else default

    def set_meta(self, key: str, value) -> None:
        with self._tx():
            self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    def bind(self, spec: SweepSpec) -> None:
        """Store ``spec``, or check it equals the stored one (refusing with what differs)."""
        stored = self.meta("spec")
        if stored is None:
            self.set_meta("spec", spec.to_json())
            self.set_meta("created_at", now())
            self.set_meta("reproducibility", REPRODUCIBILITY)
            return
        old = SweepSpec.from_json(stored)
        diff = spec.diff(old)
        if diff:
            raise DlxError(f"argument `out`: {str(self.out)!r} holds a different sweep; use another folder or "
                           f"the same spec. Differs: " + "; ".join(diff))
        if self.meta("reproducibility") != REPRODUCIBILITY:
            self.set_meta("reproducibility", REPRODUCIBILITY)

    def forget_if_empty(self) -> bool:
        """Unbind the folder from its spec when it holds no row and no cost yet (a sweep that
        failed before computing anything, e.g. a model that would not load, leaves the folder
        free for the corrected call); True if it did."""
        if self._q("SELECT COUNT(*) FROM rows")[0][0] or self._q("SELECT COUNT(*) FROM costs")[0][0]:
            return False
        with self._tx():
            self.con.execute("DELETE FROM meta")
        return True

    def spec(self) -> SweepSpec | None:
        d = self.meta("spec")
        return SweepSpec.from_json(d) if d is not None else None

    # -- rows -------------------------------------------------------------------------------------
    def _tx(self):
        store = self

        class _T:
            def __enter__(self_):
                if store.readonly:
                    raise DlxError(f"the sweep database {str(store.path)!r} was opened read-only")
                try:
                    store.con.execute("BEGIN IMMEDIATE")
                except sqlite3.DatabaseError as e:
                    raise store._translate(e) from None

            def __exit__(self_, et, ev, tb):
                try:
                    store.con.execute("COMMIT" if et is None else "ROLLBACK")
                except sqlite3.DatabaseError as e:
                    if et is None:
                        try:
                            store.con.execute("ROLLBACK")
                        except sqlite3.DatabaseError:
                            pass
                        raise store._translate(e) from None
                if isinstance(ev, sqlite3.DatabaseError):
                    raise store._translate(ev) from None
                return False

        return _T()

    def done_ids(self, include_failed: bool = True) -> set[str]:
        q = "SELECT row_id FROM rows" + ("" if include_failed else " WHERE status='ok'")
        return {r[0] for r in self._q(q)}

    def status_of(self, row_id: str) -> str | None:
        r = self._q("SELECT status FROM rows WHERE row_id=?", (row_id,))
        return r[0][0] if r else None

    def write_image(self, row_id: str, png: bytes) -> str:
        """Atomically write a row's PNG; returns its path relative to ``out``."""
        rel = f"images/{row_id}.png"
        try:
            write_bytes(self.out / rel, png, fsync=False)
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                raise disk_full(self.out / rel, e) from None
            raise
        return rel

    def add_row(self, row: dict) -> None:
        """One finished row, in its own transaction (replacing a failed attempt of the same row)."""
        vals = dict(row)
        vals["metrics"] = json.dumps(vals.get("metrics") or {}, sort_keys=True, allow_nan=True)
        vals["versions"] = json.dumps(vals.get("versions") or {}, sort_keys=True)
        vals["metric_errors"] = json.dumps(vals.get("metric_errors") or {}, sort_keys=True)
        vals.setdefault("finished_at", now())
        cols = self._columns
        with self._tx():
            self.con.execute(f"INSERT OR REPLACE INTO rows ({', '.join(cols)}) VALUES "
                             f"({', '.join('?' for _ in cols)})", [vals.get(k) for k in cols])

    def set_metrics(self, updates: list[tuple[str, dict, dict]]) -> None:
        """Replace rows' metric values and failures: ``(row_id, metrics, metric_errors)`` each,
        in one transaction (a metric recomputed from the stored images)."""
        with self._tx():
            for row_id, metrics, errors in updates:
                self.con.execute("UPDATE rows SET metrics=?, metric_errors=? WHERE row_id=?",
                                 (json.dumps(metrics, sort_keys=True, allow_nan=True),
                                  json.dumps(errors, sort_keys=True), row_id))

    def rows(self) -> list[dict]:
        cols = self._columns
        out = []
        for r in self._q(f"SELECT {', '.join(cols)} FROM rows"):
            d = dict.fromkeys(ROW_COLUMNS)
            d.update(zip(cols, r))
            d["metrics"] = json.loads(d["metrics"])
            d["versions"] = json.loads(d["versions"] or "{}")
            d["metric_errors"] = json.loads(d["metric_errors"] or "{}")
            out.append(d)
        return out

    def event(self, kind: str, **detail) -> None:
        with self._tx():
            self.con.execute("INSERT INTO events (at, kind, detail) VALUES (?, ?, ?)",
                             (now(), kind, json.dumps(detail, sort_keys=True, default=str)))

    def events(self) -> list[dict]:
        return [{"at": a, "kind": k, **json.loads(d)} for a, k, d in
                self._q("SELECT at, kind, detail FROM events ORDER BY id")]

    # -- costs ------------------------------------------------------------------------------------
    def set_cost(self, mode: str, steps: int, scale: float, batch: int, value: dict) -> None:
        with self._tx():
            self.con.execute("INSERT OR REPLACE INTO costs VALUES (?, ?, ?, ?, ?)",
                             (mode, steps, scale, batch, json.dumps(value, sort_keys=True)))

    def costs(self) -> list[dict]:
        return [{"mode": m, "steps": n, "scale": s, "batch": b, **json.loads(v)} for m, n, s, b, v in
                self._q("SELECT mode, steps, scale, batch, value FROM costs")]

    def add_cost_pair(self, mode: str, steps: int, scale: float, batch: int, pair: dict) -> None:
        """One more (guided, unguided) pair of timed calls, taken between batches
        (``cost.Interleaved``), for the cost model of (mode, steps, scale, batch)."""
        with self._tx():
            self.con.execute("INSERT INTO cost_pairs (mode, steps, scale, batch, at, value) VALUES (?, ?, ?, ?, ?, ?)",
                             (mode, steps, scale, batch, now(), json.dumps(pair, sort_keys=True)))

    def cost_pairs(self) -> list[dict]:
        """The pairs taken between batches, in the order taken: mode, steps, scale, batch, at and
        the pair (``{"guided": [call ms, loop ms], "unguided": [...]}``)."""
        return [{"mode": m, "steps": n, "scale": s, "batch": b, "at": at, **json.loads(v)} for m, n, s, b, at, v in
                self.con.execute("SELECT mode, steps, scale, batch, at, value FROM cost_pairs ORDER BY id")]

    # -- merging shards -----------------------------------------------------------------------------
    def merge_from(self, other: Path) -> int:
        """Copy rows, events and costs of another store's database (a shard); returns rows added
        or replaced. A shard's rows replace the stored ones of the same id: a shard computes only
        rows that were missing, failed (``retry_failed``) or lost their image, so its are newer."""
        con = self.con
        try:
            con.execute("ATTACH DATABASE ? AS shard", (str(other),))
        except sqlite3.DatabaseError as e:
            raise self._translate(e) from None
        try:
            have = {r[1] for r in con.execute("PRAGMA shard.table_info(rows)")}
            cols = ", ".join(c for c in self._columns if c in have)
            with self._tx():
                n = con.execute("SELECT COUNT(*) FROM shard.rows").fetchone()[0]
                con.execute(f"INSERT OR REPLACE INTO rows ({cols}) SELECT {cols} FROM shard.rows")
                con.execute("INSERT INTO events (at, kind, detail) SELECT at, kind, detail FROM shard.events")
                con.execute("INSERT OR IGNORE INTO costs SELECT * FROM shard.costs")
                if con.execute("SELECT 1 FROM shard.sqlite_master WHERE name='cost_pairs'").fetchone():
                    con.execute("INSERT INTO cost_pairs (mode, steps, scale, batch, at, value) "
                                "SELECT mode, steps, scale, batch, at, value FROM shard.cost_pairs")
        except sqlite3.DatabaseError as e:
            raise _damaged(other, str(e)) if not is_disk_full(e) else disk_full(self.path) from None
        finally:
            con.execute("DETACH DATABASE shard")
        return n
