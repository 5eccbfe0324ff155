"""Faults on the RS-485 line (issue 11, the RS-485 part): a seeded, replayable plan against a real gateway.

A real gateway polls two simulated Modbus RTU slaves (pymodbus) over the pty line of hil_tests/linefault.py:
unit 1 ("radar", the victim: every frame fault hits its replies) and unit 2 ("rain", the bystander on the same
bus). Each device is read in two requests per poll (registers 1 and 20, same function, same size), so a reply
taken for the wrong request would decode without complaint. A threshold rule watches radar.gap.

The plan goes through each fault class for a few seconds — flipped bits (CRC errors), a reply split by a gap of
more than 3.5 character times, a late answer (after the gateway's timeout), an answer sent twice, noise bytes
between frames, the victim's line disconnected, the victim's UART at a wrong baud rate ("baud") or parity
("parity"), a second master on the line ("rogue": seeded read requests to the victim, into idle time or colliding
with the gateway's request or a reply) — each followed by a clean phase in which an alarm crossing is made. The
slaves' values are constant within a phase (they change only at the crossing). Checked after each:

- the bystander's readings keep their rate (the bus never stops polling it);
- every poll produces its readings (a failed transaction is a bad quality, no gap, no exception in the log);
- no good reading carries a value the slave did not hold at that time (garbage never becomes a good value);
- the victim is back to good/online within RECOVERY_POLLS polls after the fault ends (measured);
- with a wrong baud rate or parity, every poll of the victim made during the fault is bad (no reading good at all);
- the crossing made in the clean phase is raised (or cleared) within one poll interval + 50 ms (measured from the
  register change to the alarm desk's level change).

Everything goes to test-artifacts/hil/line-faults.json and to the HIL report (`hil_report`: the seed, one
`rs485.<class>` fault per phase, the per-class figures), and a table to stdout (-s). The seed: YUJING_HIL_SEED
(default below), printed; the same seed gives the same plan and the same per-frame dice on the line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from device_drivers.base import DeviceError
from device_drivers.modbus import ModbusTransport, SerialSettings
from device_drivers.registers import Table
from gateway.app import Gateway
from gateway.model import Quality
from gateway.poll.bus import DeviceState
from gateway.sim.devices import SimServer, SimSlave
from tests.e2e import running, site, until

from .linefault import FaultyLine, Uart
from .report import ARTIFACTS, ScenarioRecord, seed

pytestmark = pytest.mark.hil

BAUD = 19200
TIMEOUT_S = 0.1
INTERVAL_S = 0.8
PAUSE_S = 0.005
RETRIES = 1
OFFLINE_AFTER = 3
BACKOFF_MAX_S = 1.2
# An offline device is probed at most max(backoff_max_s, interval) apart, at its polling slots: the first probe
# after the line is good again comes within ceil(1.2 / 0.8) + 1 slots, and answers.
RECOVERY_POLLS = math.ceil(BACKOFF_MAX_S / INTERVAL_S) + 2
ALARM_SLACK_S = 0.05
RULE = "radar.gap.high"
SET_POINT = 2000
VICTIM, BYSTANDER = 1, 2
# Catalogue indexes (devices in file order, points in device order).
GAP, TEMP, TOTAL, AUX = 0, 1, 2, 3
POINT_NAMES = {GAP: "radar.gap", TEMP: "radar.temp", TOTAL: "rain.total", AUX: "rain.aux"}
ADDRESS = {GAP: 1, TEMP: 20, TOTAL: 1, AUX: 20}
UNIT_OF = {GAP: VICTIM, TEMP: VICTIM, TOTAL: BYSTANDER, AUX: BYSTANDER}

BODY = f"""
[[buses]]
name = "rs485"
type = "rtu"
port = "{{port}}"
baudrate = {BAUD}
timeout_s = {TIMEOUT_S}
pause_s = {PAUSE_S}

[[devices]]
name = "radar"
bus = "rs485"
unit = {VICTIM}
interval_s = {INTERVAL_S}
retries = {RETRIES}
offline_after = {OFFLINE_AFTER}
backoff_max_s = {BACKOFF_MAX_S}
  [[devices.points]]
  name = "gap"
  address = {ADDRESS[GAP]}
  [[devices.points]]
  name = "temp"
  address = {ADDRESS[TEMP]}

