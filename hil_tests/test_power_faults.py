"""Power faults (issue 11, the power part): kill -9 of a real gateway and of a node at seeded points, including in
the middle of a spool commit and of a flash write, power cuts, and a flash file cut at a random byte. The plans,
the gateway's trap launcher and the node's runner are in hil_tests/powerfault.py.

Gateway (`test_gateway_killed_at_random_points_loses_nothing_it_stored`): `yujing run` as a real process (through
the trap launcher) polls a simulated Modbus TCP device (4 points every 0.2 s; every read of the device serves new
values, so a value says which read it came from) and publishes to a real mosquitto; the platform is a persistent
consumer session there. The gateway is killed with SIGKILL 8 times, each restart a new process on the same spool
(`power_cut_window_s = 1`): at a random wall time after it published (power.kill9), at the K-th write /
fdatasync / fsync / replace the spool makes, before or after the call (power.kill9_spool), in the middle of a
write, leaving a torn record (power.torn_write), and as a power cut (power.cut: a kill at a random time, then
every segment cut back to what its last fdatasync made durable and the boot id changed). Then a clean run drains
what is left. A kill -9 cannot lose the page cache; the torn write imitates a power cut in the middle of a write,
power.cut the loss of the page cache. Checked, as docs/wire-format.md ("Gaps and duplicates") promises:

- every reading whose `Spool.store` had returned before the kill (the launcher's journal) is delivered, except,
  at a power cut, readings stored after the last fdatasync (its window: they may be lost);
- a torn record is cut off at the next start, exactly its bytes, and said; no delivered reading that the device
  did not serve (nothing torn is read as readings);
- no (session, seq) twice with different bytes; a reading under two seqs only after a power cut took the record
  of its first, published message; a seq gap only within the numbers the spool said it skipped after a power cut
  ("... resume at R, skipping at most N"), N at most 64 (SEQ_BLOCK);
- per point and lane (live, historical), first arrivals of readings are in time order;
- after every restart the gateway publishes a new session's data within RECOVERY_BOUND_S (restart → first data
  message of the new session at the consumer; the start of a Python process is most of it);
- the spool's files stay within its budget (`max_bytes` 1 MiB plus one segment) at every kill.

Node (`test_node_killed_and_flash_cut_boots_and_keeps_its_ring`): the node firmware under the MicroPython unix
port (firmware/host/power_node.py), its flash a real folder, a link that comes and goes by a seeded schedule, is
killed 9 times: at a random wall time (half of them then cut the newest ring slot file at a random byte), in the
middle of a ring slot write, in the middle of a state.json.tmp write. RTC memory dies with the process: every
kill is a power cut for the node. Checked: it boots every time (no crash loop, no unexpected error); every
reading that was on flash (appended to the ring and synced) before the kill is delivered or counted as dropped
(birth key 11: a full ring's oldest block, a block torn in its write); nothing delivered that was not sampled (a
torn block is not read as readings); a data seq is never reused and continues above the node's reservation (gap
at most 64) after each power cut; per point, first deliveries are in time order within each lane.
`test_a_ring_block_torn_in_its_write_is_dropped_and_counted` holds the ring fix this scenario led to.

Figures per fault kind go to the `hil_report` record and test-artifacts/hil/power-faults.json (seed, faults with
times, readings stored / delivered / lost, duplicates flagged or not, seq gaps, recovery per restart p50/max); -s
prints the tables. The seed is YUJING_HIL_SEED (default 20261202); the same seed gives the same plan (the moments
a wall-time kill lands on differ from run to run with the machine's speed; the trapped calls do not).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway import wire
from gateway.sim.devices import SimServer, SimSlave
from gateway.spool import HEAD, MAGIC
from tests.conftest import free_port
from tests.e2e import collecting, register, site

from .powerfault import (
    NODE_EPOCH_MS,
    NODE_PERIOD_MS,
    NODE_POINTS,
    ROOT,
    GatewayFault,
    as_dict,
    cut_power,
    gateway_plan,
    node_command,
    node_plan,
    node_torn,
    provision_node,
    read_journal,
)
from .report import ARTIFACTS, seed

pytestmark = pytest.mark.hil

REPORT = ARTIFACTS / "power-faults.json"
POINTS = 4
INTERVAL_S = 0.2
SEQ_BLOCK = 64  # gateway/spool.py: the numbers a power cut may skip
RECOVERY_BOUND_S = 10.0  # restart → first data message of the new session (measured 0.4-1.9 s on a busy 2-core box)
MAX_BYTES = 1 << 20  # the spool's budget (the least the configuration allows): segments of 128 KiB
SEGMENT = 128 * 1024
WINDOW_S = 1.0  # [spool] power_cut_window_s: what a power cut may take (kill -9 takes nothing)


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "p50": round(statistics.median(values), 3), "max": round(max(values), 3)}


# ---------------------------------------------------------------- gateway


@dataclass
class Arrival:
    mono: float
    session: int
    seq: int
    historical: bool
    readings: list[tuple[int, int, Any]]  # (point, ts, value)
    payload: bytes
    new: bool


@dataclass
class Platform:
    """What the consumer received, stamped on arrival."""

    arrivals: list[Arrival] = field(default_factory=list)
    seen: set[tuple[int, int]] = field(default_factory=set)
    delivered: dict[tuple[int, int], set[Any]] = field(default_factory=lambda: defaultdict(set))

    def feed(self, topic: str, payload: bytes) -> None:
        if wire.parse_topic(topic).kind != "data":
            return
        d = wire.decode_data(payload)
        a = Arrival(time.monotonic(), d.session, d.seq, bool(d.historical),
                    [(r.point, r.ts_ms, r.value) for r in d.readings], payload, (d.session, d.seq) not in self.seen)
        self.seen.add((d.session, d.seq))
        for p, ts, v in a.readings:
            self.delivered[(p, ts)].add(v)
        self.arrivals.append(a)

    def max_session(self) -> int:
        return max((a.session for a in self.arrivals), default=0)

    def first_of_session_after(self, session: int) -> Arrival | None:
        return next((a for a in self.arrivals if a.session > session), None)


@dataclass
class Served:
    """The device: every read serves new values (point i: base + i), remembered."""

    n: int = 0
    values: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))

    def before_read(self, registers: list[int]) -> None:
        self.n += 1
        base = (self.n * 8) % 60_000
        for i in range(POINTS):
            registers[i] = base + i
            self.values[i].add(base + i)


@dataclass
class Run:
    fault: dict[str, Any] | None
    started: float
    session_before: int
    log: Path
    first_data: float | None = None
    killed: float | None = None
    trap: dict[str, Any] | None = None
    spool_bytes: int = 0
    spool_files: int = 0
    exit: int | None = None
    cut: dict[str, int] | None = None  # power.cut: the bytes each segment lost with the page cache
    journal_at_kill: int = 0  # journal lines written before the kill
    segments: dict[str, int] = field(default_factory=dict)  # segment file → size, as the kill left them

    @property
    def recovery_s(self) -> float | None:
        return None if self.first_data is None else round(self.first_data - self.started, 3)


def spool_usage(spool: Path) -> tuple[int, int]:
    files = [p for p in spool.iterdir() if p.is_file()] if spool.exists() else []
    return sum(p.stat().st_size for p in files), len(files)


async def start_gateway(site_file: Path, journal: Path, log: Path,
                        fault: GatewayFault | None) -> asyncio.subprocess.Process:
    args = [sys.executable, "-m", "hil_tests.powerfault", "gateway", str(site_file), str(journal)]
    trap = fault.trap() if fault is not None else None
    if trap is not None:
        args.append(json.dumps(trap))
    with log.open("ab") as f:
        return await asyncio.create_subprocess_exec(*args, cwd=ROOT, stdout=f, stderr=f)


async def until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def one_run(site_file: Path, journal: Path, logs: Path, platform: Platform, fault: GatewayFault | None,
                  i: int, spool: Path) -> Run:
    log = logs / f"gateway-{i:02d}.log"
    run = Run(as_dict(fault) if fault else None, time.monotonic(), platform.max_session(), log)
    proc = await start_gateway(site_file, journal, log, fault)
    session = run.session_before

    def published() -> bool:
        a = platform.first_of_session_after(session)
        if a is not None and run.first_data is None:
            run.first_data = a.mono
        return a is not None

    if fault is None or fault.kind in ("power.kill9", "power.cut"):
        await until(published, RECOVERY_BOUND_S + 10)
        if fault is not None:
            await asyncio.sleep(fault.after_s)
            proc.send_signal(signal.SIGKILL)
            run.killed = time.monotonic()
        await until(published, 0)
        rc = await proc.wait()
        run.journal_at_kill = len(read_journal(journal))
        if fault is not None and fault.kind == "power.cut":
            run.cut = cut_power(spool, read_journal(journal))
        return run_end(run, rc, journal, spool)
    # The trap fires in the child; if it has not within after_s the plan asked too much: kill it by hand, say so.
    try:
        await asyncio.wait_for(_wait_exit(proc, published), fault.after_s)
    except TimeoutError:
        proc.send_signal(signal.SIGKILL)
        run.trap = {"not_reached": True}
    run.killed = time.monotonic()
    rc = await proc.wait()
    run.journal_at_kill = len(read_journal(journal))
    return run_end(run, rc, journal, spool)


async def _wait_exit(proc: asyncio.subprocess.Process, published: Any) -> None:
    while proc.returncode is None:
        published()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 0.02)
    published()


def run_end(run: Run, rc: int, journal: Path, spool: Path) -> Run:
    run.exit = rc
    boots = [i for i, e in enumerate(read_journal(journal)) if e["e"] == "boot"]
    traps = [e for e in read_journal(journal)[boots[-1]:] if e["e"] == "trap"] if boots else []
    if traps:
        run.trap = {k: v for k, v in traps[-1].items() if k != "e"}
        name = run.trap.get("file", "")
        if run.trap.get("mode") == "torn" and name.startswith("seg-") and (spool / name).is_file():
            evidence = run.log.with_suffix(".torn-segment")  # the segment as the kill left it
            shutil.copy(spool / run.trap["file"], evidence)
            run.trap["tail"] = torn_tail(evidence.read_bytes())
    run.spool_bytes, run.spool_files = spool_usage(spool)
    run.segments = {p.name: p.stat().st_size for p in spool.glob("seg-*.log")}
    return run


@dataclass
class Cut:
    """A power cut as the analysis sees it: when, the session it cut, the last fdatasync before it, and the readings
    stored after that sync (the window the page cache took: they may be lost, or re-sent under a new seq if their
    message had gone out)."""

    at: float
    session: int
    synced_at: float
    window: set[tuple[int, int]]


def power_cuts(runs: list[Run], journal: list[dict[str, Any]], platform: Platform) -> list[Cut]:
    cuts = []
    for r in runs:
        if r.cut is None or r.killed is None:
            continue
        before = journal[: r.journal_at_kill]
        last_sync = max((i for i, e in enumerate(before) if e["e"] == "synced"), default=-1)
        window = {(p, ts) for e in before[last_sync + 1 :] if e["e"] == "stored" for p, ts, _ in e["r"]}
        first = platform.first_of_session_after(r.session_before)
        synced_at = before[last_sync]["t"] if last_sync >= 0 else 0.0
        cuts.append(Cut(r.killed, first.session if first else 0, synced_at, window))
    return cuts


def torn_tail(data: bytes) -> int:
    """Bytes after the last whole record (magic, type, length, CRC: gateway/spool.py's format, walked here on its
    own). A torn write of several records cut at a boundary between two leaves none."""
    off = 0
    while off + HEAD.size <= len(data):
        magic, _, length, crc = HEAD.unpack_from(data, off)
        end = off + HEAD.size + length
        if magic != MAGIC or end > len(data):
            break
        if zlib.crc32(data[off + HEAD.size : end], zlib.crc32(data[off + 1 : off + 6])) != crc:
            break
        off = end
    return len(data) - off


SKIP_NOTE = re.compile(r"data sequence numbers of session (\d+) resume at (\d+), skipping at most (\d+)")


def analyse_gateway(platform: Platform, journal: list[dict[str, Any]], served: Served, cuts: list[Cut],
                    skips: list[tuple[int, int, int]]) -> dict[str, Any]:
    stored: dict[tuple[int, int], Any] = {}
    for e in journal:
        if e["e"] == "stored":
            for p, ts, v in e["r"]:
                stored[(p, ts)] = v
    at_risk = set().union(*(c.window for c in cuts))
    lost_all = set(stored) - set(platform.delivered)
    lost = sorted(lost_all - at_risk)
    wrong = sorted((k, sorted(vs)) for k, vs in platform.delivered.items()
                   if len(vs) > 1 or next(iter(vs)) not in served.values[k[0]] or (k in stored and stored[k] not in vs))
    by_seq: dict[tuple[int, int], list[Arrival]] = defaultdict(list)
    for a in platform.arrivals:
        by_seq[(a.session, a.seq)].append(a)
    # After a power cut the spool resumes every session with numbers reserved ahead at its reservation and says so
    # ("data sequence numbers of session S resume at R, skipping at most N"): a gap must lie in such a range.
    skipped: set[tuple[int, int]] = set()
    for session, resume, most in skips:
        skipped |= {(session, q) for q in range(resume - most, resume)}
    gaps = []
    for session in sorted({s for s, _ in by_seq}):
        seqs = {q for s, q in by_seq if s == session}
        gaps += [(session, q) for q in sorted(set(range(1, max(seqs) + 1)) - seqs)]
    gaps_unexplained = [g for g in gaps if g not in skipped]
    differing = sorted(k for k, v in by_seq.items() if len({a.payload for a in v}) > 1)
    first_seen: dict[tuple[int, int], tuple[float, tuple[int, int]]] = {}
    two_seqs, explained = [], 0
    for a in platform.arrivals:
        for p, ts, _ in a.readings:
            k = (p, ts)
            if k not in first_seen:
                first_seen[k] = (a.mono, (a.session, a.seq))
            elif first_seen[k][1] != (a.session, a.seq) and k not in two_seqs:
                two_seqs.append(k)
                # Allowed once a power cut fell between the two, the first message having gone out after the last
                # fdatasync before it (its record was in the page cache the cut took).
                t0 = first_seen[k][0]
                explained += any(c.synced_at < t0 < c.at < a.mono for c in cuts)
    last: dict[tuple[bool, int], int] = {}
    disorder = []
    seen: set[tuple[int, int]] = set()
    for a in platform.arrivals:
        for p, ts, _ in a.readings:
            if (p, ts) in seen:
                continue  # a repeat (flagged, or re-sent after a power cut): its first arrival was checked
            seen.add((p, ts))
            key = (a.historical, p)
            if key in last and ts <= last[key]:
                disorder.append({"session": a.session, "seq": a.seq, "point": p, "ts": ts, "after": last[key]})
            last[key] = max(ts, last.get(key, ts))
    return {
        "readings_polled": sum(len(v) for v in served.values.values()),
        "readings_stored": len(stored),
        "readings_delivered": len(platform.delivered),
        "lost": len(lost),  # stored before the last fdatasync (or with no power cut at all) and never delivered
        "lost_sample": lost[:10],
        "lost_in_power_cut_window": len(lost_all & at_risk),
        "power_cut_window_readings": len(at_risk),
        "wrong_values": len(wrong),
        "wrong_sample": wrong[:10],
        "messages": len(platform.arrivals),
        "seqs": len(by_seq),
        "duplicates_flagged": sum(len(v) - 1 for v in by_seq.values()),
        "duplicates_not_identical": differing[:10],
        "duplicates_unflagged": len(two_seqs),  # a reading under two seqs
        "duplicates_unflagged_after_power_cut": explained,
        "duplicates_unflagged_sample": two_seqs[:10],
        "seq_gaps": len(gaps),
        "seq_gaps_unexplained": len(gaps_unexplained),
        "seq_skips_announced": len(skips),
        "seq_skip_max": max((m for _, _, m in skips), default=0),
        "seq_gaps_sample": gaps[:10],
        "out_of_order": len(disorder),
        "out_of_order_sample": disorder[:10],
        "sessions": len({s for s, _ in by_seq}),
    }


@pytest.mark.needs("simulated_devices", "gateway_kill")
async def test_gateway_killed_at_random_points_loses_nothing_it_stored(private_mosquitto, tmp_path: Path,
                                                                     hil_report) -> None:
    s = seed()
    hil_report.seed = s
    plan = gateway_plan(s)
    print(f"\nYUJING_HIL_SEED={s}")
    served = Served()
    slave = SimSlave(1, before_read=served.before_read)
    modbus = free_port()
    server = SimServer([slave], tcp=("127.0.0.1", modbus))
    await server.start()
    body = (f'max_bytes = {MAX_BYTES}\npower_cut_window_s = {WINDOW_S}\n\n'
            f'[[buses]]\nname = "plc"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {modbus}\n\n'
            f'[[devices]]\nname = "d"\nbus = "plc"\nunit = 1\ninterval_s = {INTERVAL_S}\n'
            + "".join(f'  [[devices.points]]\n  name = "p{i}"\n  address = {i}\n' for i in range(POINTS)))
    site(private_mosquitto.port, tmp_path, body)
    site_file, spool, journal = tmp_path / "site.toml", tmp_path / "spool", tmp_path / "journal.jsonl"
    logs = tmp_path / "logs"
    logs.mkdir()
    platform = Platform()
    runs: list[Run] = []
    t0 = time.monotonic()
    await register(private_mosquitto.port, "platform")
    try:
        async with collecting(private_mosquitto.port, client_id="platform") as col:
            feed = col.decoder.feed

            def stamped(topic: str, payload: bytes) -> Any:
                platform.feed(topic, payload)
                return feed(topic, payload)

            col.decoder.feed = stamped  # type: ignore[method-assign]
            for i, fault in enumerate(plan):
                run = await one_run(site_file, journal, logs, platform, fault, i, spool)
                runs.append(run)
                detail = {k: v for k, v in as_dict(fault).items() if k != "kind"}
                hil_report.fault(fault.kind, round((run.killed or time.monotonic()) - hil_report.started, 3), **detail,
                                 trap=run.trap,
                                 recovery_s=run.recovery_s)
            final = await start_gateway(site_file, journal, logs / "gateway-final.log", None)
            last = Run(None, time.monotonic(), platform.max_session(), logs / "gateway-final.log")
            # what a power cut may have taken is not waited for (analyse_gateway tells it apart)
            windows = set().union(*(c.window for c in power_cuts(runs, read_journal(journal), platform)))

            def drained() -> bool:
                a = platform.first_of_session_after(last.session_before)
                if a is not None and last.first_data is None:
                    last.first_data = a.mono
                stored = {(p, ts) for e in read_journal(journal) if e["e"] == "stored" for p, ts, _ in e["r"]}
                return a is not None and stored - windows <= set(platform.delivered)

            await until(drained, 30)
            final.send_signal(signal.SIGTERM)
            last.exit = await asyncio.wait_for(final.wait(), 15)
            await asyncio.sleep(0.3)  # the last messages of the clean stop
            last.spool_bytes, last.spool_files = spool_usage(spool)
            runs.append(last)
    finally:
        await server.stop()
    entries = read_journal(journal)
    skips = [tuple(map(int, m)) for r in runs for m in SKIP_NOTE.findall(r.log.read_text())]
    # kill -9 keeps the page cache: the spool must resume exactly, never skip, until a power cut came
    first_cut = next((i for i, r in enumerate(runs) if r.cut is not None), len(runs))
    early_skips = [m for r in runs[: first_cut + 1] for m in SKIP_NOTE.findall(r.log.read_text())]
    figures = analyse_gateway(platform, entries, served, power_cuts(runs, entries, platform), skips)
    recovery = [r.recovery_s for r in runs if r.recovery_s is not None]
    figures["recovery_s"] = percentiles(recovery)
    figures["restarts_killed_before_publishing"] = sum(1 for r in runs[:-1] if r.first_data is None)
    # A torn write leaves a partial record at the end of the log: the next start must cut exactly those bytes off
    # (fewer: a torn record read as one; more: whole records thrown away) and say so. A write of several records
    # cut at a boundary between two leaves no partial record, and nothing must be said.
    torn = [r for r in runs if r.trap and "tail" in r.trap]
    figures["torn_writes"] = len(torn)  # of a segment
    figures["torn_writes_state_tmp"] = sum(1 for r in runs if r.trap and r.trap.get("mode") == "torn" and r not in torn)
    figures["torn_tails"] = sum(1 for r in torn if r.trap["tail"])
    figures["torn_tails_cut_exactly"] = 0
    figures["torn_notes_wrong"] = 0
    for r, after in itertools.pairwise(runs):
        if r in torn:
            text = after.log.read_text()
            notes = re.findall(r"incomplete record \((\d+) bytes", text)
            figures["torn_notes_wrong"] += bool(notes) and notes != [str(r.trap["tail"])]
            if not r.trap["tail"]:
                continue
            if notes == [str(r.trap["tail"])]:
                figures["torn_tails_cut_exactly"] += 1
            elif "yujing.gateway: site" not in text:
                # killed while its spool opened: after the cut, before the note reached the log; the segment must
                # then be exactly the torn one less its tail (the trap fired before anything new was written)
                name = r.trap["file"]
                figures["torn_tails_cut_exactly"] += after.segments.get(name) == r.segments[name] - r.trap["tail"]
    figures["spool_bytes_max"] = max(r.spool_bytes for r in runs)
    figures["spool_files_max"] = max(r.spool_files for r in runs)
    figures["duration_s"] = round(time.monotonic() - t0, 2)
    figures["by_kind"] = gateway_by_kind(runs, entries, platform)
    figures["seq_skips_before_any_power_cut"] = len(early_skips)
    hil_report.figures["gateway"] = figures
    for r in runs:
        hil_report.log(r.log.stem, r.log)
    write_report("gateway", {"seed": s, "plan": [as_dict(f) for f in plan],
                             "runs": [{"fault": r.fault, "trap": r.trap, "recovery_s": r.recovery_s, "exit": r.exit,
                                       "killed_s": None if r.killed is None else round(r.killed - t0, 3),
                                       "spool_bytes": r.spool_bytes, "spool_files": r.spool_files,
                                       "power_cut_bytes_lost": r.cut} for r in runs],
                             "figures": figures})
    print(gateway_table(s, figures))
    assert all(r.exit == -signal.SIGKILL for r in runs[:-1]), [r.exit for r in runs]
    assert not any(k["traps_not_reached"] for k in figures["by_kind"].values()), "a trap the plan set never fired"
    assert figures["torn_tails_cut_exactly"] == figures["torn_tails"], "a torn record not cut off exactly (see logs)"
    assert figures["torn_notes_wrong"] == 0, "a torn tail reported that the segment did not have (see logs)"
    assert last.exit == 0, f"the final run did not stop cleanly: {last.exit} (see {last.log})"
    assert figures["lost"] == 0, f"{figures['lost']} stored readings never delivered, e.g. {figures['lost_sample']}"
    assert figures["wrong_values"] == 0, f"readings the device did not serve: {figures['wrong_sample']}"
    assert not figures["duplicates_not_identical"], f"seq repeated, other bytes: {figures['duplicates_not_identical']}"
    assert figures["duplicates_unflagged"] == figures["duplicates_unflagged_after_power_cut"], \
        f"readings under two seqs with no power cut to explain it: {figures['duplicates_unflagged_sample']}"
    assert not early_skips, f"the spool skipped numbers after a kill -9 (no power cut yet): {early_skips}"
    assert figures["seq_skip_max"] <= SEQ_BLOCK, f"a power cut skipped {figures['seq_skip_max']} numbers"
    assert figures["seq_gaps_unexplained"] == 0, f"gaps beyond a power cut's reservation: {figures['seq_gaps_sample']}"
    assert figures["out_of_order"] == 0, f"out of order: {figures['out_of_order_sample']}"
    slow = [(i, r.recovery_s) for i, r in enumerate(runs)
            if r.recovery_s is not None and r.recovery_s > RECOVERY_BOUND_S]
    assert not slow, f"restart → first data message over {RECOVERY_BOUND_S} s: {slow}"
    assert last.first_data is not None, "the final run never published"
    assert figures["spool_bytes_max"] <= MAX_BYTES + SEGMENT, figures["spool_bytes_max"]


def gateway_by_kind(runs: list[Run], journal: list[dict[str, Any]], platform: Platform) -> dict[str, Any]:
    """Per fault kind: the readings stored by the runs it killed and how many of them were delivered; what the
    restart after it showed: seconds to the first data message, repeated seqs (flagged duplicates: a PUBACK the
    kill took), readings re-sent under a new seq (unflagged)."""
    boots = [i for i, e in enumerate(journal) if e["e"] == "boot"] + [len(journal)]
    first: dict[tuple[int, int], tuple[int, int]] = {}
    out: dict[str, Any] = {}
    for i, r in enumerate(runs[:-1]):
        k = out.setdefault(r.fault["kind"], {"count": 0, "killed_before_publishing": 0, "traps_not_reached": 0,
                                             "stored": 0, "delivered": 0, "lost": 0, "recovery_s": [],
                                             "duplicates_flagged": 0, "duplicates_unflagged": 0})
        k["count"] += 1
        k["killed_before_publishing"] += r.first_data is None
        k["traps_not_reached"] += bool(r.trap and r.trap.get("not_reached"))
        stored = {(p, ts) for e in journal[boots[i] : boots[i + 1]] if e["e"] == "stored" for p, ts, _ in e["r"]}
        k["stored"] += len(stored)
        k["delivered"] += len(stored & set(platform.delivered))
        k["lost"] += len(stored - set(platform.delivered))
        after = runs[i + 1]
        k["recovery_s"].append(after.recovery_s)
        until_ = runs[i + 2].started if i + 2 < len(runs) else float("inf")
        for a in platform.arrivals:
            if after.started <= a.mono < until_:
                k["duplicates_flagged"] += not a.new
                k["duplicates_unflagged"] += a.new and any(first.get((p, ts), (a.session, a.seq)) != (a.session, a.seq)
                                                           for p, ts, _ in a.readings)
            for p, ts, _ in a.readings:
                first.setdefault((p, ts), (a.session, a.seq))
    for k in out.values():
        k["recovery"] = percentiles([x for x in k["recovery_s"] if x is not None])
    return out


def gateway_table(s: int, f: dict[str, Any]) -> str:
    rows = [f"HIL power faults (gateway), seed {s}",
            (f"{'fault':<18} {'n':>2} {'stored':>6} {'lost':>4} {'dup':>4} {'dup!':>4}  recovery s after it "
             "(restart → first data of the new session)")]
    for kind, k in f["by_kind"].items():
        rec = ", ".join("-" if r is None else f"{r:.2f}" for r in k["recovery_s"])
        rows.append(f"{kind:<18} {k['count']:>2} {k['stored']:>6} {k['lost']:>4} {k['duplicates_flagged']:>4} "
                    f"{k['duplicates_unflagged']:>4}  {rec}")
    rec = f["recovery_s"] or {}
    rows.append(f"readings polled {f['readings_polled']}, stored {f['readings_stored']}, delivered "
                f"{f['readings_delivered']}, lost {f['lost']}, wrong {f['wrong_values']}; messages {f['messages']} "
                f"({f['duplicates_flagged']} flagged duplicates, {f['duplicates_unflagged']} unflagged), seq gaps "
                f"{f['seq_gaps']}; power cut windows {f['power_cut_window_readings']} readings, "
                f"{f['lost_in_power_cut_window']} of them lost; out of order {f['out_of_order']}; recovery p50 "
                f"{rec.get('p50')} s max "
                f"{rec.get('max')} s; spool ≤ {f['spool_bytes_max']} B in {f['spool_files_max']} files")
    return "\n".join(rows)


def write_report(part: str, data: dict[str, Any]) -> None:
    """power-faults.json holds both parts (gateway, node) of the latest run of each."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        report = json.loads(REPORT.read_text())
    except (OSError, ValueError):
        report = {}
    report[part] = data
    REPORT.write_text(json.dumps(report, indent=2, default=str))


