"""The durable spool: ordered sealing, resend until acknowledged, counters across restarts, budget, kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
import pytest

from gateway import wire
from gateway.model import PointInfo, Quality, Reading
from gateway.spool import Spool, SpoolError

T = 1_764_390_000_000
CAT = [PointInfo("d", "p", "", "uint16")]


def test_seal_deliver_and_resend(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.db")
    session = s.start_session(CAT, T)
    for i in range(10):
        s.append(session, [Reading(0, T + i, i)])
    m1 = s.seal(4, now_ms=T, historical_after_ms=60_000)
    m2 = s.seal(4, now_ms=T, historical_after_ms=60_000)
    assert (m1.seq, m2.seq) == (1, 2)
    assert [r.value for r in wire.decode_data(m1.payload).readings] == [0, 1, 2, 3]
    assert s.backlog() == 2
    s.delivered(m1.id)
    assert [m.seq for m in s.unsent()] == [2]  # not acknowledged: sent again, same bytes
    assert s.unsent()[0].payload == m2.payload


def test_a_poll_is_never_split_across_messages(tmp_path: Path) -> None:
    """A poll larger than a message goes whole, on its own: nothing half-sealed has to survive a restart."""
    s = Spool(tmp_path / "s.db")
    session = s.start_session(CAT, T)
    s.append(session, [Reading(0, T, 0)])
    s.append(session, [Reading(0, T + 1, i) for i in range(10)])
    first = s.seal(4, now_ms=T, historical_after_ms=60_000)
    second = s.seal(4, now_ms=T, historical_after_ms=60_000)
    assert [r.value for r in wire.decode_data(first.payload).readings] == [0]
    assert [r.value for r in wire.decode_data(second.payload).readings] == list(range(10))
    assert s.backlog() == 0


def test_counters_survive_restart_and_never_reuse(tmp_path: Path) -> None:
    # Each session numbers its messages from 1; a (session, seq) pair is never issued twice, also across restarts.
    s = Spool(tmp_path / "s.db")
    assert s.start_session(CAT, T) == 1
    s.append(1, [Reading(0, T, 1)])
    m = s.seal(10, now_ms=T, historical_after_ms=1)
    assert (m.session, m.seq) == (1, 1)
    s.delivered(m.id)
    s.append(1, [Reading(0, T + 1, 2)])  # still waiting when the gateway stops
    s.close()
    s = Spool(tmp_path / "s.db")
    assert s.start_session(CAT, T) == 2
    s.append(2, [Reading(0, T + 2, 3)])
    old = s.seal(10, now_ms=T, historical_after_ms=1)
    new = s.seal(10, now_ms=T, historical_after_ms=1)
    assert (old.session, old.seq) == (1, 2)  # session 1 carries on where it stopped
    assert (new.session, new.seq) == (2, 1)


def test_old_session_readings_seal_under_their_own_session(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.db")
    s.start_session(CAT, T)
    s.append(1, [Reading(0, T, 1)])
    s.start_session(CAT + [PointInfo("d", "q", "", "int16")], T + 10)
    s.append(2, [Reading(1, T + 10, 2)])
    assert s.pending_sessions() == [1, 2]
    first = wire.decode_data(s.seal(10, now_ms=T + 10, historical_after_ms=60_000).payload)
    second = wire.decode_data(s.seal(10, now_ms=T + 10, historical_after_ms=60_000).payload)
    assert (first.session, [r.point for r in first.readings]) == (1, [0])
    assert (second.session, [r.point for r in second.readings]) == (2, [1])
    assert s.catalogue(1)[0] == tuple(CAT)


def test_stale_readings_are_flagged_historical(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.db")
    s.start_session(CAT, T)
    s.append(1, [Reading(0, T, 1, Quality.GOOD)])
    assert wire.decode_data(s.seal(10, now_ms=T + 61_000, historical_after_ms=60_000).payload).historical
    s.append(1, [Reading(0, T + 61_000, 1)])
    assert not wire.decode_data(s.seal(10, now_ms=T + 62_000, historical_after_ms=60_000).payload).historical


def test_byte_budget_drops_oldest_routine_readings_and_counts_them(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.db", max_bytes=1024 * 1024)
    s.start_session(CAT, T)
    for i in range(300):  # about 3.6 MB of polls into a 1 MiB budget
        s.append(1, [Reading(0, T + i * 1000 + j, j) for j in range(1000)])
    s.enforce_budget()
    assert s.size_bytes() <= 1024 * 1024
    assert s.dropped > 0
    assert s.backlog() + s.dropped == 300_000
    first = wire.decode_data(s.seal(1000, now_ms=T, historical_after_ms=10**9, live=True).payload)
    oldest = min(r.ts_ms for r in first.readings)
    assert oldest >= T + s.dropped  # the oldest went first: every poll older than the survivors is gone


WRITER = r"""
import sys
from pathlib import Path
from gateway.spool import Spool
from gateway.model import Reading, PointInfo
s = Spool(Path(sys.argv[1]))
session = s.start_session([PointInfo("d", "p", "", "uint16")], 0)
i = 0
while True:
    s.append(session, [Reading(0, i, i)])
    print(session, i, flush=True)  # the poll is acknowledged only once it is committed
    i += 1
    if i % 7 == 0:
        s.seal(5, now_ms=i, historical_after_ms=10**9)