[[devices]]
name = "rain"
bus = "rs485"
unit = {BYSTANDER}
interval_s = {INTERVAL_S}
retries = {RETRIES}
offline_after = {OFFLINE_AFTER}
backoff_max_s = {BACKOFF_MAX_S}
  [[devices.points]]
  name = "total"
  address = {ADDRESS[TOTAL]}
  [[devices.points]]
  name = "aux"
  address = {ADDRESS[AUX]}

[[rules]]
kind = "threshold"
id = "{RULE}"
point = "radar.gap"
levels = [ {{ level = "blue", set = {SET_POINT} }} ]

[status]
listen = "127.0.0.1:0"
"""


@dataclass(frozen=True)
class Step:
    fault: str
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)


CLASSES = ("flip", "split", "late", "twice", "noise", "disconnect", "baud", "parity", "rogue")
WRONG_SETTING = ("baud", "parity")  # every poll during the fault must be bad
# The baud rates a mis-set slave may have: any of them garbles every request at BAUD (hil_tests/test_linefault.py).
WRONG_BAUDS = (4800, 9600, 38400, 57600)


def fault_plan(seed_: int) -> list[Step]:
    """The plan, drawn from the seed alone: each class once, a few seconds each, in a seeded order."""
    rng = random.Random(seed_)
    order = list(CLASSES)
    rng.shuffle(order)
    plan = []
    for c in order:
        # A wrong setting garbles every request (hil_tests/test_linefault.py): two polls inside the fault show it.
        secs = round(rng.uniform(2.0, 2.6) if c in WRONG_SETTING else rng.uniform(3.0, 3.8), 2)
        if c == "flip":
            p: dict[str, Any] = {"flip_rate": round(rng.uniform(0.3, 0.6), 2)}
        elif c == "split":
            p = {"split_rate": round(rng.uniform(0.5, 0.9), 2)}
        elif c == "late":
            p = {"late_rate": round(rng.uniform(0.3, 0.6), 2), "late_s": (round(TIMEOUT_S * 1.2, 3), round(TIMEOUT_S * 3.5, 3))}
        elif c == "twice":
            p = {"twice_rate": round(rng.uniform(0.3, 0.6), 2), "twice_gap_s": (0.002, 0.05)}
        elif c == "noise":
            p = {"noise_rate": round(rng.uniform(4.0, 8.0), 1), "noise_before_rate": round(rng.uniform(0.3, 0.6), 2)}
        elif c == "baud":
            p = {"uart": Uart(rng.choice(WRONG_BAUDS))}
        elif c == "parity":
            p = {"uart": Uart(BAUD, rng.choice("EO"))}  # 8E1/8O1 against 8N1 (8N2 is harmless: see test_linefault)
        elif c == "rogue":
            # It reads the victim's own registers (and neighbours), one or two, from either table: replies the
            # gateway cannot tell from its own by their shape.
            p = {"rogue_rate": round(rng.uniform(3.0, 5.0), 1), "rogue_collide": round(rng.uniform(0.2, 0.4), 2),
                 "rogue_fcs": (3, 4), "rogue_count": (1, 2),
                 "rogue_addresses": (ADDRESS[GAP], ADDRESS[TEMP], ADDRESS[GAP] + 1, ADDRESS[TEMP] + 1)}
        else:
            p = {}
        plan.append(Step(c, secs, p))
    return plan


def jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Uart) else v) for k, v in params.items()}


@dataclass
class Seen:
    mono: float  # when the gateway's sink got it
    point: int
    ts_ms: int
    value: Any
    quality: int


@dataclass
class Phase:
    fault: str
    params: dict[str, Any]
    began: float
    ended: float
    requests_before: int = 0
    requests_after: int = 0
    frames_hit: dict[str, int] = field(default_factory=dict)
    recovered_at: float | None = None
    online_at: float | None = None
    change_at: float | None = None  # the alarm crossing of the clean phase after it
    crossing: str = ""
    alarm_at: float | None = None
    settled: float = 0.0  # end of the clean phase


class Recorder:
    """What the gateway made of it: every reading as the sink got it, and the alarm desk's level changes."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.seen: list[Seen] = []
        self.levels: list[tuple[float, int]] = []
        self.states: list[tuple[float, DeviceState]] = []  # the victim's device state, as it changed
        sink = gw._sink

        def recording(readings: list[Any]) -> None:
            now = time.monotonic()
            self.seen.extend(Seen(now, r.point, r.ts_ms, r.value, r.quality) for r in readings)
            sink(readings)
            state = self.victim_state()
            if state is not None and (not self.states or self.states[-1][1] is not state):
                self.states.append((now, state))
            desk = gw.desk
            if desk is not None:
                lvl = int(desk.levels().get(RULE, 0))
                if not self.levels or self.levels[-1][1] != lvl:
                    self.levels.append((time.monotonic(), lvl))

        gw._sink = recording  # type: ignore[method-assign]

    def level(self) -> int:
        return self.levels[-1][1] if self.levels else 0

    def victim_state(self) -> DeviceState | None:
        for s in self.gw.schedulers:
            for p in s.pollers:
                if p.config.name == "radar":
                    return p.state
        return None


