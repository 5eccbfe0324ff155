"""The durable spool: every reading is committed here before anything is published.

SQLite in WAL mode with synchronous=FULL, so a committed poll survives `kill -9` and power cuts.
Readings wait in `readings`; the uplink *seals* the oldest of them into a data message (assigning the
next sequence number in the same transaction) and deletes the message only after the broker's
PUBACK. A message sealed but never acknowledged is sent again, byte-identical, after a reconnect or
restart: the consumer sees a duplicate seq, never a gap. Sequence numbers and the session counter
live in the same database, so they continue across restarts without reuse.

Bounded: when the file passes `max_bytes`, the oldest routine readings are dropped and counted
(reported in the birth message); sealed messages are never dropped.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cbor2

from . import wire
from .model import PointInfo, Reading

log = logging.getLogger("yujing.spool")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (session INTEGER PRIMARY KEY, catalogue BLOB NOT NULL, started_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session INTEGER NOT NULL,
    point INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    value,                  -- int/float/NULL natively; anything else (bool, decimal, bignum) as CBOR

    quality INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    session INTEGER NOT NULL,
    payload BLOB NOT NULL
);
"""


class SpoolError(Exception):
    """The spool cannot store (disk full, read-only filesystem, corrupt file); the message says which file."""


@dataclass(frozen=True, slots=True)
class Message:
    seq: int
    session: int
    payload: bytes


