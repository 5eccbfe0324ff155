"""A power cut, as the card would be left by one: a writer is killed while its last writes are only in the
page cache, every segment is cut back to the length its last fsync made durable (what was written after it
never reached the card), a torn half-record is left at the end, and the machine "boots again". Then:

- everything the writer saw synced is there: every poll, every alarm event (events are synced at once);
- the spool opens, cuts the torn record off and says so;
- no sequence number a message was published under is ever issued again for other content, and the
  numbers skipped are at most one reserved block (docs/design/spool.md).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import wire
from gateway.model import PointInfo, Reading
from gateway.spool import SEQ_BLOCK, Spool

T = 1_764_390_000_000
CAT = [PointInfo("d", "p", "", "uint16")]

WRITER = r"""
import json, sys, time
from pathlib import Path
from gateway.spool import Spool
from gateway.model import Reading, PointInfo
from gateway import wire

s = Spool(Path(sys.argv[1]), segment_bytes=8192)
session = s.start_session([PointInfo("d", "p", "", "uint16")], 0)
window = float(sys.argv[2])
synced_at = time.monotonic()
i = e = 0
while True:
    s.append(session, [Reading(0, 1_764_390_000_000 + i, i)])
    i += 1
    if i % 3 == 0:  # the uplink seals and publishes
        m = s.seal(10, now_ms=1_764_390_000_000 + i, historical_after_ms=10**9, live=True)
        if m is not None:
            print(json.dumps({"published": m.seq, "session": session}), flush=True)
            if i % 9 == 0:  # the broker acknowledged it: its readings may go from the spool
                s.delivered(m.id)
                print(json.dumps({"acked": [r.value for r in wire.decode_data(m.payload).readings]}), flush=True)
    if i % 40 == 0:  # an alarm event: on the card at once
        s.append_events(session, [wire.Event("raised", "r", 0, 2, 1_764_390_000_000 + i, {0: e}, "r raised")])
        s.sync()
        print(json.dumps({"event": e, "sizes": {n: g.size for n, g in s._segments.items()}, "poll": i - 1}), flush=True)
        synced_at = time.monotonic()
        e += 1
    elif time.monotonic() - synced_at >= window:
        s.sync()
        print(json.dumps({"sizes": {n: g.size for n, g in s._segments.items()}, "poll": i - 1}), flush=True)
        synced_at = time.monotonic()
    time.sleep(0.0005)
"""


def _power_cut(spool: Path, sizes: dict[str, int], rng: random.Random) -> None:
    """Leave the segments as the card holds them: cut back to the last fsync'd length, newer ones gone, and
    a torn record (the write the power interrupted) at the end of the newest."""
    for seg in spool.glob("seg-*.log"):
        no = str(int(seg.name[4:-4]))
        if no not in sizes:
            seg.unlink()
        elif seg.stat().st_size > sizes[no]:
            os.truncate(seg, sizes[no])
    newest = max(spool.glob("seg-*.log"))
    with open(newest, "ab") as f:
        f.write(bytes([0xA7, ord("P")]) + rng.randbytes(23))
    state = json.loads((spool / "state.json").read_text())
    state["boot"] = "the boot before the power cut"
    (spool / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("run", range(3))
def test_a_power_cut_loses_at_most_the_window_and_never_reuses_a_number(tmp_path: Path, run: int) -> None:
    rng = random.Random(run)
    spool = tmp_path / "spool"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(spool), "0.05"], stdout=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout is not None
    published: list[int] = []
    acked: set[int] = set()
    synced: dict = {}
    events_synced = -1
    deadline = time.monotonic() + 0.8 + rng.random()
    os.set_blocking(proc.stdout.fileno(), False)
    buffer = ""
    while time.monotonic() < deadline:
        try:
            buffer += os.read(proc.stdout.fileno(), 65536).decode()
        except BlockingIOError:
            pass
        *lines, buffer = buffer.split("\n")
        for line in lines:
            msg = json.loads(line)
            if "published" in msg:
                published.append(msg["published"])
            if "acked" in msg:
                acked |= set(msg["acked"])
            if "sizes" in msg:
                synced = msg
                if "event" in msg:
                    events_synced = msg["event"]
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert synced and published and events_synced >= 0, "the writer never got going"
    _power_cut(spool, synced["sizes"], rng)

    s = Spool(spool)
    assert any("incomplete record" in n for n in s.notes), s.notes  # the torn write, cut off and said
    assert any("resume at" in n for n in s.notes), s.notes  # the reboot is noticed: numbering jumps
    values: set[int] = set()
    for m in s.unsent(limit=10**6):
        values |= {r.value for r in wire.decode_data(m.payload).readings} if m.kind == "data" else set()
    while (m := s.seal(10**6, now_ms=T, historical_after_ms=10**15, live=True)) is not None:
        values |= {r.value for r in wire.decode_data(m.payload).readings}
        assert m.seq > max(published)  # a number the platform may have seen is never reused
        assert m.seq <= max(published) + SEQ_BLOCK + 1  # the jump is at most one reserved block
    missing = set(range(synced["poll"] + 1)) - values - acked
    assert not missing, f"synced polls lost in the power cut: {sorted(missing)[:10]}"
    alarms = s.seal_alarms(10**6, now_ms=T, historical_after_ms=10**15)
    got_events = [e.values[0] for e in wire.decode_alarm(alarms.payload).events] if alarms else []
    assert set(range(events_synced + 1)) <= set(got_events), (events_synced, got_events)  # never acknowledged: all there
    s.close()
