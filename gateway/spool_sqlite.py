"""The spool of releases before the segment log (gateway/spool.py), kept to read an old spool once and
carry what it holds into the log (gateway.storage does, at start), and as the comparison in
bench/store_wear.py. Not used to store anything new.

SQLite in WAL mode with synchronous=FULL, so a committed poll survives `kill -9` and power cuts.
Readings wait in `readings`; the uplink *seals* the oldest of them into a data message (assigning the
next sequence number of their session in the same transaction) and deletes the message only after the
broker's PUBACK. A message sealed but never acknowledged is sent again, byte-identical, after a reconnect
or restart: the consumer sees a duplicate seq, never a gap. Each session numbers its own data and alarm
messages from 1 (`sessions` holds the counters), and session numbers only grow, so a (session, seq) pair
is never reused — not even when a corrupt spool is replaced by a fresh one (gateway.storage keeps the
session counter in a second place for that).

Every SQLite error, at any statement (INSERT, COMMIT, checkpoint, even ROLLBACK), comes out as SpoolError
naming the file; `corrupt` says whether the file itself is damaged (then the caller sets it aside).

Bounded: when the file passes `max_bytes`, the oldest routine readings are dropped and counted
(reported in the birth message); sealed messages and alarm events are never dropped.

Not thread-safe by design, but guarded: the gateway calls it from its storage thread only (gateway.storage);
the lock lets a test or a status probe read it from elsewhere without tearing a transaction.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import cbor2

from . import wire
from .model import PointInfo, Reading
from .spool import ALARM, DATA, Message, SpoolError, event_blob as _event_blob, event_from_blob as _event_from_blob

log = logging.getLogger("yujing.spool")

SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    session INTEGER PRIMARY KEY,
    catalogue BLOB NOT NULL,
    started_ms INTEGER NOT NULL,
    next_seq INTEGER NOT NULL DEFAULT 1,        -- data messages of this session
    next_alarm_seq INTEGER NOT NULL DEFAULT 1   -- alarm messages of this session
);
CREATE TABLE IF NOT EXISTS readings (    -- one row per poll: a row is one SQLite insert, not one per point
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session INTEGER NOT NULL,
    ts INTEGER NOT NULL,    -- the newest reading's time
    n INTEGER NOT NULL,     -- readings in the row
    body BLOB NOT NULL      -- CBOR [[point, ts, value, quality], …], values as on the wire
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    event BLOB NOT NULL     -- CBOR [kind, rule, old, new, ts, values, message, by]
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,     -- 'alarm' (sent first) or 'data'
    seq INTEGER NOT NULL,   -- per session and kind
    session INTEGER NOT NULL,
    payload BLOB NOT NULL,
    UNIQUE (session, kind, seq)
);
CREATE TABLE IF NOT EXISTS dead_letters (   -- messages the broker refused for good, kept with the reason
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    seq INTEGER NOT NULL,
    session INTEGER NOT NULL,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL
);
"""
MAX_DEAD_LETTERS = 10_000  # the oldest go past this (each is counted in meta 'rejected')

_SEQ_COLUMN = {DATA: "next_seq", ALARM: "next_alarm_seq"}
_CORRUPT_CODES = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}
_FULL_CODES = {"SQLITE_FULL"}


def _spool_error(path: Path, exc: BaseException, what: str = "") -> SpoolError:
    name = getattr(exc, "sqlite_errorname", "")
    text = str(exc)
    corrupt = name in _CORRUPT_CODES or "malformed" in text or "not a database" in text
    full = name in _FULL_CODES or "full" in text
    if isinstance(exc, OSError):
        full = exc.errno in (28, 122)  # ENOSPC, EDQUOT
        text = exc.strerror or text
    return SpoolError(f"spool {path}: {what + ': ' if what else ''}{text}", corrupt=corrupt, full=full)


P = ParamSpec("P")
R = TypeVar("R")