class Truth:
    """What the slaves held, and when (monotonic), per point."""

    def __init__(self) -> None:
        self.changes: dict[int, list[tuple[float, float, int]]] = {}  # point → (from, set_done, value)

    def record(self, point: int, began: float, done: float, value: int) -> None:
        self.changes.setdefault(point, []).append((began, done, value))

    def allowed(self, point: int, t0: float, t1: float) -> set[int]:
        """Every value the slave held at some moment in [t0, t1]."""
        out: set[int] = set()
        current = None
        for began, done, v in self.changes.get(point, []):
            if done <= t0:
                current = v
            elif began <= t1:
                out.add(v)
        if current is not None:
            out.add(current)
        return out


async def set_values(server: SimServer, cfg: Any, truth: Truth, values: dict[int, int]) -> float:
    points = {GAP: cfg.devices[0].points[0], TEMP: cfg.devices[0].points[1], TOTAL: cfg.devices[1].points[0], AUX: cfg.devices[1].points[1]}
    began = time.monotonic()
    for i, v in values.items():
        await server.set_raw(UNIT_OF[i], points[i], v)
    done = time.monotonic()
    for i, v in values.items():
        truth.record(i, began, done, v)
    return done


def mono_of(ts_ms: int, wall0_ms: int, mono0: float) -> float:
    return mono0 + (ts_ms - wall0_ms) / 1000


def analyse(rec: Recorder, truth: Truth, phases: list[Phase], wall0_ms: int, mono0: float) -> dict[str, Any]:
    # Wrong values: a good reading whose value the slave did not hold between its poll's start and the poll's end
    # (a poll takes at most one interval here: two requests with one retry each).
    wrong = []
    for s in rec.seen:
        if s.quality != Quality.GOOD and s.quality != Quality.OUT_OF_RANGE:
            continue
        t = mono_of(s.ts_ms, wall0_ms, mono0)
        ok = truth.allowed(s.point, t - 0.05, s.mono + 0.01)
        if s.value not in ok:
            wrong.append({"t": round(s.mono - mono0, 3), "point": POINT_NAMES[s.point], "value": s.value,
                          "held": sorted(ok), "held_by": sorted(POINT_NAMES[p] for p in POINT_NAMES
                                                                 if s.value in truth.allowed(p, t - 1.0, s.mono))})
    per: dict[str, Any] = {}
    for k, ph in enumerate(phases):
        end = phases[k + 1].began if k + 1 < len(phases) else ph.settled
        window = [s for s in rec.seen if ph.began <= s.mono < end]
        victim = [s for s in window if s.point == GAP and s.mono <= ph.ended]
        bystander_fault = [s for s in rec.seen if s.point == TOTAL and ph.began <= s.mono <= ph.ended]
        qual: dict[str, int] = {}
        for s in window:
            if UNIT_OF[s.point] == VICTIM and s.mono <= (ph.recovered_at or ph.ended) and s.quality:
                name = Quality(s.quality).name.lower() if s.quality in Quality._value2member_map_ else f"0x{s.quality:02x}"
                qual[name] = qual.get(name, 0) + 1
        after = [s for s in rec.seen if s.point == GAP and s.mono > ph.ended]
        recovery_polls = None
        if ph.recovered_at is not None:
            recovery_polls = sum(1 for s in after if s.mono <= ph.recovered_at)
        dur = ph.ended - ph.began
        w_wrong = [w for w in wrong if ph.began - mono0 <= w["t"] < end - mono0]
        by_bad = [s for s in bystander_fault if s.quality]
        # The victim's polls made wholly inside the fault (begun after it began, delivered before it ended) that were
        # good: with a wrong baud rate or parity there must be none.
        inside_good = [s for s in window if UNIT_OF[s.point] == VICTIM and s.quality == Quality.GOOD
                       and s.mono <= ph.ended and mono_of(s.ts_ms, wall0_ms, mono0) >= ph.began]
        per[ph.fault] = {
            "params": jsonable(ph.params),
            "began_s": round(ph.began - mono0, 3),
            "ended_s": round(ph.ended - mono0, 3),
            "transactions": ph.requests_after - ph.requests_before,  # requests to the victim on the wire during the fault
            "frames_hit": ph.frames_hit,
            "victim_polls": len(victim),
            "victim_bad_qualities": qual,
            "victim_bad": sum(qual.values()),
            "victim_good_inside": len(inside_good),
            "wrong_values": len(w_wrong),
            "wrong_sample": w_wrong[:5],
            "bystander_polls": len(bystander_fault),
            "bystander_expected": round(dur / INTERVAL_S, 1),
            "bystander_bad": len(by_bad),
            "recovery_polls": recovery_polls,
            "recovery_s": None if ph.recovered_at is None else round(ph.recovered_at - ph.ended, 3),
            "online_s": None if ph.online_at is None else round(ph.online_at - ph.ended, 3),
            "crossing": ph.crossing,
            "alarm_latency_s": None if ph.alarm_at is None or ph.change_at is None else round(ph.alarm_at - ph.change_at, 3),
        }
    # Every poll produced readings: the longest silence of each device, over the whole run.
    gaps = {}
    for point in (GAP, TOTAL):
        ts = [s.mono for s in rec.seen if s.point == point]
        gaps[POINT_NAMES[point].split(".")[0]] = round(max((b - a for a, b in zip(ts, ts[1:])), default=0.0), 3)
    return {"per_fault": per, "wrong_values": len(wrong), "wrong_sample": wrong[:10], "longest_silence_s": gaps,
            "readings": len(rec.seen)}


