"""Where a sweep's results live: ``out/sweep.sqlite`` (WAL) and one PNG per row in ``out/images``.

One transaction per finished row, written after the row's PNG is in place (written to a temporary
file and renamed), so a sweep stopped at any instant (Ctrl-C, a crash, ``kill -9``) holds only
whole rows and resumes by computing the missing ones. The spec is stored once; a different spec on
the same folder is refused with what differs. Only JSON and PNG are read back: nothing is
unpickled.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
import time
import tempfile
from pathlib import Path

from .._io import write_bytes
from ..errors import DlxError
from .spec import SweepSpec

__all__ = ["Store", "check_out"]

DB = "sweep.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    row_id TEXT PRIMARY KEY, config TEXT NOT NULL, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL, error TEXT, nfe REAL, evaluations REAL, guided_steps REAL,
    metrics TEXT NOT NULL, image TEXT, batch INTEGER, call_ms REAL, device TEXT,
    versions TEXT, shard INTEGER, finished_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL,
    kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS costs (mode TEXT, steps INTEGER, scale REAL, batch INTEGER, value TEXT NOT NULL,
    PRIMARY KEY (mode, steps, scale, batch));
CREATE TABLE IF NOT EXISTS cost_pairs (id INTEGER PRIMARY KEY AUTOINCREMENT, mode TEXT, steps INTEGER, scale REAL,
    batch INTEGER, at TEXT NOT NULL, value TEXT NOT NULL);
"""
ROW_COLUMNS = ("row_id", "config", "prompt", "seed", "status", "error", "nfe", "evaluations", "guided_steps",
               "metrics", "image", "batch", "call_ms", "device", "versions", "shard", "finished_at")


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
        raise DlxError(f"argument `out`: cannot write to {str(p)!r} ({e.strerror or e})") from None
    return p