def _guarded(method: Callable[P, R]) -> Callable[P, R]:
    """Serialise a public method and turn any SQLite or OS error into SpoolError."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        self: SqliteSpool = args[0]  # type: ignore[assignment]
        with self._lock:
            try:
                return method(*args, **kwargs)
            except SpoolError:
                raise
            except (sqlite3.Error, OSError) as exc:
                raise _spool_error(self.path, exc, method.__name__) from exc

    return wrapper


class SqliteSpool:
    def __init__(self, path: Path, *, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self.created = False  # the file did not exist (or was empty): a new spool
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.created = not path.exists() or path.stat().st_size == 0
            # Owner-only before SQLite opens it: its -wal and -shm files take the database file's mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0.5)
        except (OSError, sqlite3.Error) as exc:
            raise _spool_error(path, exc, "cannot open") from exc
        try:
            # One gateway per spool: a second process sharing it would reuse sequence numbers.
            self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("BEGIN IMMEDIATE")  # takes the lock now, so a second gateway fails at start
            self._migrate()
            self.db.execute("COMMIT")
            self._page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
            self.events_waiting = self.db.execute("SELECT count(*) FROM events").fetchone()[0]
        except SpoolError:
            self._close_quietly()  # the lock goes with the connection, not with the garbage collector
            raise
        except sqlite3.Error as exc:
            self._close_quietly()
            if "locked" in str(exc):
                raise SpoolError(f"spool {path}: in use by another process (is another yujing running with this site file?)") from exc
            raise _spool_error(path, exc, "cannot open") from exc
        self._next_seq: dict[tuple[int, str], int] = {}
        self._backlog_to = 0  # readings with id ≤ this are backlog (old when the uplink came up)
        self._appends_since_check = 0
        # PUBACKed ids whose DELETE waits for the next transaction: one fsync fewer per message.
        # Lost in a power cut, they are only sent again (a flagged duplicate), never lost.
        self._acked: set[int] = set()

    def _migrate(self) -> None:
        """Create the tables, or bring an older spool up to date, one version at a time: version 1 had one
        data seq per gateway; version 2 lacks the dead-letter table, which the CREATE … IF NOT EXISTS below adds."""
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        has_tables = self.db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'meta'").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SpoolError(f"spool {self.path}: schema version {version} is newer than this gateway's ({SCHEMA_VERSION}); "
                             "it was written by a later release")
        if has_tables and version < 2:
            # Carry the old per-gateway counters into every session, so no (session, seq) pair that may
            # already have been sent can be issued again; messages get the per-session uniqueness.
            row = self.db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            alarm = self.db.execute("SELECT value FROM meta WHERE key = 'next_alarm_seq'").fetchone()
            self.db.execute("ALTER TABLE sessions ADD COLUMN next_seq INTEGER NOT NULL DEFAULT 1")
            self.db.execute("ALTER TABLE sessions ADD COLUMN next_alarm_seq INTEGER NOT NULL DEFAULT 1")
            self.db.execute("UPDATE sessions SET next_seq = ?, next_alarm_seq = ?", (row[0] if row else 1, alarm[0] if alarm else 1))
            self.db.execute("ALTER TABLE messages RENAME TO messages_v1")
            self.db.execute(_statement(SCHEMA, "messages"))
            self.db.execute("INSERT INTO messages(id, kind, seq, session, payload) SELECT id, kind, seq, session, payload FROM messages_v1")
            self.db.execute("DROP TABLE messages_v1")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                self.db.execute(statement)
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _close_quietly(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def close(self) -> None:
        with self._lock:
            try:
                if self._acked:
                    with self._tx():
                        self._flush_acked()
            except SpoolError as exc:
                log.warning("%s (closing anyway; the acknowledged messages will be sent again)", exc)
            finally:
                self._close_quietly()

    # ---------------------------------------------------------- health

    @_guarded
    def check_integrity(self) -> str | None:
        """None when SQLite's quick_check finds the file sound, else what it found (first problem)."""
        row = self.db.execute("PRAGMA quick_check(1)").fetchone()
        return None if row and row[0] == "ok" else str(row[0] if row else "no answer")

    @_guarded
    def checkpoint(self) -> None:
        """Copy the WAL into the database file now (SQLite does it by itself every 1,000 pages)."""
        busy, _, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise SpoolError(f"spool {self.path}: checkpoint could not complete")

    # ---------------------------------------------------------- counters

    def _meta(self, key: str, default: int = 0) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _set_meta(self, key: str, value: int) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    @property
    def last_session(self) -> int:
        """The highest session number this file has recorded (0 for a new spool)."""
        with self._lock:
            try:
                return self._meta("session")
            except sqlite3.Error as exc:
                raise _spool_error(self.path, exc, "last_session") from exc

    @_guarded
    def start_session(self, catalogue: Sequence[PointInfo], now_ms: int, *, after: int = 0) -> int:
        """Count a new boot and remember its catalogue (data sealed in this session refers to it).

        The new session is above both this file's last one and `after` (the counter kept outside the
        spool), so it is new even when the spool was replaced.
        """
        blob = cbor2.dumps([[p.device, p.name, p.unit, p.type] for p in catalogue])
        with self._tx():
            session = max(self._meta("session"), after) + 1
            self._set_meta("session", session)
            self.db.execute("INSERT INTO sessions(session, catalogue, started_ms) VALUES(?, ?, ?)", (session, blob, now_ms))
        return session

    @_guarded
    def adopt_session(self, session: int, catalogue: Sequence[PointInfo], started_ms: int,
                      *, issued: dict[str, int] | None = None) -> None:
        """Carry a running session into this (fresh) file: the same number, catalogue and sequence numbers
        above `issued` (kind → next seq), so nothing already sent is numbered again."""
        blob = cbor2.dumps([[p.device, p.name, p.unit, p.type] for p in catalogue])
        nexts = issued or {}
        with self._tx():
            self._set_meta("session", max(self._meta("session"), session))
            self.db.execute(
                "INSERT INTO sessions(session, catalogue, started_ms, next_seq, next_alarm_seq) VALUES(?, ?, ?, ?, ?) "
                "ON CONFLICT(session) DO UPDATE SET next_seq = max(next_seq, excluded.next_seq), "
                "next_alarm_seq = max(next_alarm_seq, excluded.next_alarm_seq)",
                (session, blob, started_ms, nexts.get(DATA, 1), nexts.get(ALARM, 1)),
            )
        for kind, nxt in nexts.items():
            self._next_seq[(session, kind)] = max(nxt, self._next_seq.get((session, kind), 1))

    def issued(self) -> dict[int, dict[str, int]]:
        """The next sequence numbers this object knows it must not go below: session → kind → seq."""
        out: dict[int, dict[str, int]] = {}
        for (session, kind), nxt in self._next_seq.items():
            out.setdefault(session, {})[kind] = nxt
        return out

    @_guarded
    def catalogue(self, session: int) -> tuple[tuple[PointInfo, ...], int] | None:
        row = self.db.execute("SELECT catalogue, started_ms FROM sessions WHERE session = ?", (session,)).fetchone()
        if row is None:
            return None
        return tuple(PointInfo(*e) for e in cbor2.loads(row[0])), row[1]

    @_guarded
    def pending_sessions(self) -> list[int]:
        """Older sessions that still have data waiting: their births must reach the platform first."""
        rows = self.db.execute(
            "SELECT session FROM messages UNION SELECT session FROM readings UNION SELECT session FROM events ORDER BY 1"
        ).fetchall()
        return [r[0] for r in rows]

    @property
    def dropped(self) -> int:
        with self._lock:
            try:
                return self._meta("dropped")
            except sqlite3.Error as exc:
                raise _spool_error(self.path, exc, "dropped") from exc

    # ---------------------------------------------------------- writing

    def _tx(self) -> _Transaction:
        return _Transaction(self)

    @_guarded
    def append(self, session: int, readings: Sequence[Reading]) -> None:
        """Commit readings durably; raises SpoolError (naming the file) when the disk refuses."""
        self.store([(session, readings)], [])

    @_guarded
    def append_events(self, session: int, events: Sequence[wire.Event]) -> None:
        """Commit alarm events durably. They are never dropped by the budget and are sent before data."""
        self.store([], [(session, events)])

    @_guarded
    def store(self, polls: Sequence[tuple[int, Sequence[Reading]]], events: Sequence[tuple[int, Sequence[wire.Event]]],
              *, dropped: int = 0) -> None:
        """Commit polls and alarm events in one transaction (one fsync for all of them).

        `dropped` adds to the count of readings lost before they reached the spool (held in memory while
        the disk refused, then over the memory bound), so the birth message reports them too.
        """
        rows = [
            (session, max(r.ts_ms for r in readings), len(readings),
             cbor2.dumps([[r.point, r.ts_ms, wire.wire_value(r.value), int(r.quality)] for r in readings]))
            for session, readings in polls
            if readings
        ]
        event_rows = [(session, e.ts_ms, _event_blob(e)) for session, evs in events for e in evs]
        if not rows and not event_rows and not dropped:
            return
        with self._tx():
            if event_rows:
                self.db.executemany("INSERT INTO events(session, ts, event) VALUES(?, ?, ?)", event_rows)
            if rows:
                self.db.executemany("INSERT INTO readings(session, ts, n, body) VALUES(?, ?, ?, ?)", rows)
            if dropped:
                self._set_meta("dropped", self._meta("dropped") + dropped)
        self.events_waiting += len(event_rows)
        self._appends_since_check += sum(r[2] for r in rows)
        if self._appends_since_check >= 1000:
            self._appends_since_check = 0
            self.enforce_budget()

    @_guarded
    def size_bytes(self) -> int:
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._page_size

    @_guarded
    def enforce_budget(self) -> int:
        """Drop the oldest routine readings while the spool is over budget; returns how many."""
        dropped = 0
        while self.size_bytes() > self.max_bytes:
            if not self._drop_oldest():
                break
            dropped += self._last_drop
        if dropped:
            log.warning("spool %s over its budget of %d bytes: dropped the %d oldest readings (%d in all)",
                        self.path, self.max_bytes, dropped, self.dropped)
        return dropped

    @_guarded
    def make_room(self) -> int:
        """The disk is full: drop the oldest 5 % of routine readings, so their pages hold new alarms and
        readings (SQLite reuses freed pages without growing the file). Returns how many were dropped."""
        return self._last_drop if self._drop_oldest() else 0

    def _drop_oldest(self) -> bool:
        rows = max(20, self.db.execute("SELECT count(*) FROM readings").fetchone()[0] // 20)
        with self._tx():
            n = self.db.execute("SELECT sum(n) FROM (SELECT n FROM readings ORDER BY id LIMIT ?)", (rows,)).fetchone()[0]
            if not n:
                return False
            self.db.execute("DELETE FROM readings WHERE id IN (SELECT id FROM readings ORDER BY id LIMIT ?)", (rows,))
            self._set_meta("dropped", self._meta("dropped") + n)
        self._last_drop = n
        return True

    _last_drop = 0

    # ---------------------------------------------------------- draining

    @_guarded
    def backlog(self) -> int:
        return self.db.execute("SELECT coalesce(sum(n), 0) FROM readings").fetchone()[0]

    @_guarded
    def mark_backlog(self, *, older_than_ms: int | None = None) -> int:
        """The uplink just connected: what was spooled so far becomes the backlog lane (drained at
        `drain_rate`, behind live data). With `older_than_ms`, only polls older than that: readings taken
        while the first connection was still being made are live, not backlog. Returns how many readings."""
        if older_than_ms is None:
            row = self.db.execute("SELECT max(id), coalesce(sum(n), 0) FROM readings").fetchone()
        else:
            row = self.db.execute("SELECT max(id), coalesce(sum(n), 0) FROM readings WHERE ts < ?", (older_than_ms,)).fetchone()
        self._backlog_to = row[0] or 0
        return row[1]

    @_guarded
    def unsent(self, limit: int = 100, *, exclude: Collection[int] = ()) -> list[Message]:
        """Sealed messages not yet acknowledged: alarms first, then data, each oldest first."""
        skip = self._acked | set(exclude)
        rows = self.db.execute(
            "SELECT id, kind, seq, session, payload FROM messages ORDER BY kind = 'data', id LIMIT ?", (limit + len(skip),)
        )
        return [m for m in (Message(*r) for r in rows) if m.id not in skip][:limit]

    def _take_seq(self, session: int, kind: str) -> int:
        key = (session, kind)
        seq = self._next_seq.get(key)
        if seq is None:
            row = self.db.execute(f"SELECT {_SEQ_COLUMN[kind]} FROM sessions WHERE session = ?", (session,)).fetchone()
            seq = row[0] if row else 1
            if row is None:  # readings of a session the table lost (never in a sound file): keep them sendable
                self.db.execute("INSERT OR IGNORE INTO sessions(session, catalogue, started_ms) VALUES(?, ?, 0)", (session, cbor2.dumps([])))
        self.db.execute(f"UPDATE sessions SET {_SEQ_COLUMN[kind]} = ? WHERE session = ?", (seq + 1, session))
        return seq

    @_guarded
    def seal_alarms(self, max_events: int, *, now_ms: int, historical_after_ms: int) -> Message | None:
        """Turn the oldest pending events (of one session, all historical or all live) into the next
        alarm message of that session, atomically."""
        with self._tx():
            self._flush_acked()
            rows = self.db.execute("SELECT id, session, event FROM events ORDER BY id LIMIT ?", (max_events,)).fetchall()
            if not rows:
                return None
            session = rows[0][1]
            events: list[wire.Event] = []
            taken = []
            late: bool | None = None
            for row_id, row_session, blob in rows:
                if row_session != session:
                    break
                e = _event_from_blob(blob)
                old = now_ms - e.ts_ms > historical_after_ms
                if late is None:
                    late = old
                elif old != late:  # events are flagged one by one: a message is all historical or all live
                    break
                events.append(e)
                taken.append(row_id)
            seq = self._take_seq(session, ALARM)
            payload = wire.encode_alarm(session, seq, events, historical=bool(late))
            cur = self.db.execute("INSERT INTO messages(kind, seq, session, payload) VALUES(?, ?, ?, ?)", (ALARM, seq, session, payload))
            self.db.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in taken])
        self._next_seq[(session, ALARM)] = seq + 1
        self.events_waiting -= len(taken)
        return Message(cur.lastrowid or 0, ALARM, seq, session, payload, len(events))

    @_guarded
    def seal(self, max_readings: int, *, now_ms: int, historical_after_ms: int, live: bool = False) -> Message | None:
        """Turn readings (of one session) into the next data message of that session, atomically.

        `live=False` takes the oldest readings (the backlog lane); `live=True` takes the oldest of those
        spooled since `mark_backlog()`, so fresh readings keep flowing while a backlog drains. Each lane is
        in time order per point. A message is historical when its polls are older than
        `historical_after_ms`; polls on both sides of that line go in separate messages.
        """
        where = "WHERE id > ?" if live else "WHERE id <= ?" if self._backlog_to else ""
        params: tuple[int, ...] = (self._backlog_to,) if where else ()
        cutoff = now_ms - historical_after_ms
        with self._tx():
            self._flush_acked()
            # Sizes first, bodies only of the polls taken: a backlog row holds a whole poll.
            rows = self.db.execute(
                f"SELECT id, session, n, ts FROM readings {where} ORDER BY id LIMIT ?", (*params, max_readings)
            ).fetchall()
            if not rows:
                return None
            session = rows[0][1]
            late = rows[0][3] < cutoff
            taken, total = [], 0
            for row in rows:  # whole polls of one session and one side of the historical line, up to max_readings
                if row[1] != session or (row[3] < cutoff) != late or total + row[2] > max_readings:
                    break
                taken.append(row)
                total += row[2]
            if taken:
                first, last = taken[0][0], taken[-1][0]
                bodies = self.db.execute("SELECT body FROM readings WHERE id BETWEEN ? AND ? ORDER BY id", (first, last))
                items = [item for (body,) in bodies for item in cbor2.loads(body)]
            else:  # one poll larger than a message: send its head now, keep the rest in its row
                items = cbor2.loads(self.db.execute("SELECT body FROM readings WHERE id = ?", (rows[0][0],)).fetchone()[0])
                rest, items = items[max_readings:], items[:max_readings]
                self.db.execute("UPDATE readings SET n = ?, body = ? WHERE id = ?", (len(rest), cbor2.dumps(rest), rows[0][0]))
                first, last = None, None
            readings = [Reading(p, ts, wire.decode_value(v), q) for p, ts, v, q in items]
            seq = self._take_seq(session, DATA)
            payload = wire.encode_data(session, seq, readings, historical=late)
            cur = self.db.execute("INSERT INTO messages(kind, seq, session, payload) VALUES(?, ?, ?, ?)", (DATA, seq, session, payload))
            if first is not None:
                self.db.execute("DELETE FROM readings WHERE id BETWEEN ? AND ?", (first, last))
        self._next_seq[(session, DATA)] = seq + 1
        return Message(cur.lastrowid or 0, DATA, seq, session, payload, len(readings))

    @_guarded
    def delivered(self, message_id: int) -> None:
        """The broker acknowledged this message: forget it (deleted with the next transaction)."""
        self._acked.add(message_id)
        if len(self._acked) >= 256:
            with self._tx():
                self._flush_acked()

    @_guarded
    def rejected(self, message_id: int, reason: str) -> None:
        """The broker refused this message for good: move it to the dead-letter table, with the reason."""
        with self._tx():
            self.db.execute("INSERT INTO dead_letters(kind, seq, session, payload, reason) "
                            "SELECT kind, seq, session, payload, ? FROM messages WHERE id = ?", (reason[:500], message_id))
            self.db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            self.db.execute("DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - ?", (MAX_DEAD_LETTERS,))
            self._set_meta("rejected", self._meta("rejected") + 1)

    @_guarded
    def dead_letters(self, limit: int = 100) -> list[tuple[str, int, int, str]]:
        """The newest refused messages: (kind, session, seq, reason)."""
        return self.db.execute("SELECT kind, session, seq, reason FROM dead_letters ORDER BY id DESC LIMIT ?", (limit,)).fetchall()

    def _flush_acked(self) -> None:
        if self._acked:
            self.db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in self._acked])
            self._acked.clear()


def _statement(schema: str, table: str) -> str:
    return next(st for st in schema.split(";") if f"EXISTS {table} (" in st)


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT. A failed statement or COMMIT rolls back — if SQLite has not already done
    so itself, as it does after SQLITE_FULL at COMMIT — and errors come out as SpoolError naming the file."""

    def __init__(self, spool: SqliteSpool) -> None:
        self.spool = spool

    def __enter__(self) -> None:
        try:
            self.spool.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _spool_error(self.spool.path, exc, "begin") from exc

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> bool:
        db = self.spool.db
        if typ is None:
            try:
                db.execute("COMMIT")
                return False
            except sqlite3.Error as err:
                self._rollback()
                raise _spool_error(self.spool.path, err, "cannot commit") from err
        self._rollback()
        if isinstance(exc, (sqlite3.Error, OSError)):
            raise _spool_error(self.spool.path, exc) from exc
        return False

    def _rollback(self) -> None:
        db = self.spool.db
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        except sqlite3.Error as err:  # the failure that brought us here is the one to report
            log.debug("spool %s: rollback: %s", self.spool.path, err)