def table(report: dict[str, Any]) -> str:
    rows = [f"HIL RS-485 line faults, seed {report['seed']} ({report['duration_s']} s)",
            f"{'fault':<11}{'secs':>5}{'tx':>5}{'hit':>5}{'polls':>6}{'bad':>5}{'wrong':>6}{'bystndr':>9}"
            f"{'rec polls':>10}{'rec s':>7}{'online s':>9}  alarm latency s"]
    for name, c in report["per_fault"].items():
        rows.append(f"{name:<11}{c['ended_s'] - c['began_s']:>5.1f}{c['transactions']:>5}{sum(c['frames_hit'].values()):>5}"
                    f"{c['victim_polls']:>6}{c['victim_bad']:>5}{c['wrong_values']:>6}"
                    f"{c['bystander_polls']:>4}/{c['bystander_expected']:<4}"
                    f"{'-' if c['recovery_polls'] is None else c['recovery_polls']:>10}"
                    f"{'-' if c['recovery_s'] is None else format(c['recovery_s'], '.2f'):>7}"
                    f"{'-' if c['online_s'] is None else format(c['online_s'], '.2f'):>9}  "
                    f"{'-' if c['alarm_latency_s'] is None else format(c['alarm_latency_s'], '.3f')} ({c['crossing']})")
    rows.append(f"readings {report['figures']['readings']}, wrong values {report['figures']['wrong_values']}, "
                f"longest silence per device {report['figures']['longest_silence_s']}; "
                f"bounds: recovery <= {RECOVERY_POLLS} polls, alarm <= {INTERVAL_S + ALARM_SLACK_S:.2f} s")
    return "\n".join(rows)


def apply(line: FaultyLine, step: Step) -> None:
    line.set(units={VICTIM}, **step.params)