class Spool:
    def __init__(self, path: Path, *, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.path = path
        self.max_bytes = max_bytes
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0.5)
            # One gateway per spool: a second process sharing it would reuse sequence numbers.
            self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("BEGIN IMMEDIATE")  # takes the lock now, so a second gateway fails at start
            self.db.executescript(SCHEMA)
            self._page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise SpoolError(f"spool {path}: in use by another process (is another yujing running with this site file?)") from exc
            raise SpoolError(f"spool {path}: cannot open: {exc}") from exc
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"spool {path}: cannot open: {exc}") from exc
        self._next_seq = self._meta("next_seq", 1)
        self._appends_since_check = 0
        # PUBACKed seqs whose DELETE waits for the next transaction: one fsync fewer per message.
        # Lost in a power cut, they are only sent again (a flagged duplicate), never lost.
        self._acked: set[int] = set()

    def close(self) -> None:
        try:
            if self._acked:
                with self._tx():
                    self._flush_acked()
        finally:
            self.db.close()

    # ---------------------------------------------------------- counters

    def _meta(self, key: str, default: int = 0) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _set_meta(self, key: str, value: int) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def start_session(self, catalogue: Sequence[PointInfo], now_ms: int) -> int:
        """Count a new boot and remember its catalogue (data sealed in this session refers to it)."""
        blob = cbor2.dumps([[p.device, p.name, p.unit, p.type] for p in catalogue])
        with self._tx():
            session = self._meta("session") + 1
            self._set_meta("session", session)
            self.db.execute("INSERT INTO sessions(session, catalogue, started_ms) VALUES(?, ?, ?)", (session, blob, now_ms))
        return session

    def catalogue(self, session: int) -> tuple[tuple[PointInfo, ...], int] | None:
        row = self.db.execute("SELECT catalogue, started_ms FROM sessions WHERE session = ?", (session,)).fetchone()
        if row is None:
            return None
        return tuple(PointInfo(*e) for e in cbor2.loads(row[0])), row[1]

    def pending_sessions(self) -> list[int]:
        """Older sessions that still have data waiting: their births must reach the platform first."""
        rows = self.db.execute("SELECT session FROM messages UNION SELECT DISTINCT session FROM readings ORDER BY 1").fetchall()
        return [r[0] for r in rows]

    @property
    def dropped(self) -> int:
        return self._meta("dropped")

    # ---------------------------------------------------------- writing

    def _tx(self):  # type: ignore[no-untyped-def]
        return _Transaction(self)

    def append(self, session: int, readings: Sequence[Reading]) -> None:
        """Commit readings durably; raises SpoolError (naming the file) when the disk refuses."""
        rows = [(session, r.point, r.ts_ms, _store(r.value), int(r.quality)) for r in readings]
        with self._tx():
            self.db.executemany("INSERT INTO readings(session, point, ts, value, quality) VALUES(?, ?, ?, ?, ?)", rows)
        self._appends_since_check += len(rows)
        if self._appends_since_check >= 1000:
            self._appends_since_check = 0
            self.enforce_budget()

    def size_bytes(self) -> int:
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._page_size

    def enforce_budget(self) -> int:
        """Drop the oldest routine readings while the spool is over budget; returns how many."""
        dropped = 0
        while self.size_bytes() > self.max_bytes:
            n = max(1000, self.backlog() // 20)
            with self._tx():
                cur = self.db.execute("DELETE FROM readings WHERE id IN (SELECT id FROM readings ORDER BY id LIMIT ?)", (n,))
                if cur.rowcount <= 0:
                    break
                dropped += cur.rowcount
                self._set_meta("dropped", self._meta("dropped") + cur.rowcount)
        if dropped:
            log.warning("spool %s over its budget of %d bytes: dropped the %d oldest readings (%d in all)",
                        self.path, self.max_bytes, dropped, self.dropped)
        return dropped

    # ---------------------------------------------------------- draining

    def backlog(self) -> int:
        return self.db.execute("SELECT count(*) FROM readings").fetchone()[0]

    def unsent(self, after_seq: int = -1, limit: int = 100) -> list[Message]:
        """Sealed messages not yet acknowledged, oldest first."""
        rows = self.db.execute(
            "SELECT seq, session, payload FROM messages WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit + len(self._acked))
        )
        return [Message(*r) for r in rows if r[0] not in self._acked][:limit]

    def seal(self, max_readings: int, *, now_ms: int, historical_after_ms: int) -> Message | None:
        """Turn the oldest readings (of one session) into the next data message, atomically."""
        with self._tx():
            self._flush_acked()
            rows = self.db.execute("SELECT id, session, point, ts, value, quality FROM readings ORDER BY id LIMIT ?", (max_readings,)).fetchall()
            if not rows:
                return None
            session = rows[0][1]
            if rows[-1][1] != session:
                rows = [r for r in rows if r[1] == session]
            readings = [Reading(p, ts, _load(v), q) for _, _, p, ts, v, q in rows]
            seq = self._next_seq
            newest = max(r.ts_ms for r in readings)
            payload = wire.encode_data(session, seq, readings, historical=now_ms - newest > historical_after_ms)
            self.db.execute("INSERT INTO messages(seq, session, payload) VALUES(?, ?, ?)", (seq, session, payload))
            self.db.execute("DELETE FROM readings WHERE id BETWEEN ? AND ? AND session = ?", (rows[0][0], rows[-1][0], session))
            self._set_meta("next_seq", seq + 1)
        self._next_seq = seq + 1
        return Message(seq, session, payload)

    def delivered(self, seq: int) -> None:
        """The broker acknowledged this message: forget it (deleted with the next transaction)."""
        self._acked.add(seq)
        if len(self._acked) >= 256:
            with self._tx():
                self._flush_acked()

    def _flush_acked(self) -> None:
        if self._acked:
            self.db.executemany("DELETE FROM messages WHERE seq = ?", [(s,) for s in self._acked])
            self._acked.clear()


def _store(v: object) -> object:
    if v is None or type(v) is float or (type(v) is int and -(2**63) <= v < 2**63):  # noqa: E721 (bool is not int here)
        return v
    return cbor2.dumps(wire.wire_value(v), canonical=True)  # type: ignore[arg-type]


def _load(v: object) -> object:
    return wire.decode_value(cbor2.loads(v)) if isinstance(v, bytes) else v


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, with SQLite errors turned into SpoolError naming the file."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def __enter__(self) -> None:
        try:
            self.spool.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.spool.path}: {exc}") from exc

    def __exit__(self, typ, exc, tb) -> bool:  # type: ignore[no-untyped-def]
        db = self.spool.db
        if typ is None:
            try:
                db.execute("COMMIT")
                return False
            except sqlite3.Error as err:
                db.execute("ROLLBACK")
                raise SpoolError(f"spool {self.spool.path}: cannot commit: {err}") from err
        if db.in_transaction:
            db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise SpoolError(f"spool {self.spool.path}: {exc}") from exc
        return False
