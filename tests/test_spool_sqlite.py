"""The spool of earlier releases (SQLite, gateway/spool_sqlite.py) is only read now, once, to carry it into the
segment log: its own schema upgrades must still hold (a spool may be two releases old), and the carry-over
keeps every message byte for byte, every unsealed reading and event, and the numbering."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from gateway import wire
from gateway.model import PointInfo, Reading
from gateway.spool import SpoolError
from gateway.spool_sqlite import SqliteSpool
from gateway.storage import Storage

T = 1_764_390_000_000
CAT = [PointInfo("d", "p", "", "uint16")]


def test_a_version_2_spool_gains_the_dead_letter_table_and_keeps_its_messages_and_seqs(tmp_path: Path) -> None:
    """Version 2 (the release before dead letters) is version 3 without that table: an upgrade must not
    run the version-1 steps again (it did: "duplicate column name: next_seq", and the spool stayed shut)."""
    db = tmp_path / "s.db"
    s = SqliteSpool(db)
    session = s.start_session(CAT, T)
    s.append(session, [Reading(0, T, 1), Reading(0, T + 1, 2)])
    sealed = s.seal(10, now_ms=T, historical_after_ms=60_000)
    s.close()
    con = sqlite3.connect(db)
    con.executescript("DROP TABLE dead_letters; PRAGMA user_version = 2;")
    con.close()
    s = SqliteSpool(db)
    assert [m.seq for m in s.unsent()] == [sealed.seq]
    s.append(session, [Reading(0, T + 2, 3)])
    assert s.seal(10, now_ms=T, historical_after_ms=60_000).seq == sealed.seq + 1
    s.rejected(sealed.id, "0x87 not authorised")
    assert s.dead_letters() and s.dead_letters()[0][3] == "0x87 not authorised"
    s.close()
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 3


def test_a_spool_from_a_later_release_is_refused_not_rewritten(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    SqliteSpool(db).close()
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version = 9")
    con.close()
    with pytest.raises(SpoolError, match="newer than this gateway"):
        SqliteSpool(db)
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 9


def test_a_version_1_spool_is_migrated_without_reusing_a_sequence_number(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        CREATE TABLE sessions (session INTEGER PRIMARY KEY, catalogue BLOB NOT NULL, started_ms INTEGER NOT NULL);
        CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, session INTEGER NOT NULL, ts INTEGER NOT NULL, n INTEGER NOT NULL, body BLOB NOT NULL);
        CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, session INTEGER NOT NULL, ts INTEGER NOT NULL, event BLOB NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, seq INTEGER NOT NULL, session INTEGER NOT NULL,
                               payload BLOB NOT NULL, UNIQUE (kind, seq));
        INSERT INTO meta VALUES ('session', 2), ('next_seq', 41), ('next_alarm_seq', 5);
        INSERT INTO sessions VALUES (1, x'80', 0), (2, x'80', 0);
        INSERT INTO messages(kind, seq, session, payload) VALUES ('data', 40, 2, x'00');
    """)
    con.close()
    s = SqliteSpool(db)
    assert s.start_session(CAT, T) == 3
    assert [m.seq for m in s.unsent()] == [40]  # the sealed message survives, to be re-sent
    s.append(2, [Reading(0, T, 1)])
    s.append(3, [Reading(0, T, 2)])
    old = s.seal(10, now_ms=T, historical_after_ms=60_000)
    new = s.seal(10, now_ms=T, historical_after_ms=60_000)
    assert (old.session, old.seq) == (2, 41) and (new.session, new.seq) == (3, 1)


def _event(ts: int) -> wire.Event:
    return wire.Event("raised", "gas.z1", 0, 3, ts, {0: 52}, "gas.z1 raised")


async def test_an_older_release_s_spool_is_carried_into_the_log_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "state" / "spool.db"
    path.parent.mkdir()
    old = SqliteSpool(path)
    session = old.start_session(CAT, T)
    old.append(session, [Reading(0, T, 1), Reading(0, T + 1, 2)])
    sealed = old.seal(10, now_ms=T, historical_after_ms=60_000)  # sealed, never acknowledged: to be re-sent
    old.append(session, [Reading(0, T + 2, 3)])  # not yet sealed
    old.append_events(session, [_event(T + 3)])
    old.close()

    storage = Storage(path, clock_ms=lambda: T + 10)
    storage.bind(asyncio.get_running_loop())
    started = storage.open(CAT, T + 10)
    spool = storage.spool
    assert spool is not None and path.is_dir() and not path.with_name("spool.db.sqlite-old").exists()
    assert started.session == session + 1
    assert any("carried 1 messages, 1 readings and 1 alarm events over" in n for n in started.notes)
    [resend] = spool.unsent()
    assert (resend.payload, resend.seq, resend.session) == (sealed.payload, sealed.seq, session)  # byte for byte
    alarm = spool.seal_alarms(10, now_ms=T + 10, historical_after_ms=60_000)
    assert [e.ts_ms for e in wire.decode_alarm(alarm.payload).events] == [T + 3]
    nxt = spool.seal(10, now_ms=T + 10, historical_after_ms=60_000, live=True)
    assert (nxt.session, nxt.seq, [r.value for r in wire.decode_data(nxt.payload).readings]) == (session, sealed.seq + 1, [3])
    await storage.close()


@pytest.mark.parametrize("layout", ["old default next to the log", "killed half way through a carry-over"])
async def test_an_older_release_s_spool_under_the_old_default_name_or_half_carried_is_carried_over(tmp_path: Path, layout: str) -> None:
    """A site file that never named a path had `state/spool.db`; the new default is `state/spool`. A
    gateway killed while carrying left the old file renamed and a scratch log: the next start begins again."""
    state = tmp_path / "state"
    state.mkdir()
    old = SqliteSpool(state / "spool.db")
    session = old.start_session(CAT, T)
    old.append(session, [Reading(0, T, 7)])
    sealed = old.seal(10, now_ms=T, historical_after_ms=60_000)
    old.close()
    if layout == "killed half way through a carry-over":
        os.replace(state / "spool.db", state / "spool.db.sqlite-old")
        (state / "spool.carrying").mkdir()
        (state / "spool.carrying" / "seg-00000001.log").write_bytes(b"\xa7M half a message")
    storage = Storage(state / "spool", clock_ms=lambda: T + 10)
    storage.bind(asyncio.get_running_loop())
    started = storage.open(CAT, T + 10)
    spool = storage.spool
    assert spool is not None
    [resend] = spool.unsent()
    assert (resend.payload, resend.seq, resend.session) == (sealed.payload, sealed.seq, session)
    assert started.session == session + 1
    assert sorted(p.name for p in state.iterdir() if p.name.startswith("spool")) == ["spool"]
    await storage.close()