async def run_plan(plan: list[Step], s: int, tmp_path: Path, broker_port: int, caplog: Any, *, bus_extra: str = "",
                   record: ScenarioRecord | None = None, clean_s: float = 2.0) -> dict[str, Any]:
    line = FaultyLine(seed=s, baudrate=BAUD)
    line.start()
    server = SimServer([SimSlave(VICTIM), SimSlave(BYSTANDER)], serial={"port": line.device_port, "baudrate": BAUD})
    await server.start()
    cfg = site(broker_port, tmp_path, BODY.replace("{port}", line.gateway_port).replace(f"pause_s = {PAUSE_S}\n", f"pause_s = {PAUSE_S}\n{bus_extra}", 1))
    truth = Truth()
    mono0, wall0_ms = time.monotonic(), time.time_ns() // 1_000_000
    phases: list[Phase] = []
    low = True
    k = 0

    def values(k_: int, low_: bool) -> dict[int, int]:
        return {GAP: (1000 if low_ else 3000) + k_, TEMP: 500 + 10 * k_}

    await set_values(server, cfg, truth, {**values(0, True), TOTAL: 7001, AUX: 7002})
    gw = Gateway(cfg)
    rec = Recorder(gw)
    caplog.set_level(logging.WARNING)
    began = time.monotonic()
    try:
        async with running(gw):
            await until(lambda: any(x.point == GAP and x.quality == Quality.GOOD for x in rec.seen), timeout=10)
            steps = ([Step("clean", clean_s)] if clean_s else []) + plan
            for step in steps:
                ph = Phase(step.fault, step.params, time.monotonic(), 0.0, requests_before=line.stats.per_unit.get(VICTIM, 0))
                hit0 = dict(line.applied)
                if record is not None and step.fault != "clean":
                    record.fault(f"rs485.{step.fault}", seconds=step.seconds, units=[VICTIM], **jsonable(step.params))
                if step.fault == "disconnect":
                    await line.disconnect(step.seconds, units={VICTIM})
                elif step.fault == "clean":
                    await asyncio.sleep(step.seconds)
                else:
                    apply(line, step)
                    await asyncio.sleep(step.seconds)
                    line.clear()
                ph.ended = time.monotonic()
                ph.requests_after = line.stats.per_unit.get(VICTIM, 0)
                ph.frames_hit = {kk: v - hit0.get(kk, 0) for kk, v in line.applied.items() if v - hit0.get(kk, 0)}
                # Recovery: the first poll of the victim after the fault ended in which both of its points are good.
                deadline = ph.ended + 10
                while time.monotonic() < deadline:
                    good = [x for x in rec.seen if UNIT_OF[x.point] == VICTIM and x.mono > ph.ended]
                    by_ts: dict[int, list[Seen]] = {}
                    for x in good:
                        by_ts.setdefault(x.ts_ms, []).append(x)
                    done = [v for v in by_ts.values() if len(v) == 2 and all(x.quality == Quality.GOOD for x in v)]
                    if done:
                        ph.recovered_at = min(max(x.mono for x in v) for v in done)
                        break
                    await asyncio.sleep(0.01)
                await until(lambda: rec.victim_state() is DeviceState.ONLINE, timeout=5)
                at_end = [st for t, st in rec.states if t <= ph.ended]
                back = [t for t, st in rec.states if t > ph.ended and st is DeviceState.ONLINE]
                ph.online_at = ph.ended if not at_end or at_end[-1] is DeviceState.ONLINE else (back[0] if back else None)
                await asyncio.sleep(0.2 + random.Random(s + len(phases)).uniform(0, INTERVAL_S))  # a seeded point in the cycle
                # The alarm crossing, on a clean line: new values for the victim (the next phase's).
                k += 1
                low = not low
                level_before = rec.level()
                ph.change_at = await set_values(server, cfg, truth, values(k, low))
                ph.crossing = "clear" if low else "raise"
                t_limit = ph.change_at + 3
                while rec.level() == level_before and time.monotonic() < t_limit:
                    await asyncio.sleep(0.005)
                changed = [t for t, lvl in rec.levels if t >= ph.change_at and lvl != level_before]
                ph.alarm_at = changed[0] if changed else None
                await asyncio.sleep(0.5)
                ph.settled = time.monotonic()
                phases.append(ph)
    finally:
        await server.stop()
        line.close()
    took = time.monotonic() - began
    figures = analyse(rec, truth, phases, wall0_ms, mono0)
    escaped = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info and r.name.startswith("yujing")]
    if record is not None:
        record.seed = s
        per_class = {name: {k: c[k] for k in FIGURES} for name, c in figures["per_fault"].items()}
        record.figures.setdefault("rs485", {}).update(per_class)
        record.figures["rs485_wrong_values"] = figures["wrong_values"]
        record.figures["rs485_longest_silence_s"] = figures["longest_silence_s"]
    return {
        "seed": s,
        "duration_s": round(took, 2),
        "config": {"baudrate": BAUD, "timeout_s": TIMEOUT_S, "interval_s": INTERVAL_S, "pause_s": PAUSE_S, "retries": RETRIES,
                   "offline_after": OFFLINE_AFTER, "backoff_max_s": BACKOFF_MAX_S, "char_time_ms": round(line.char_s * 1000, 3),
                   "requests_per_poll": 2, "bounds": {"recovery_polls": RECOVERY_POLLS, "alarm_latency_s": INTERVAL_S + ALARM_SLACK_S}},
        "plan": [{"fault": p.fault, "seconds": p.seconds, **jsonable(p.params)} for p in plan],
        "line_events": line.report(mono0),
        "per_fault": figures.pop("per_fault"),
        "figures": figures,
        "exceptions_logged": escaped[:20],
        "sink_errors": gw.sink_errors,
    }


