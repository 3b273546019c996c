"""Saved conversations on disk (DESIGN §6): transcripts in SQLite, one LoLA state snapshot file per turn.

Layout under ``store.home() / "sessions"``::

    sessions.db                          SQLite (WAL): sessions, messages, snapshots (records), prefs
    snapshots/<session id>/<n>-<hash>.safetensors   the state after the first n messages (Session.save)

A snapshot record carries what the state depends on: the model, the sha256 of its weights, the LoLA
settings and the sha256 of the transcript prefix it encodes. Consistency rules, so that a crash at
any moment loses at most the turn in flight:

- a snapshot file is written atomically (temp file, fsync, rename) *before* the transaction that adds
  its record and the turn's messages; a crash in between leaves a file no record names (swept later);
- records are deleted (one transaction) before their files; a crash in between leaves stray files;
- `sweep()` removes temp files and files that no record names; records whose file is missing are dropped.

This module knows nothing about engines; `lolachat.conversation` ties a transcript to a live session.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lolachat.errors import BadInput, LolachatError

SCHEMA_VERSION = 1
SNAPSHOT_SUFFIX = ".safetensors"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY,
    session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    messages INTEGER NOT NULL,
    file TEXT NOT NULL,
    model TEXT NOT NULL,
    weights_sha256 TEXT NOT NULL,
    lola TEXT NOT NULL,
    transcript_sha256 TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    UNIQUE (session_id, messages)
);
CREATE TABLE IF NOT EXISTS prefs (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def sessions_dir() -> Path:
    from lolachat.store import home

    return home() / "sessions"


def transcript_sha256(messages: list[dict]) -> str:
    """The hash a snapshot is keyed by: roles and contents of the messages it encodes, in order."""
    canon = [[m["role"], m["content"]] for m in messages]
    return hashlib.sha256(json.dumps(canon, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


@dataclass
class SessionRecord:
    id: int
    name: str
    model: str
    settings: dict
    created: float
    updated: float
    message_count: int = 0
    snapshot_count: int = 0
    snapshot_bytes: int = 0

    def to_json(self) -> dict:
        return {"name": self.name, "model": self.model, "settings": self.settings, "created": self.created,
                "updated": self.updated, "messages": self.message_count, "snapshots": self.snapshot_count,
                "snapshot_bytes": self.snapshot_bytes}


@dataclass
class SnapshotRecord:
    id: int
    session_id: int
    messages: int  # the state encodes the first `messages` messages of the transcript
    path: Path
    model: str
    weights_sha256: str
    lola: dict
    transcript_sha256: str
    tokens: int
    bytes: int
    created: float

    def to_json(self) -> dict:
        return {"messages": self.messages, "file": str(self.path), "model": self.model,
                "weights_sha256": self.weights_sha256, "lola": self.lola,
                "transcript_sha256": self.transcript_sha256, "tokens": self.tokens, "bytes": self.bytes,
                "created": self.created}


@dataclass
class NewSnapshot:
    """What `add_turn` records about a snapshot file already written (atomically) to `path`."""

    path: Path
    model: str
    weights_sha256: str
    lola: dict
    tokens: int
    meta: dict = field(default_factory=dict)


class SessionsDB:
    """The SQLite transcript store. One connection, shared by threads behind a lock (the TUI writes
    from its generation worker)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else sessions_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.snapshots_root = self.root / "snapshots"
        self.path = self.root / "sessions.db"
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            with self._tx() as c:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                version = c.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise LolachatError(f"{self.path} was written by a newer lolachat (schema {version})")
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as err:
            raise LolachatError(f"cannot open the sessions database {self.path}: {err}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: all of it is committed, or none of it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- sessions ---------------------------------------------------------------------------------------
    def create(self, name: str | None = None, *, model: str = "", settings: dict | None = None,
               system: str | None = None) -> SessionRecord:
        now = time.time()
        with self._tx() as c:
            name = name.strip() if name else self._next_name(c)
            _check_name(name)
            if c.execute("SELECT 1 FROM sessions WHERE name=?", (name,)).fetchone():
                raise BadInput(f"a session named {name!r} already exists")
            cur = c.execute("INSERT INTO sessions (name, model, settings, created, updated) VALUES (?,?,?,?,?)",
                            (name, model, json.dumps(settings or {}), now, now))
            sid = cur.lastrowid
            if system:
                c.execute("INSERT INTO messages (session_id, seq, role, content, created) VALUES (?,?,?,?,?)",
                          (sid, 0, "system", system, now))
        return self.get(name)

    def _next_name(self, c: sqlite3.Connection) -> str:
        names = {r[0] for r in c.execute("SELECT name FROM sessions")}
        n = 1
        while f"chat {n}" in names:
            n += 1
        return f"chat {n}"

    def get(self, name: str) -> SessionRecord:
        found = self.find(name)
        if found is None:
            raise BadInput(f"no session named {name!r} (see `lolachat sessions list`)")
        return found

    def find(self, name: str) -> SessionRecord | None:
        rows = self._query(_SESSION_SELECT + " WHERE s.name=? GROUP BY s.id", (name,))
        return _session(rows[0]) if rows else None

    def by_id(self, sid: int) -> SessionRecord:
        rows = self._query(_SESSION_SELECT + " WHERE s.id=? GROUP BY s.id", (sid,))
        if not rows:
            raise BadInput(f"session {sid} no longer exists")
        return _session(rows[0])

    def list(self) -> list[SessionRecord]:
        """All sessions, most recently used first."""
        rows = self._query(_SESSION_SELECT + " GROUP BY s.id ORDER BY s.updated DESC, s.id DESC")
        return [_session(r) for r in rows]

    def rename(self, sid: int, new_name: str) -> None:
        new_name = new_name.strip()
        _check_name(new_name)
        with self._tx() as c:
            taken = c.execute("SELECT id FROM sessions WHERE name=?", (new_name,)).fetchone()
            if taken and taken[0] != sid:
                raise BadInput(f"a session named {new_name!r} already exists")
            c.execute("UPDATE sessions SET name=? WHERE id=?", (new_name, sid))

    def update(self, sid: int, *, model: str | None = None, settings: dict | None = None) -> None:
        with self._tx() as c:
            if model is not None:
                c.execute("UPDATE sessions SET model=? WHERE id=?", (model, sid))
            if settings is not None:
                c.execute("UPDATE sessions SET settings=? WHERE id=?", (json.dumps(settings), sid))

    def touch(self, sid: int) -> None:
        with self._tx() as c:
            c.execute("UPDATE sessions SET updated=? WHERE id=?", (time.time(), sid))

    def delete(self, sid: int) -> None:
        """Delete a session, its transcript and its snapshots (records first, then files)."""
        with self._tx() as c:
            c.execute("DELETE FROM sessions WHERE id=?", (sid,))
        shutil.rmtree(self.snapshot_dir(sid), ignore_errors=True)

    # -- transcripts ------------------------------------------------------------------------------------
    def messages(self, sid: int) -> list[dict]:
        rows = self._query("SELECT role, content FROM messages WHERE session_id=? ORDER BY seq", (sid,))
        return [{"role": r["role"], "content": r["content"]} for r in rows]

    def message_meta(self, sid: int) -> list[dict]:
        rows = self._query("SELECT meta FROM messages WHERE session_id=? ORDER BY seq", (sid,))
        return [json.loads(r["meta"]) for r in rows]

    def set_system(self, sid: int, system: str | None) -> None:
        """Set, replace or remove the system message (message 0). Snapshots of the old one stay valid
        records of the old transcript and are refused by their hash."""
        now = time.time()
        with self._tx() as c:
            first = c.execute("SELECT role FROM messages WHERE session_id=? AND seq=0", (sid,)).fetchone()
            has = first is not None and first[0] == "system"
            if system:
                if has:
                    c.execute("UPDATE messages SET content=? WHERE session_id=? AND seq=0", (system, sid))
                else:
                    c.execute("UPDATE messages SET seq=seq+1000000 WHERE session_id=?", (sid,))
                    c.execute("UPDATE messages SET seq=seq-1000000+1 WHERE session_id=?", (sid,))
                    c.execute("INSERT INTO messages (session_id, seq, role, content, created) VALUES (?,?,?,?,?)",
                              (sid, 0, "system", system, now))
            elif has:
                c.execute("DELETE FROM messages WHERE session_id=? AND seq=0", (sid,))
                c.execute("UPDATE messages SET seq=seq+1000000 WHERE session_id=?", (sid,))
                c.execute("UPDATE messages SET seq=seq-1000000-1 WHERE session_id=?", (sid,))
            c.execute("DELETE FROM snapshots WHERE session_id=?", (sid,))
        self.sweep(sid)

    def add_turn(self, sid: int, start: int, new_messages: list[dict], snapshot: NewSnapshot | None,
                 meta: list[dict] | None = None) -> None:
        """Append messages `start..` of the transcript and the record of the snapshot that encodes the
        whole transcript after them, in one transaction. The snapshot file must already be in place."""
        now = time.time()
        meta = meta or [{} for _ in new_messages]
        with self._tx() as c:
            count = c.execute("SELECT COUNT(*) FROM messages WHERE session_id=?", (sid,)).fetchone()[0]
            if count != start:
                raise LolachatError(f"session transcript changed underneath (has {count} messages, expected "
                                    f"{start}); reopen the session")
            for i, (m, extra) in enumerate(zip(new_messages, meta)):
                c.execute("INSERT INTO messages (session_id, seq, role, content, meta, created) VALUES (?,?,?,?,?,?)",
                          (sid, start + i, m["role"], m["content"], json.dumps(extra), now))
            if snapshot is not None:
                total = start + len(new_messages)
                transcript = [dict(r) for r in c.execute(
                    "SELECT role, content FROM messages WHERE session_id=? ORDER BY seq", (sid,))]
                c.execute("DELETE FROM snapshots WHERE session_id=? AND messages=?", (sid, total))
                c.execute(
                    "INSERT INTO snapshots (session_id, messages, file, model, weights_sha256, lola, "
                    "transcript_sha256, tokens, bytes, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (sid, total, self._rel(snapshot.path), snapshot.model, snapshot.weights_sha256,
                     json.dumps(snapshot.lola, sort_keys=True), transcript_sha256(transcript), snapshot.tokens,
                     snapshot.path.stat().st_size, now))
            c.execute("UPDATE sessions SET updated=? WHERE id=?", (now, sid))

    def truncate(self, sid: int, keep: int) -> None:
        """Cut the transcript to its first `keep` messages and drop the snapshots of later turns."""
        with self._tx() as c:
            c.execute("DELETE FROM messages WHERE session_id=? AND seq>=?", (sid, keep))
            c.execute("DELETE FROM snapshots WHERE session_id=? AND messages>?", (sid, keep))
            c.execute("UPDATE sessions SET updated=? WHERE id=?", (time.time(), sid))
        self.sweep(sid)

    # -- snapshots --------------------------------------------------------------------------------------
    def snapshot_dir(self, sid: int) -> Path:
        return self.snapshots_root / str(sid)

    def snapshot_path(self, sid: int, messages: list[dict]) -> Path:
        return self.snapshot_dir(sid) / f"{len(messages):05d}-{transcript_sha256(messages)[:16]}{SNAPSHOT_SUFFIX}"

    def snapshots(self, sid: int) -> list[SnapshotRecord]:
        """Snapshot records of a session, latest turn first."""
        rows = self._query("SELECT * FROM snapshots WHERE session_id=? ORDER BY messages DESC", (sid,))
        return [_snapshot(r, self.root) for r in rows]

    def prune(self, sid: int, keep: int) -> int:
        """Keep the snapshots of the last `keep` turns; returns how many were deleted."""
        doomed = self.snapshots(sid)[max(keep, 0):]
        if not doomed:
            return 0
        with self._tx() as c:
            c.executemany("DELETE FROM snapshots WHERE id=?", [(s.id,) for s in doomed])
        for s in doomed:
            s.path.unlink(missing_ok=True)
        return len(doomed)

    def drop_snapshot(self, snap: SnapshotRecord) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM snapshots WHERE id=?", (snap.id,))
        snap.path.unlink(missing_ok=True)

    def sweep(self, sid: int | None = None, min_age: float = 0.0) -> int:
        """Remove temp files and snapshot files no record names; drop records whose file is gone.
        Files younger than `min_age` seconds are left alone (another process may be writing them).
        Returns the number of files removed."""
        removed = 0
        cutoff = time.time() - min_age
        with self._lock:
            rows = self._query("SELECT id, session_id, file FROM snapshots" +
                               ("" if sid is None else " WHERE session_id=?"), () if sid is None else (sid,))
            named = {self.root / r["file"] for r in rows}
            missing = [r["id"] for r in rows if not (self.root / r["file"]).is_file()]
            if missing:
                with self._tx() as c:
                    c.executemany("DELETE FROM snapshots WHERE id=?", [(i,) for i in missing])
            live = {str(r[0]) for r in self._query("SELECT id FROM sessions")}
            dirs = [self.snapshot_dir(sid)] if sid is not None else (
                sorted(p for p in self.snapshots_root.iterdir() if p.is_dir()) if self.snapshots_root.is_dir() else [])
            for d in dirs:
                if not d.is_dir():
                    continue
                if d.name not in live:
                    shutil.rmtree(d, ignore_errors=True)
                    removed += 1
                    continue
                for f in d.iterdir():
                    if f not in named and (min_age <= 0 or _mtime(f) < cutoff):
                        f.unlink(missing_ok=True)
                        removed += 1
        return removed

    def _rel(self, path: Path) -> str:
        return os.path.relpath(path, self.root)

    # -- small preferences (theme, default session) ------------------------------------------------------
    def pref(self, key: str, default: str | None = None) -> str | None:
        rows = self._query("SELECT value FROM prefs WHERE key=?", (key,))
        return rows[0]["value"] if rows else default

    def set_pref(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO prefs (key, value) VALUES (?, ?) "
                      "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    # -- export -----------------------------------------------------------------------------------------
    def export_markdown(self, sid: int) -> str:
        record = self.by_id(sid)
        return to_markdown(record.name, record.model, self.messages(sid))


_SESSION_SELECT = """
SELECT s.*, (SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id) AS message_count,
       COUNT(p.id) AS snapshot_count, COALESCE(SUM(p.bytes), 0) AS snapshot_bytes
FROM sessions s LEFT JOIN snapshots p ON p.session_id = s.id
"""


def _session(r: sqlite3.Row) -> SessionRecord:
    return SessionRecord(id=r["id"], name=r["name"], model=r["model"], settings=json.loads(r["settings"]),
                         created=r["created"], updated=r["updated"], message_count=r["message_count"],
                         snapshot_count=r["snapshot_count"], snapshot_bytes=r["snapshot_bytes"])


def _snapshot(r: sqlite3.Row, root: Path) -> SnapshotRecord:
    return SnapshotRecord(id=r["id"], session_id=r["session_id"], messages=r["messages"], path=root / r["file"],
                          model=r["model"], weights_sha256=r["weights_sha256"], lola=json.loads(r["lola"]),
                          transcript_sha256=r["transcript_sha256"], tokens=r["tokens"], bytes=r["bytes"],
                          created=r["created"])


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _check_name(name: str) -> None:
    if not name or len(name) > 200 or any(ch in name for ch in "\n\r\t\x00"):
        raise BadInput("a session name must be 1-200 characters on one line")


def to_markdown(name: str, model: str, messages: list[dict]) -> str:
    """A conversation as Markdown: a title, then one section per message."""
    titles = {"system": "System", "user": "You", "assistant": "Assistant"}
    lines = [f"# {name}", ""]
    if model:
        lines += [f"*model: {model}*", ""]
    for m in messages:
        lines += [f"## {titles.get(m['role'], m['role'].title())}", "", m["content"].rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"