"""


def test_kill_9_loses_nothing_committed_and_corrupts_nothing(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    last_acknowledged: dict[int, int] = {}
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line:
                session, i = map(int, line.split())
                last_acknowledged[session] = i
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(last_acknowledged) == 5
    s = Spool(db)
    assert s.notes == []  # whole records only: a kill leaves nothing torn (the kernel has every write)
    assert s.start_session(CAT, T) == 6  # five killed sessions counted, none reused
    present: dict[int, set[int]] = {}
    messages = s.unsent(limit=10**6)
    for session in {m.session for m in messages}:  # per session: unique, gapless, increasing
        seqs = [m.seq for m in messages if m.session == session]
        assert seqs == list(range(1, len(seqs) + 1))
    for m in messages:
        present.setdefault(m.session, set()).update(r.ts_ms for r in wire.decode_data(m.payload).readings)
    while (m := s.seal(10**6, now_ms=T, historical_after_ms=10**15, live=True)) is not None:  # the unsealed polls
        present.setdefault(m.session, set()).update(r.ts_ms for r in wire.decode_data(m.payload).readings)
    for session, last in last_acknowledged.items():
        assert set(range(last + 1)) <= present[session], f"session {session} lost acknowledged readings"


@pytest.mark.parametrize("read_back", [False, True], ids=["held in memory", "read back from the log after a restart"])
def test_every_value_type_time_and_quality_survives_the_spool(tmp_path: Path, read_back: bool) -> None:
    from decimal import Decimal

    s = Spool(tmp_path / "s.db")
    s.start_session(CAT, T)
    values = [True, False, None, 7, -7, 2**64 - 1, -(2**63), 1.5, 0.1, Decimal("1953.38"), Decimal("32.5")]
    qualities = [0, 1, 0, 0x82, 7, 0, 0, 3, 0, 0, 0x84]
    times = [T - 37 * i for i in range(len(values))]  # a poll's readings need not share a time
    sent = [Reading(i, ts, v, q) for i, (ts, v, q) in enumerate(zip(times, values, qualities, strict=True))]
    s.append(1, sent)
    if read_back:
        s.close()
        s = Spool(tmp_path / "s.db")
    got = sorted(wire.decode_data(s.seal(100, now_ms=T, historical_after_ms=10**6).payload).readings)
    assert [(r.point, r.ts_ms, r.value, int(r.quality)) for r in got] == [(r.point, r.ts_ms, r.value, r.quality) for r in sent]
    assert [type(r.value) for r in got[:3]] == [bool, bool, type(None)]


def test_acknowledged_messages_are_not_resent_even_before_their_delete_commits(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.db")
    s.start_session(CAT, T)
    s.append(1, [Reading(0, T, 1)])
    m = s.seal(10, now_ms=T, historical_after_ms=1)
    s.delivered(m.id)
    assert s.unsent() == []
    s.close()
    assert Spool(tmp_path / "s.db").unsent() == []  # close() commits the pending deletes


def test_a_second_gateway_cannot_share_the_spool(tmp_path: Path) -> None:
    import pytest

    from gateway.spool import SpoolError

    first = Spool(tmp_path / "s.db")
    first.start_session(CAT, T)
    with pytest.raises(SpoolError, match="in use by another process"):
        Spool(tmp_path / "s.db")
    first.close()
    Spool(tmp_path / "s.db").close()


def _event(ts: int, rule: str = "gas.z1", kind: str = "raised") -> wire.Event:
    return wire.Event(kind, rule, 0, 3, ts, {0: 52}, f"{rule} {kind}")


def test_alarm_events_go_first_in_their_own_sequence(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.db")
    s.start_session(CAT, T)
    s.append(1, [Reading(0, T + i, i) for i in range(10)])
    data = s.seal(5, now_ms=T, historical_after_ms=60_000)
    s.append_events(1, [_event(T + 1), _event(T + 2, kind="escalated")])
    alarm = s.seal_alarms(100, now_ms=T + 3, historical_after_ms=60_000)
    assert (data.kind, data.seq, alarm.kind, alarm.seq) == ("data", 1, "alarm", 1)
    assert [m.kind for m in s.unsent()] == ["alarm", "data"]
    decoded = wire.decode_alarm(alarm.payload)
    assert [e.kind for e in decoded.events] == ["raised", "escalated"] and not decoded.historical
    assert s.events_waiting == 0


def test_budget_never_drops_alarm_events(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.db", max_bytes=1024 * 1024)
    s.start_session(CAT, T)
    s.append_events(1, [_event(T + i) for i in range(200)])
    for i in range(300):
        s.append(1, [Reading(0, T + i * 1000 + j, j) for j in range(1000)])
    s.enforce_budget()
    assert s.dropped > 0
    assert s.events_waiting == 200
    assert len(wire.decode_alarm(s.seal_alarms(1000, now_ms=T, historical_after_ms=10**9).payload).events) == 200


def test_live_lane_skips_the_backlog(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.db")
    s.start_session(CAT, T)
    for i in range(100):  # spooled during an outage, one reading a poll
        s.append(1, [Reading(0, T + i, i)])
    s.store([], [], now_ms=T + 10_000_000)  # a minute on, still no uplink: they become the historical backlog
    assert s.mark_backlog() == 100
    s.append(1, [Reading(0, T + 10_000_000, 999)])  # live, after the link came back
    live = wire.decode_data(s.seal(50, now_ms=T + 10_000_000, historical_after_ms=60_000, live=True).payload)
    assert [r.value for r in live.readings] == [999] and not live.historical
    old = wire.decode_data(s.seal(50, now_ms=T + 10_000_000, historical_after_ms=60_000).payload)
    assert [r.value for r in old.readings] == list(range(100)) and old.historical  # many polls, one message
    assert s.seal(50, now_ms=T, historical_after_ms=1, live=True) is None


def test_a_refused_write_is_a_clear_error_and_leaves_no_torn_record(tmp_path: Path) -> None:
    """The file size limit stands in for a full disk here (tests/test_storage_failures.py fills a real one):
    the write that does not fit is refused whole, nothing already stored is lost, and what follows once
    there is room again reads back."""
    import resource

    from gateway.spool import SpoolError

    s = Spool(tmp_path / "s.db")
    s.start_session(CAT, T)
    s.append(1, [Reading(0, T, 1)])
    size = s.size_bytes()
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 300, hard))
    try:
        with pytest.raises(SpoolError, match=rf"spool {tmp_path / 's.db'}: store: "):
            for i in range(100):
                s.append(1, [Reading(0, T + i, i) for _ in range(50)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    s.append(1, [Reading(0, T + 999, 999)])
    s.close()
    s = Spool(tmp_path / "s.db")
    assert s.notes == []
    values = []
    while (m := s.seal(1000, now_ms=T, historical_after_ms=10**9, live=True)) is not None:
        values += [r.value for r in wire.decode_data(m.payload).readings]
    assert values[0] == 1 and values[-1] == 999


def test_alarm_events_are_flagged_historical_one_by_one(tmp_path: Path) -> None:
    """Old and fresh events never share a message, so the historical flag is exact for every event."""
    s = Spool(tmp_path / "s.db")
    s.start_session(CAT, T)
    now = T + 3_600_000
    s.append_events(1, [_event(T), _event(T + 1), _event(now - 1000), _event(now - 500), _event(T + 2)])
    got = []
    while (m := s.seal_alarms(100, now_ms=now, historical_after_ms=60_000)) is not None:
        a = wire.decode_alarm(m.payload)
        got.append((a.historical, [e.ts_ms for e in a.events]))
    assert got == [(True, [T, T + 1]), (False, [now - 1000, now - 500]), (True, [T + 2])]


def test_readings_on_both_sides_of_the_historical_line_go_in_separate_messages(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.db")
    s.start_session(CAT, T)
    now = T + 3_600_000
    s.append(1, [Reading(0, T, 1)])
    s.append(1, [Reading(0, now - 1000, 2)])
    first = wire.decode_data(s.seal(100, now_ms=now, historical_after_ms=60_000).payload)
    second = wire.decode_data(s.seal(100, now_ms=now, historical_after_ms=60_000).payload)
    assert (first.historical, [r.value for r in first.readings]) == (True, [1])
    assert (second.historical, [r.value for r in second.readings]) == (False, [2])


def test_readings_taken_while_the_first_connection_was_made_are_live(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.db")
    s.start_session(CAT, T)
    s.append(1, [Reading(0, T - 120_000, 1)])  # an outage's reading: backlog
    s.store([(1, [Reading(0, T - 500, 2)])], [], now_ms=T)  # polled half a second before the connection came up: live
    assert s.mark_backlog(older_than_ms=T - 60_000) == 1
    live = wire.decode_data(s.seal(100, now_ms=T, historical_after_ms=60_000, live=True).payload)
    assert ([r.value for r in live.readings], live.historical) == ([2], False)
    old = wire.decode_data(s.seal(100, now_ms=T, historical_after_ms=60_000).payload)
    assert ([r.value for r in old.readings], old.historical) == ([1], True)