# The per-class figures the HIL report gets (the JSON artifact has everything).
FIGURES = ("transactions", "frames_hit", "victim_polls", "victim_bad", "victim_bad_qualities", "victim_good_inside",
           "wrong_values", "bystander_polls", "bystander_expected", "bystander_bad", "recovery_polls", "recovery_s",
           "online_s", "alarm_latency_s")


def write_report(report: dict[str, Any], name: str = "line-faults.json", record: ScenarioRecord | None = None) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / name).write_text(json.dumps(report, indent=2))
    if record is not None:
        record.log("rs485-line", ARTIFACTS / name)
    print(table(report))


def check(report: dict[str, Any], *, skip_wrong: frozenset[str] = frozenset()) -> None:
    per = report["per_fault"]
    assert set(per) == {"clean", *CLASSES}, sorted(per)
    assert not report["exceptions_logged"], report["exceptions_logged"]
    assert report["sink_errors"] == 0
    # Every poll produced readings: no device was silent for much longer than an interval (a poll with all its
    # retries fits in one interval here).
    for device, gap in report["figures"]["longest_silence_s"].items():
        assert gap < 2 * INTERVAL_S + 0.2, f"{device} produced no reading for {gap} s"
    for name, c in per.items():
        # The bystander keeps its rate: at most one slot short over the fault (where the fault began and ended).
        assert c["bystander_polls"] >= c["bystander_expected"] - 1.5, (name, c)
        if name not in ("disconnect", "noise", "rogue"):  # these hit the whole bus (a silent line, or collisions)
            assert c["bystander_bad"] == 0, (name, c)
        if name in WRONG_SETTING:
            # A slave at another baud rate or parity understands no request: every poll made during the fault is bad.
            assert c["victim_good_inside"] == 0, (name, c)
            assert c["victim_bad"] > 0, (name, c)
            assert c["frames_hit"].get("uart", 0) > 0, (name, c)
        if name == "rogue":
            assert sum(n for k, n in c["frames_hit"].items() if k.startswith("rogue")) > 0, (name, c)
        if name not in skip_wrong:
            assert c["wrong_values"] == 0, (name, c["wrong_sample"])
        assert c["recovery_polls"] is not None, f"{name}: never good again"
        assert c["recovery_polls"] <= RECOVERY_POLLS, (name, c)
        assert c["alarm_latency_s"] is not None, f"{name}: the crossing was never seen by the alarm desk"
        assert c["alarm_latency_s"] <= INTERVAL_S + ALARM_SLACK_S, (name, c)
        if name != "clean":
            assert c["transactions"] > 0 and c["victim_polls"] > 0, (name, c)


# Found by this scenario (see the report): an answer that comes twice, or late, was taken by pymodbus 3.16 as the
# answer to the NEXT request to the same unit (it matches a reply by unit id only), so a device read in two
# same-sized requests got one register's value under the other point, with quality good. Late answers are fixed
# (device_drivers.modbus: after a failure, a different request to that unit waits out the failed one's timeout;
# test_a_late_reply_never_becomes_another_points_good_value). An answer sent twice 5-50 ms apart is still taken:
# held by the strict xfail below; the main scenario reports that class's wrong values without failing on them.
# A second master ("rogue") made wrong good values too (the replies to its reads of the input registers, of two
# registers, of the other address, taken as the gateway's): fixed in device_drivers.modbus (the function code and
# the length must match, and a reply taken while another master's request to that unit was heard is not trusted;
# test_the_transport_never_takes_a_second_masters_reply_for_its_own).
# An answer later than two timeouts (the plan's late class goes to 3.5) comes after the wait described above and is
# still taken by the next, different request: seeds 1 and 99 of this scenario showed it (radar.temp good with
# radar.gap's value), as device_drivers/modbus.py did before the rogue checks above (not caused by them); held by
# the strict xfail below. Tried and dropped: waiting 4 timeouts instead of 1 starved the bystander; counting the
# unanswered requests per unit made every lost request distrust the next answers (recovery cascaded into offline).
KNOWN_WRONG = frozenset({"twice", "late"})


