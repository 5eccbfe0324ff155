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
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import cbor2

from . import wire
from .model import PointInfo, Reading

log = logging.getLogger("yujing.spool")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (session INTEGER PRIMARY KEY, catalogue BLOB NOT NULL, started_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS readings (    -- one row per poll: a row is one SQLite insert, not one per point
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session INTEGER NOT NULL,
    ts INTEGER NOT NULL,    -- the newest reading's time
    n INTEGER NOT NULL,     -- readings in the row
    body BLOB NOT NULL      -- CBOR [[point, ts, value, quality], …]; values as on the wire
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
    seq INTEGER NOT NULL,   -- per kind
    session INTEGER NOT NULL,
    payload BLOB NOT NULL,
    UNIQUE (kind, seq)
);
"""

ALARM, DATA = "alarm", "data"


class SpoolError(Exception):
    """The spool cannot store (disk full, read-only filesystem, corrupt file); the message says which file."""


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    kind: str  # ALARM or DATA: the MQTT topic it goes to
    seq: int
    session: int
    payload: bytes
    count: int = 0  # readings or events in it, when it was just sealed (0: not known, a re-send)


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
        self._next_seq = {DATA: self._meta("next_seq", 1), ALARM: self._meta("next_alarm_seq", 1)}
        self._backlog_to = 0  # readings with id ≤ this are backlog (spooled before the uplink came up)
        self.events_waiting = self.db.execute("SELECT count(*) FROM events").fetchone()[0]
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
        rows = self.db.execute(
            "SELECT session FROM messages UNION SELECT session FROM readings UNION SELECT session FROM events ORDER BY 1"
        ).fetchall()
        return [r[0] for r in rows]

    @property
    def dropped(self) -> int:
        return self._meta("dropped")

    # ---------------------------------------------------------- writing

    def _tx(self):  # type: ignore[no-untyped-def]
        return _Transaction(self)

    def append(self, session: int, readings: Sequence[Reading]) -> None:
        """Commit readings durably; raises SpoolError (naming the file) when the disk refuses."""
        if not readings:
            return
        body = cbor2.dumps([[r.point, r.ts_ms, wire.wire_value(r.value), int(r.quality)] for r in readings])
        with self._tx():
            self.db.execute("INSERT INTO readings(session, ts, n, body) VALUES(?, ?, ?, ?)",
                            (session, max(r.ts_ms for r in readings), len(readings), body))
        self._appends_since_check += len(readings)
        if self._appends_since_check >= 1000:
            self._appends_since_check = 0
            self.enforce_budget()

    def append_events(self, session: int, events: Sequence[wire.Event]) -> None:
        """Commit alarm events durably. They are never dropped by the budget and are sent before data."""
        rows = [
            (session, e.ts_ms, cbor2.dumps([wire.EVENT_KINDS.index(e.kind), e.rule, e.old_level, e.new_level, e.ts_ms,
                                             {k: wire.wire_value(v) for k, v in e.values.items()}, e.message, e.by or ""],
                                            canonical=True))
            for e in events
        ]
        with self._tx():
            self.db.executemany("INSERT INTO events(session, ts, event) VALUES(?, ?, ?)", rows)
        self.events_waiting += len(rows)

    def size_bytes(self) -> int:
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._page_size

    def enforce_budget(self) -> int:
        """Drop the oldest routine readings while the spool is over budget; returns how many."""
        dropped = 0
        while self.size_bytes() > self.max_bytes:
            rows = max(20, self.db.execute("SELECT count(*) FROM readings").fetchone()[0] // 20)
            with self._tx():
                n = self.db.execute("SELECT sum(n) FROM (SELECT n FROM readings ORDER BY id LIMIT ?)", (rows,)).fetchone()[0]
                if not n:
                    break
                self.db.execute("DELETE FROM readings WHERE id IN (SELECT id FROM readings ORDER BY id LIMIT ?)", (rows,))
                dropped += n
                self._set_meta("dropped", self._meta("dropped") + n)
        if dropped:
            log.warning("spool %s over its budget of %d bytes: dropped the %d oldest readings (%d in all)",
                        self.path, self.max_bytes, dropped, self.dropped)
        return dropped

    # ---------------------------------------------------------- draining

    def backlog(self) -> int:
        return self.db.execute("SELECT coalesce(sum(n), 0) FROM readings").fetchone()[0]

    def mark_backlog(self) -> int:
        """Everything spooled so far is backlog (the uplink just connected); returns how many readings."""
        row = self.db.execute("SELECT max(id), coalesce(sum(n), 0) FROM readings").fetchone()
        self._backlog_to = row[0] or 0
        return row[1]

    def unsent(self, limit: int = 100, *, exclude: Collection[int] = ()) -> list[Message]:
        """Sealed messages not yet acknowledged: alarms first, then data, each oldest first."""
        skip = self._acked | set(exclude)
        rows = self.db.execute(
            "SELECT id, kind, seq, session, payload FROM messages ORDER BY kind = 'data', id LIMIT ?", (limit + len(skip),)
        )
        return [m for m in (Message(*r) for r in rows) if m.id not in skip][:limit]

    def seal_alarms(self, max_events: int, *, now_ms: int, historical_after_ms: int) -> Message | None:
        """Turn the oldest pending events (of one session) into the next alarm message, atomically."""
        with self._tx():
            self._flush_acked()
            rows = self.db.execute("SELECT id, session, event FROM events ORDER BY id LIMIT ?", (max_events,)).fetchall()
            if not rows:
                return None
            session = rows[0][1]
            rows = [r for r in rows if r[1] == session]
            events = []
            for _, _, blob in rows:
                kind, rule, old, new, ts, values, message, by = cbor2.loads(blob)
                events.append(wire.Event(wire.EVENT_KINDS[kind], rule, old, new, ts, {k: wire.decode_value(v) for k, v in values.items()}, message, by or None))
            seq = self._next_seq[ALARM]
            newest = max(e.ts_ms for e in events)
            payload = wire.encode_alarm(session, seq, events, historical=now_ms - newest > historical_after_ms)
            cur = self.db.execute("INSERT INTO messages(kind, seq, session, payload) VALUES(?, ?, ?, ?)", (ALARM, seq, session, payload))
            self.db.executemany("DELETE FROM events WHERE id = ?", [(r[0],) for r in rows])
            self._set_meta("next_alarm_seq", seq + 1)
        self._next_seq[ALARM] = seq + 1
        self.events_waiting -= len(rows)
        return Message(cur.lastrowid or 0, ALARM, seq, session, payload, len(events))

    def seal(self, max_readings: int, *, now_ms: int, historical_after_ms: int, live: bool = False) -> Message | None:
        """Turn readings (of one session) into the next data message, atomically.

        `live=False` takes the oldest readings (the backlog lane); `live=True` takes the oldest of those
        spooled since `mark_backlog()`, so fresh readings keep flowing while a backlog drains. Each lane
        is in time order per point; backlog messages are flagged historical.
        """
        where = "WHERE id > ?" if live else "WHERE id <= ?" if self._backlog_to else ""
        params: tuple[int, ...] = (self._backlog_to,) if where else ()
        with self._tx():
            self._flush_acked()
            # Sizes first, bodies only of the polls taken: a backlog row holds a whole poll.
            rows = self.db.execute(
                f"SELECT id, session, n FROM readings {where} ORDER BY id LIMIT ?", (*params, max_readings)
            ).fetchall()
            if not rows:
                return None
            session = rows[0][1]
            taken, total = [], 0
            for row in rows:  # whole polls, up to max_readings
                if row[1] != session or total + row[2] > max_readings:
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
            seq = self._next_seq[DATA]
            newest = max(r.ts_ms for r in readings)
            # Historical: spooled before the link came back (the backlog lane), or simply old.
            late = (not live and self._backlog_to > 0) or now_ms - newest > historical_after_ms
            payload = wire.encode_data(session, seq, readings, historical=late)
            cur = self.db.execute("INSERT INTO messages(kind, seq, session, payload) VALUES(?, ?, ?, ?)", (DATA, seq, session, payload))
            if first is not None:
                self.db.execute("DELETE FROM readings WHERE id BETWEEN ? AND ?", (first, last))
            self._set_meta("next_seq", seq + 1)
        self._next_seq[DATA] = seq + 1
        return Message(cur.lastrowid or 0, DATA, seq, session, payload, len(readings))

    def delivered(self, message_id: int) -> None:
        """The broker acknowledged this message: forget it (deleted with the next transaction)."""
        self._acked.add(message_id)
        if len(self._acked) >= 256:
            with self._tx():
                self._flush_acked()

    def _flush_acked(self) -> None:
        if self._acked:
            self.db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in self._acked])
            self._acked.clear()


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
