"""The run's event log: one SQLite file (WAL mode while it is written), the single source of truth of a run.

Guarantees:
- `append` commits an event before it returns, so an event is durable before it is delivered;
- `seq` is assigned by the log, strictly increasing, and gives the global order;
- appending the same event id twice is a no-op (returns the existing seq): delivery can be at-least-once;
- readers (`read`, `read_events`) never block the writer (WAL), so live views can poll a running log;
- a closed log is one file: `close` takes it out of WAL mode (every event is then in events.sqlite), so no
  events.sqlite-wal / -shm files are left next to it, and a read-only reader opened later (the report, `posttrain
  show`) does not create them again (one would, on a log left in WAL mode, and could not remove them: only a
  connection that can write checkpoints and deletes them). When another process holds the log open at close time
  the switch is retried for up to `CLOSE_SWITCH_S` seconds, then the log is closed as it is: complete, in WAL mode.

Table `events`: seq, id, type, source, target, topic, subject, time, run_id, correlation_id, causation_id,
data (JSON text), dataref.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterator

from .envelope import Envelope

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT,
    topic TEXT NOT NULL,
    subject TEXT,
    time REAL NOT NULL,
    run_id TEXT NOT NULL,
    correlation_id TEXT,
    causation_id TEXT,
    data TEXT NOT NULL,
    dataref TEXT,
    specversion TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_type ON events(type);
CREATE INDEX IF NOT EXISTS events_correlation ON events(correlation_id);
"""

CLOSE_SWITCH_S = 2.0  # how long `close` retries leaving WAL mode while another connection holds the log open

_COLUMNS = ("seq", "id", "type", "source", "target", "topic", "subject", "time", "run_id", "correlation_id",
            "causation_id", "data", "dataref", "specversion")


class LoggedEvent:
    """An envelope together with the sequence number the log gave it."""

    __slots__ = ("seq", "envelope")

    def __init__(self, seq: int, envelope: Envelope):
        self.seq = seq
        self.envelope = envelope

    def __repr__(self) -> str:
        return f"LoggedEvent(seq={self.seq}, type={self.envelope.type!r}, source={self.envelope.source!r})"


def _row_to_event(row: tuple) -> LoggedEvent:
    values = dict(zip(_COLUMNS, row))
    seq = values.pop("seq")
    values["data"] = json.loads(values["data"])
    return LoggedEvent(seq, Envelope(**values))


class EventLog:
    """Append-only event store for one run. Thread-safe: one connection, one lock, one writer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: an appended event survives a crash of the process and of the machine.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        self._closed = False

    def append(self, env: Envelope) -> int:
        """Commit `env` and return its seq. Idempotent on `env.id`."""
        row = (env.id, env.type, env.source, env.target, env.topic, env.subject, env.time, env.run_id,
               env.correlation_id, env.causation_id, json.dumps(env.data, sort_keys=True), env.dataref,
               env.specversion)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"event log {self.path} is closed; cannot append {env.type}")
            cur = self._conn.execute("SELECT seq FROM events WHERE id = ?", (env.id,))
            existing = cur.fetchone()
            if existing is not None:
                return int(existing[0])
            cur = self._conn.execute(
                "INSERT INTO events (id, type, source, target, topic, subject, time, run_id, correlation_id, "
                "causation_id, data, dataref, specversion) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
            return int(cur.lastrowid)

    def read(self, after_seq: int = 0, types: tuple[str, ...] | None = None) -> list[LoggedEvent]:
        with self._lock:
            return _query(self._conn, after_seq, types)

    def close(self) -> None:
        """Close the writer, leaving the log as one file (see the module docstring). Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                try:
                    _leave_wal(self._conn)
                finally:
                    self._conn.close()


def _leave_wal(conn: sqlite3.Connection) -> bool:
    """Switch to the rollback journal (DELETE), which checkpoints the WAL into the main file and removes the -wal
    and -shm files; True when it did. An idle reader in another connection makes the switch fail at once ("database
    is locked", no busy wait), so it is retried until `CLOSE_SWITCH_S` has passed."""
    deadline = time.monotonic() + CLOSE_SWITCH_S
    while True:
        try:
            if conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0].lower() == "delete":
                return True
        except sqlite3.OperationalError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _query(conn: sqlite3.Connection, after_seq: int, types: tuple[str, ...] | None) -> list[LoggedEvent]:
    sql = f"SELECT {', '.join(_COLUMNS)} FROM events WHERE seq > ?"
    args: list = [after_seq]
    if types:
        sql += f" AND type IN ({','.join('?' * len(types))})"
        args.extend(types)
    sql += " ORDER BY seq"
    return [_row_to_event(r) for r in conn.execute(sql, args).fetchall()]


def read_events(path: str | Path, after_seq: int = 0, types: tuple[str, ...] | None = None) -> list[LoggedEvent]:
    """Read a (possibly still running) log without taking the writer's lock. Opens read-only."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no event log at {path}")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        return _query(conn, after_seq, types)
    finally:
        conn.close()


def follow(path: str | Path, after_seq: int = 0) -> Iterator[list[LoggedEvent]]:
    """Yield batches of new events each time it is advanced (the caller decides the polling rate)."""
    seq = after_seq
    while True:
        batch = read_events(path, seq) if Path(path).exists() else []
        if batch:
            seq = batch[-1].seq
        yield batch