async def test_line_faults_never_give_a_wrong_good_value_and_recover(mosquitto, tmp_path: Path, caplog,
                                                                    hil_report: ScenarioRecord) -> None:
    s = seed()
    print(f"\nYUJING_HIL_SEED={s}")
    report = await run_plan(fault_plan(s), s, tmp_path, mosquitto.port, caplog, record=hil_report)
    write_report(report, record=hil_report)
    check(report, skip_wrong=KNOWN_WRONG)


def test_the_plan_is_a_function_of_the_seed() -> None:
    assert fault_plan(7) == fault_plan(7)
    assert fault_plan(7) != fault_plan(8)
    assert sorted(p.fault for p in fault_plan(seed())) == sorted(CLASSES)
    late = next(p for p in fault_plan(seed()) if p.fault == "late")
    assert late.params["late_s"][0] > TIMEOUT_S  # really after the gateway's timeout


async def _one_class(fault: str, params: dict[str, Any], tmp_path: Path, broker_port: int, caplog: Any, *,
                     bus_extra: str = "", name: str = "", record: ScenarioRecord | None = None) -> dict[str, Any]:
    s = seed()
    # No clean phase first (the main scenario has one): these tests look only at the fault's own figures.
    report = await run_plan([Step(fault, 4.0, params)], s, tmp_path, broker_port, caplog, bus_extra=bus_extra,
                            clean_s=0, record=record)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)  # the evidence, beside the scenario's report
    (ARTIFACTS / f"line-faults-{name or fault}.json").write_text(json.dumps(report, indent=2))
    return report["per_fault"][fault]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="a reply sent twice is taken as the answer to the next request to the same unit "
                                        "(pymodbus matches replies by unit id only): a wrong value with quality good")
async def test_a_reply_sent_twice_never_becomes_another_points_good_value(mosquitto, tmp_path: Path, caplog,
                                                                         hil_report: ScenarioRecord) -> None:
    c = await _one_class("twice", {"twice_rate": 1.0, "twice_gap_s": (0.008, 0.03)}, tmp_path, mosquitto.port, caplog,
                         record=hil_report)
    print(f"\ntwice: {c['wrong_values']} wrong good values, e.g. {c['wrong_sample'][:2]}")
    assert c["wrong_values"] == 0, c["wrong_sample"]


async def test_with_a_reply_guard_a_reply_sent_twice_is_a_framing_error_not_a_wrong_value(
        mosquitto, tmp_path: Path, caplog, hil_report: ScenarioRecord) -> None:
    """`reply_guard_s` (a bus setting, off by default: it costs every transaction its length) listens after each
    reply; the second copy makes that transaction a framing error instead of the next request's answer."""
    c = await _one_class("twice", {"twice_rate": 1.0, "twice_gap_s": (0.008, 0.03)}, tmp_path, mosquitto.port, caplog,
                         bus_extra="reply_guard_s = 0.05\n", name="twice-guarded", record=hil_report)
    print(f"\ntwice with reply_guard_s = 0.05: {c['wrong_values']} wrong good values, {c['victim_bad']} bad readings")
    assert c["wrong_values"] == 0, c["wrong_sample"]


# The retry's reply, late by more than the timeout and less than the timeout + the retry pause, lands while the
# gateway waits for the device's next request (the first attempt's reply falls in the pause and is dropped).
LATE_INTO_NEXT = (TIMEOUT_S + 0.03, TIMEOUT_S + 0.08)


async def test_a_late_reply_never_becomes_another_points_good_value(mosquitto, tmp_path: Path, caplog,
                                                                    hil_report: ScenarioRecord) -> None:
    c = await _one_class("late", {"late_rate": 1.0, "late_s": LATE_INTO_NEXT}, tmp_path, mosquitto.port, caplog,
                         record=hil_report)
    print(f"\nlate: {c['wrong_values']} wrong good values, e.g. {c['wrong_sample'][:2]}")
    assert c["wrong_values"] == 0, c["wrong_sample"]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="an answer later than two timeouts is taken as the "
                   "answer to the next, different request to the same unit (the wait after a failure is one timeout): "
                   "a wrong value with quality good")
