"""Carry a spool of an older release (SQLite, gateway/spool_sqlite.py) into the segment log, once, at start.

Sessions keep their catalogues and sequence numbers; sealed messages keep their bytes (a re-send is
byte-identical, as it always was); readings and alarm events not yet sealed go in as polls and events; the
dropped and refused counters carry on. The caller removes the old file afterwards.
"""

from __future__ import annotations

from pathlib import Path

import cbor2

from . import wire
from .model import Reading
from .spool import ALARM, DATA, Spool, event_from_blob
from .spool_sqlite import SqliteSpool


def carry_over(legacy: Path, spool: Spool) -> list[str]:
    old = SqliteSpool(legacy, max_bytes=1 << 62)
    try:
        db = old.db
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        for session, blob, started, next_seq, next_alarm in db.execute(
                "SELECT session, catalogue, started_ms, next_seq, next_alarm_seq FROM sessions ORDER BY session"):
            spool.carry_session(session, cbor2.loads(blob), started, {DATA: next_seq, ALARM: next_alarm})
        messages = 0
        for kind, seq, session, payload in db.execute("SELECT kind, seq, session, payload FROM messages ORDER BY id"):
            decoded = cbor2.loads(payload)
            historical = bool(decoded.get(5)) if isinstance(decoded, dict) else False
            count = len(decoded.get(4 if kind == DATA else 15) or ()) if isinstance(decoded, dict) else 0
            spool.carry_message(kind, session, seq, payload, count, historical=historical)
            messages += 1
        readings = 0
        for session, body in db.execute("SELECT session, body FROM readings ORDER BY id"):
            polls = [Reading(p, ts, wire.decode_value(v), q) for p, ts, v, q in cbor2.loads(body)]
            spool.store([(session, polls)], [])
            readings += len(polls)
        events = 0
        for session, blob in db.execute("SELECT session, event FROM events ORDER BY id"):
            spool.store([], [(session, [event_from_blob(blob)])])
            events += 1
        spool.carry_counters(dropped=meta.get("dropped", 0), rejected=meta.get("rejected", 0), session=meta.get("session", 0))
        spool.sync()
    finally:
        old.close()
    return [] if not (messages or readings or events) else [
        f"spool {legacy}: carried {messages} messages, {readings} readings and {events} alarm events over into the "
        f"segment log at {spool.path} (a spool of an earlier release); the old file is removed"]