class Store:
    """One SQLite database (WAL) plus the images folder. ``path`` may be a shard's database."""

    def __init__(self, out: Path, db: str = DB):
        self.out = Path(out)
        self.path = self.out / db
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = sqlite3.connect(self.path, timeout=60, isolation_level=None)  # explicit transactions
        # Several ranks open the same new database at once: switching it to WAL (and creating the
        # schema) can answer "database is locked" at once, without SQLite's busy wait, so retry.
        for attempt in range(200):
            try:
                self.con.execute("PRAGMA journal_mode=WAL")
                self.con.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a process kill
                self.con.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or attempt == 199:
                    raise
                time.sleep(0.05 + 0.01 * attempt)

    def close(self):
        self.con.close()

    # -- spec -------------------------------------------------------------------------------------
    def meta(self, key: str, default=None):
        r = self.con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(r[0]) if r else default

    def set_meta(self, key: str, value) -> None:
        with self._tx():
            self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    def bind(self, spec: SweepSpec) -> None:
        """Store ``spec``, or check it equals the stored one (refusing with what differs)."""
        stored = self.meta("spec")
        if stored is None:
            self.set_meta("spec", spec.to_json())
            self.set_meta("created_at", now())
            return
        old = SweepSpec.from_json(stored)
        diff = spec.diff(old)
        if diff:
            raise DlxError(f"argument `out`: {str(self.out)!r} holds a different sweep; use another folder or "
                           f"the same spec. Differs: " + "; ".join(diff))

    def forget_if_empty(self) -> bool:
        """Unbind the folder from its spec when it holds no row and no cost yet (a sweep that
        failed before computing anything, e.g. a model that would not load, leaves the folder
        free for the corrected call); True if it did."""
        con = self.con
        if con.execute("SELECT COUNT(*) FROM rows").fetchone()[0] or con.execute("SELECT COUNT(*) FROM costs").fetchone()[0]:
            return False
        with self._tx():
            con.execute("DELETE FROM meta")
        return True

    def spec(self) -> SweepSpec | None:
        d = self.meta("spec")
        return SweepSpec.from_json(d) if d is not None else None

    # -- rows -------------------------------------------------------------------------------------
    def _tx(self):
        con = self.con

        class _T:
            def __enter__(self_):
                con.execute("BEGIN IMMEDIATE")

            def __exit__(self_, et, ev, tb):
                con.execute("COMMIT" if et is None else "ROLLBACK")
                return False

        return _T()

    def done_ids(self, include_failed: bool = True) -> set[str]:
        q = "SELECT row_id FROM rows" + ("" if include_failed else " WHERE status='ok'")
        return {r[0] for r in self.con.execute(q)}

    def write_image(self, row_id: str, png: bytes) -> str:
        """Atomically write a row's PNG; returns its path relative to ``out``."""
        rel = f"images/{row_id}.png"
        write_bytes(self.out / rel, png, fsync=False)
        return rel

    def add_row(self, row: dict) -> None:
        """One finished row, in its own transaction (replacing a failed attempt of the same row)."""
        vals = dict(row)
        vals["metrics"] = json.dumps(vals.get("metrics") or {}, sort_keys=True, allow_nan=True)
        vals["versions"] = json.dumps(vals.get("versions") or {}, sort_keys=True)
        vals.setdefault("finished_at", now())
        with self._tx():
            self.con.execute(f"INSERT OR REPLACE INTO rows ({', '.join(ROW_COLUMNS)}) VALUES "
                             f"({', '.join('?' for _ in ROW_COLUMNS)})", [vals.get(k) for k in ROW_COLUMNS])

    def rows(self) -> list[dict]:
        cur = self.con.execute(f"SELECT {', '.join(ROW_COLUMNS)} FROM rows")
        out = []
        for r in cur:
            d = dict(zip(ROW_COLUMNS, r))
            d["metrics"] = json.loads(d["metrics"])
            d["versions"] = json.loads(d["versions"] or "{}")
            out.append(d)
        return out

    def event(self, kind: str, **detail) -> None:
        with self._tx():
            self.con.execute("INSERT INTO events (at, kind, detail) VALUES (?, ?, ?)",
                             (now(), kind, json.dumps(detail, sort_keys=True, default=str)))

    def events(self) -> list[dict]:
        return [{"at": a, "kind": k, **json.loads(d)} for a, k, d in
                self.con.execute("SELECT at, kind, detail FROM events ORDER BY id")]

    # -- costs ------------------------------------------------------------------------------------
    def set_cost(self, mode: str, steps: int, scale: float, batch: int, value: dict) -> None:
        with self._tx():
            self.con.execute("INSERT OR REPLACE INTO costs VALUES (?, ?, ?, ?, ?)",
                             (mode, steps, scale, batch, json.dumps(value, sort_keys=True)))

    def costs(self) -> list[dict]:
        return [{"mode": m, "steps": n, "scale": s, "batch": b, **json.loads(v)} for m, n, s, b, v in
                self.con.execute("SELECT mode, steps, scale, batch, value FROM costs")]

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
        """Copy rows, events and costs of another store's database (a shard); returns rows added."""
        con = self.con
        before = con.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
        con.execute("ATTACH DATABASE ? AS shard", (str(other),))
        try:
            with self._tx():
                con.execute(f"INSERT OR IGNORE INTO rows SELECT {', '.join(ROW_COLUMNS)} FROM shard.rows")
                con.execute("INSERT INTO events (at, kind, detail) SELECT at, kind, detail FROM shard.events")
                con.execute("INSERT OR IGNORE INTO costs SELECT * FROM shard.costs")
                if con.execute("SELECT 1 FROM shard.sqlite_master WHERE name='cost_pairs'").fetchone():
                    con.execute("INSERT INTO cost_pairs (mode, steps, scale, batch, at, value) "
                                "SELECT mode, steps, scale, batch, at, value FROM shard.cost_pairs")
        finally:
            con.execute("DETACH DATABASE shard")
        return con.execute("SELECT COUNT(*) FROM rows").fetchone()[0] - before