async def test_an_answer_later_than_two_timeouts_never_becomes_another_points_good_value(
        mosquitto, tmp_path: Path, caplog, hil_report: ScenarioRecord) -> None:
    c = await _one_class("late", {"late_rate": 1.0, "late_s": LATE_PAST_WAIT}, tmp_path, mosquitto.port, caplog,
                         name="late-past-wait", record=hil_report)
    print(f"\nlate past the wait: {c['wrong_values']} wrong good values, e.g. {c['wrong_sample'][:2]}")
    assert c["wrong_values"] == 0, c["wrong_sample"]


# Later than the failed request's timeout plus the wait after it (two timeouts), within the plan's range.
LATE_PAST_WAIT = (TIMEOUT_S * 2.2, TIMEOUT_S * 3.5)


async def test_the_transport_never_takes_a_second_masters_reply_for_its_own(hil_report: ScenarioRecord) -> None:
    """The rogue master (6 requests a second) against the RTU transport alone, reading two registers of one slave
    back to back (some 100-300 transactions in 2.5 s or more): every value it returns is the one the slave holds at the
    address asked. Before device_drivers.modbus checked the function code, the reply's length and whether another
    master's request to the unit was on the line, it took the rogue's replies (of the input registers, of two
    registers, or of the other address) as its own."""
    s = seed()
    held = {ADDRESS[GAP]: 3001, ADDRESS[TEMP]: 510}
    params = {"rogue_rate": 6.0, "rogue_collide": 0.3, "rogue_fcs": (3, 4), "rogue_count": (1, 2),
              "rogue_addresses": (ADDRESS[GAP], ADDRESS[TEMP], ADDRESS[GAP] + 1, ADDRESS[TEMP] + 1)}
    hil_report.seed = s
    line = FaultyLine(seed=s, baudrate=BAUD)
    line.start()
    server = SimServer([SimSlave(VICTIM)], serial={"port": line.device_port, "baudrate": BAUD})
    await server.start()
    transport = ModbusTransport("rs485", SerialSettings(line.gateway_port, BAUD, timeout_s=TIMEOUT_S))
    good: dict[int, list[int]] = {a: [] for a in held}
    bad: dict[str, int] = {}
    try:
        for address, value in held.items():
            await server.server.async_setValues(VICTIM, 16, address, [value])  # the holding registers (FC 16)
        line.set(units={VICTIM}, **params)
        hil_report.fault("rs485.rogue", units=[VICTIM], **jsonable(params))
        # 2.5 s, and on until the rogue has collided with a frame twice (its moments are seeded, how many fit in
        # 2.5 s is not), at most 6 s
        began = time.monotonic()

        def enough() -> bool:
            collided = line.applied.get("rogue_on_request", 0) + line.applied.get("rogue_on_reply", 0)
            return time.monotonic() - began > 6.0 or (time.monotonic() - began > 2.5 and collided >= 2)

        while not enough():
            for address in held:
                try:
                    good[address].extend(await transport.read(Table.HOLDING, address, 1, VICTIM))
                except DeviceError as exc:
                    why = str(exc).split(": ")[-1]
                    bad[why] = bad.get(why, 0) + 1
                await asyncio.sleep(PAUSE_S)
        line.clear()
    finally:
        transport.close()
        await server.stop()
        line.close()
    wrong = {a: sorted({v for v in vs if v != held[a]}) for a, vs in good.items()}
    figures = {"good": {a: len(vs) for a, vs in good.items()}, "bad": bad, "wrong": wrong, "rogue": {
        k: v for k, v in line.applied.items() if k.startswith("rogue")}}
    hil_report.figures["rs485_rogue_transport"] = figures
    print(f"\nYUJING_HIL_SEED={s}: {figures}")
    assert all(not w for w in wrong.values()), wrong
    assert all(len(vs) > 20 for vs in good.values()), figures  # the line was usable between the rogue's frames
    collisions = line.applied.get("rogue_on_request", 0) + line.applied.get("rogue_on_reply", 0)
    assert line.applied.get("rogue_idle", 0) >= 3 and collisions >= 2, figures
    assert any("not trusted" in why for why in bad), figures  # the replies it did not take for its own