# ---------------------------------------------------------------- node

SEQ_RESERVE = 64  # firmware/yujing_node/state.py: the largest gap a power cut may leave


@dataclass
class NodeRun:
    fault: dict[str, Any] | None
    lines: list[str]
    exit: int | None
    wall_s: float  # process start → its end (killed or done)
    boot_s: float | None  # process start → BOOT
    first_data_s: float | None  # process start → the first data PUBLISH at the broker
    torn: list[int] = field(default_factory=list)  # ts of the cycles in a block a write tore or the test cut
    torn_counted: bool = True  # its header (8 bytes) survived: the ring can tell which block it was and count it
    cut: dict[str, Any] | None = None
    state_after: str = ""  # state.json as the kill left it


def run_node(flash: Path, run: dict[str, Any], out: Path, *, kill_after: float | None, kill_on_torn: bool,
             timeout: float = 10.0) -> tuple[int, float, float | None, float | None]:
    """One process of the node, its stdout into `out`; killed with SIGKILL after `kill_after` s or when the trap
    tore a write. Returns (exit status, seconds it ran, seconds to BOOT, seconds to the first data message)."""
    began = time.monotonic()
    boot = first = None
    with out.open("wb") as f:
        proc = subprocess.Popen(node_command(flash, run), stdout=f, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = began + (kill_after if kill_after is not None else timeout)
    while proc.poll() is None:
        now = time.monotonic()
        text = out.read_text(errors="replace")
        if boot is None and "BOOT " in text:
            boot = now - began
        if first is None and "/data " in text:
            first = now - began
        if now >= deadline or (kill_on_torn and ("\nTORN " in text or text.startswith("TORN "))):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    rc = proc.wait()
    return rc, time.monotonic() - began, boot, first


def block_cycles(lines: list[str], slot: int | None = None) -> tuple[int | None, list[int]]:
    """The slot and cycles (ts) of the last ring write begun in `lines` (of `slot`, if given)."""
    for line in reversed(lines):
        if line.startswith("w "):
            parts = line.split()
            if slot is None or int(parts[1]) == slot:
                return int(parts[1]), [int(t) for t in parts[3:]]
    return None, []


def analyse_node(runs: list[NodeRun]) -> dict[str, Any]:
    sampled: dict[int, int] = {}  # cycle ts → the ADC's raw value
    durable: set[int] = set()  # cycles on flash (appended to the ring, then synced) before the process ended
    torn: set[int] = set()
    uncountable: set[int] = set()  # cycles of torn blocks whose header went too
    arrivals: list[tuple[int, int, bool, list[tuple[int, int, Any]]]] = []  # run, seq, historical, readings
    boots: list[dict[str, int]] = []
    crashes = 0
    for i, r in enumerate(runs):
        pending: list[int] = []
        for line in r.lines:
            word, _, rest = line.partition(" ")
            if word == "S":
                ts, raw = rest.split()
                sampled[int(ts)] = int(raw)
            elif word == "A":
                pending.append(int(rest))
            elif word == "Y":
                durable.update(pending)
                pending = []
            elif word == "BOOT":
                session, seq, dropped = map(int, rest.split())
                boots.append({"run": i, "session": session, "seq": seq, "dropped": dropped})
            elif word == "PUB" and "/data " in line:
                d = wire.decode_data(bytes.fromhex(rest.split()[1]))
                arrivals.append((i, d.seq, bool(d.historical), [(x.point, x.ts_ms, x.value) for x in d.readings]))
            elif "unexpected error" in line:
                crashes += 1
        torn.update(r.torn)
        if not r.torn_counted:
            uncountable.update(r.torn)
    delivered: dict[tuple[int, int], int] = defaultdict(int)
    wrong = []
    for _, seq, _, readings in arrivals:
        for p, ts, v in readings:
            delivered[(p, ts)] += 1
            crack = Decimal(sampled[ts]) * Decimal("0.01") - Decimal("2.5") if ts in sampled else None  # fixtures.py
            if ts not in sampled or p >= NODE_POINTS or (p == 0 and v != crack):
                wrong.append((seq, p, ts, str(v)))
    want = {(p, ts) for ts in durable for p in range(NODE_POINTS)}
    lost = want - set(delivered)
    lost_torn = {k for k in lost if k[1] in torn}
    seqs = [seq for _, seq, _, _ in arrivals]
    backwards = [(a, b) for a, b in itertools.pairwise(seqs) if b <= a]
    restart_gaps = []
    for i in range(1, len(runs)):
        before = [seq for run, seq, _, _ in arrivals if run < i]
        after = [seq for run, seq, _, _ in arrivals if run == i]
        if before and after:
            restart_gaps.append(after[0] - max(before) - 1)
    first: set[tuple[int, int]] = set()
    last: dict[tuple[bool, int], int] = {}
    disorder = []
    for _, seq, hist, readings in arrivals:
        for p, ts, _ in readings:
            if (p, ts) in first:
                continue
            first.add((p, ts))
            if ts <= last.get((hist, p), -1):
                disorder.append((seq, hist, p, ts))
            last[(hist, p)] = ts
    return {
        "cycles_sampled": len(sampled),
        "readings_sampled": len(sampled) * NODE_POINTS,
        "readings_on_flash": len(want),
        "readings_delivered": len(delivered),
        "lost_from_flash": len(lost - lost_torn),
        "lost_sample": sorted(lost - lost_torn)[:10],
        "lost_with_a_torn_block": len(lost_torn),
        "lost_with_a_torn_header": len({k for k in lost_torn if k[1] in uncountable}),
        "torn_block_readings": len(torn) * NODE_POINTS,
        "lost_not_on_flash": len({(p, ts) for ts in sampled for p in range(NODE_POINTS)} - want - set(delivered)),
        "wrong": len(wrong),
        "wrong_sample": wrong[:10],
        "messages": len(arrivals),
        "duplicates_unflagged": sum(n - 1 for n in delivered.values()),  # allowed for a node: re-sent historical
        "seq_reused_or_backwards": backwards[:10],
        "restart_seq_gaps": restart_gaps,
        "out_of_order": len(disorder),
        "out_of_order_sample": disorder[:10],
        "boots": boots,
        "crashes": crashes,
        # the ring's dropped count (birth key 11) at the end of the final run: cumulative, kept in state.json
        "dropped_reported": next((int(x.split()[4]) for x in reversed(runs[-1].lines) if x.startswith("END ")), None),
    }


@pytest.mark.needs("simulated_devices", "nodes", "node_kill", "node_flash_cut")
def test_node_killed_and_flash_cut_boots_and_keeps_its_ring(tmp_path: Path, hil_report) -> None:
    s = seed()
    hil_report.seed = s
    plan = node_plan(s)
    flash = tmp_path / "flash"
    provision_node(flash)
    runs: list[NodeRun] = []
    t0 = time.monotonic()
    start_ms = NODE_EPOCH_MS
    for i, fault in enumerate([*plan, None]):
        torn = node_torn(fault) if fault else None
        run = {"start_ms": start_ms, "cycles": None if fault else 40, "link_seed": fault.link_seed if fault else -1,
               "torn": torn}
        out = tmp_path / f"node-{i:02d}.out"
        rc, took, boot, first = run_node(flash, run, out, kill_after=fault.after_s if fault else None,
                                         kill_on_torn=torn is not None)
        text = out.read_text(errors="replace")
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines.pop()  # killed in the middle of printing it
        r = NodeRun(as_dict(fault) if fault else None, lines, rc, round(took, 3), boot, first)
        done = [line for line in lines if line.startswith("W ")]
        begun = [line for line in lines if line.startswith("w ")]
        if len(begun) > len(done):  # killed in a slot write (the trap, or a wall kill that landed there)
            slot, r.torn = block_cycles(lines)
            r.torn_counted = (flash / "ring" / str(slot)).stat().st_size >= 8
        if fault is not None and fault.cut_slot and done:
            slot = int(done[-1].split()[1])
            path = flash / "ring" / str(slot)
            size = path.stat().st_size
            keep = int(size * fault.cut)
            os.truncate(path, keep)
            r.cut = {"slot": slot, "bytes": size, "kept": keep}
            r.torn += block_cycles(lines, slot)[1]
            r.torn_counted = r.torn_counted and keep >= 8
        with contextlib.suppress(OSError):
            r.state_after = (flash / "state.json").read_text(errors="replace")
        runs.append(r)
        stamps = [int(line.split()[1]) for line in lines if line.startswith("S ")]
        start_ms = (max(stamps) if stamps else start_ms) + 3 * NODE_PERIOD_MS
        if fault is not None:
            detail = {k: v for k, v in as_dict(fault).items() if k != "kind"}
            hil_report.fault(fault.kind, round(time.monotonic() - hil_report.started, 3), **detail, cut_file=r.cut,
                             torn_write=next((x for x in lines if x.startswith("TORN ")), None))
        hil_report.log(out.stem, out)
    figures = analyse_node(runs)
    recovery = [r.first_data_s for r in runs if r.first_data_s is not None]
    figures["recovery_s"] = percentiles(recovery)  # process start → first data message (virtual time runs fast)
    figures["boot_s"] = percentiles([r.boot_s for r in runs if r.boot_s is not None])
    figures["killed_before_boot"] = sum(1 for r in runs[:-1] if r.boot_s is None)
    figures["duration_s"] = round(time.monotonic() - t0, 2)
    by_kind: dict[str, Any] = {}
    for i, r in enumerate(runs[:-1]):
        k = by_kind.setdefault(r.fault["kind"], {"count": 0, "killed_before_boot": 0, "torn_blocks": 0,
                                                 "files_cut": 0, "recovery_s": []})
        k["count"] += 1
        k["killed_before_boot"] += r.boot_s is None
        k["torn_blocks"] += bool(r.torn)
        k["files_cut"] += r.cut is not None
        k["recovery_s"].append(runs[i + 1].first_data_s)  # the restart after it: process start → first data
    for k in by_kind.values():
        k["recovery"] = percentiles([x for x in k["recovery_s"] if x is not None])
    figures["by_kind"] = by_kind
    hil_report.figures["node"] = {k: v for k, v in figures.items() if k != "boots"}
    write_report("node", {"seed": s, "plan": [as_dict(f) for f in plan],
                          "runs": [{"fault": r.fault, "exit": r.exit, "wall_s": r.wall_s, "boot_s": r.boot_s,
                                    "first_data_s": r.first_data_s, "torn_cycles": r.torn, "cut": r.cut,
                                    "state_after": r.state_after,
                                    "torn_write": next((x for x in r.lines if x.startswith("TORN ")), None)}
                                   for r in runs],
                          "figures": figures})
    print(node_table(s, figures))
    final = runs[-1]
    assert all(r.exit == -signal.SIGKILL for r in runs[:-1]), [r.exit for r in runs]
    assert final.exit == 0 and final.lines and final.lines[-1].startswith("END "), final.lines[-5:]
    assert figures["crashes"] == 0, "an unexpected error in the node (see the node-*.out logs)"
    assert len(figures["boots"]) == len(runs) - figures["killed_before_boot"], "a start that never booted"
    assert int(final.lines[-1].split()[3]) == 0, f"the final run left readings in the ring: {final.lines[-1]}"
    # What was on flash and never came is counted as dropped (birth key 11): the oldest block of a full ring, a
    # block torn in its write (unless its 8-byte header went too: then the ring cannot tell which block it was).
    # dropped may count more (a block re-sent after a restart and overwritten is counted though it came once).
    counted = figures["lost_from_flash"] + figures["lost_with_a_torn_block"] - figures["lost_with_a_torn_header"]
    assert counted <= (figures["dropped_reported"] or 0), \
        f"readings on flash never delivered and not counted as dropped: {figures['lost_sample']}"
    assert figures["wrong"] == 0, f"readings the node never sampled (a torn block read?): {figures['wrong_sample']}"
    assert not figures["seq_reused_or_backwards"], f"a data seq reused: {figures['seq_reused_or_backwards']}"
    assert all(0 <= g <= SEQ_RESERVE for g in figures["restart_seq_gaps"]), figures["restart_seq_gaps"]
    assert figures["out_of_order"] == 0, f"out of order within a lane: {figures['out_of_order_sample']}"


def node_table(s: int, f: dict[str, Any]) -> str:
    rows = [f"HIL power faults (node), seed {s}",
            f"{'fault':<22} {'n':>2} {'torn blocks':>11} {'files cut':>9}  recovery s after it (p50 / max)"]
    for kind, k in f["by_kind"].items():
        rec = k["recovery"] or {}
        rows.append(f"{kind:<22} {k['count']:>2} {k['torn_blocks']:>11} {k['files_cut']:>9}  "
                    f"{rec.get('p50')} / {rec.get('max')}")
    rec = f["recovery_s"] or {}
    rows.append(f"cycles {f['cycles_sampled']}, readings sampled {f['readings_sampled']}, on flash "
                f"{f['readings_on_flash']}, delivered {f['readings_delivered']}, lost from flash "
                f"{f['lost_from_flash']} (+{f['lost_with_a_torn_block']} "
                f"in torn blocks of {f['torn_block_readings']}), lost before flash {f['lost_not_on_flash']}, wrong "
                f"{f['wrong']}; duplicates (re-sent historical, unflagged) {f['duplicates_unflagged']}; seq gaps at "
                f"restart {f['restart_seq_gaps']}; out of order {f['out_of_order']}; dropped (birth) "
                f"{f['dropped_reported']}; recovery p50 {rec.get('p50')} s max {rec.get('max')} s")
    return "\n".join(rows)


TORN_RING = """
import os, sys
sys.path.append(sys.argv[1])
from yujing_node.records import INT, Batch
from yujing_node.ring import Ring
path, keep = sys.argv[2], int(sys.argv[3])
r = Ring(path, 4, 112)  # 5 readings a block
b = Batch(1)
for v in range(8):  # block 1 full, block 2 holds 3 (synced: "sync": "cycle" rewrites it every cycle)
    b.clear()
    b.add(0, 1000 + v, INT, 0, v)
    r.append(b.record(0))
r.sync()
with open(path + "/2", "rb") as f:
    data = f.read()
with open(path + "/2", "wb") as f:  # the next rewrite of block 2, torn after `keep` bytes
    f.write(data[:keep])
r = Ring(path, 4, 112)  # power back: RAM and RTC memory are gone
r.restore(1, 2)  # the cursor on flash: two readings of block 1 sent
print(r.pending(), r.dropped)
"""


@pytest.mark.parametrize("keep", [0, 5, 8, 20, 30])
def test_a_ring_block_torn_in_its_write_is_dropped_and_counted(tmp_path: Path, keep: int) -> None:
    """The newest block, rewritten each cycle with "sync": "cycle", torn in that write (on a filesystem whose
    rewrite is not atomic, as LittleFS's is): its 3 readings were on flash and are lost. They used to go silently
    (dropped 0); now the ring counts them when the block's 8-byte header survived."""
    from provisioning.simboard import micropython_executable

    script = tmp_path / "torn.py"
    script.write_text(TORN_RING)
    args = [micropython_executable(), str(script), str(ROOT / "firmware"), str(tmp_path / "ring"), str(keep)]
    out = subprocess.run(args, check=False, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    pending, dropped = map(int, out.stdout.split())
    assert pending == 3, out.stdout  # block 1's other three; nothing of the torn block is read as readings
    assert dropped == (3 if keep >= 8 else 0), out.stdout


def test_the_plans_are_a_function_of_the_seed() -> None:
    assert gateway_plan(7) == gateway_plan(7) and node_plan(7) == node_plan(7)
    assert gateway_plan(7) != gateway_plan(8) and node_plan(7) != node_plan(8)
    for s in (seed(), 1, 99):
        kinds = {"power.kill9", "power.kill9_spool", "power.torn_write", "power.cut"}
        assert {f.kind for f in gateway_plan(s)} == kinds
        assert {f.kind for f in node_plan(s)} == {"power.node_kill9", "power.node_torn_slot", "power.node_torn_state"}
