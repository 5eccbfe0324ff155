"""Clock faults (issue 11, the clock part): a gateway that boots at 1970, is set by NTP, then steps back
and forward again — a seeded, replayable plan.

A real gateway (in-process) polls a simulated Modbus TCP device every INTERVAL_S with two alarm rules on one
point (a plain threshold, and the same with a 1 s on-delay and a stale-input check), publishes to a real
mosquitto, and a persistent consumer (gateway.consumer.Decoder) collects everything. Its wall clock is
gateway.sim.clock.SteppableClock: 1970-01-01 plus the time since boot, as on a Raspberry Pi without an RTC;
monotonic time is real. The plan (seed: YUJING_HIL_SEED):

  boot at 1970 → NTP sets the clock to now → it steps back 5–120 s → a small step forward (0.15–0.9 s:
  between ntpd's and chrony's step thresholds) → clean stop.

The device's value crosses the thresholds on a seeded schedule, once just after each step. A second variant
runs the same plan with the uplink away (through hil_tests/netfault.py: connections reset, new ones held)
from a second before NTP sets the clock until a second after the step back, so the 1970 readings wait in
the spool when the clock is set (they are sealed then, flagged and historical) and the step back happens
while readings are queued. Checked:

- every reading polled is delivered, none twice, and each point's readings arrive in the order they were
  polled (by seq, then within the message) — one list comparison per point, whatever their stamps;
- a reading is flagged clock-unset (key 6) exactly when it was stamped before the clock was set; readings
  polled after the set are never flagged; the set step's size, from the gateway's `gateway.clock` event,
  re-times the flagged ones to the real time of their poll;
- each step is reported once, with its size (±STEP_TOLERANCE_MS);
- alarm latency: the plain threshold rule changes level within one poll interval + 50 ms of every crossing;
  the delayed rule raises between its delay and delay + two intervals + 50 ms after a crossing that lasts
  (DELAYED_BOUND_S: a step forward must not run the delay out early, a step back must not stretch it), and
  never for one that does not; no rule reports a fault (a step forward is no stale input);
- after each step (or, for a step during the outage, after the outage) a reading polled after it reaches
  the consumer within RECOVERY_BOUND_S.

Figures to the hil_report record and test-artifacts/hil/clock-faults.json; a table to stdout (-s).
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from device_drivers.registers import PointSpec
from gateway import wire
from gateway.app import Gateway
from gateway.clockcheck import CLOCK_FLOOR_MS
from gateway.sim.clock import SteppableClock
from gateway.sim.devices import SimServer, SimSlave
from tests.conftest import free_port
from tests.e2e import collecting, register, running, site

from .netfault import FaultProxy
from .report import ARTIFACTS, ScenarioRecord, seed
from .test_network_faults import percentiles

pytestmark = pytest.mark.hil

INTERVAL_S = 0.2
ON_DELAY_S = 1.0
LATENCY_BOUND_S = INTERVAL_S + 0.05  # the bound: one poll interval + 50 ms
# An on-delay starts at the first poll that sees the condition (up to one interval after the crossing) and
# is confirmed by the first poll (or tick) at least ON_DELAY_S after it: up to one interval more.
DELAYED_BOUND_S = ON_DELAY_S + 2 * INTERVAL_S + 0.05
RECOVERY_BOUND_S = 2.0  # a step to a reading polled after it at the consumer (stated in docs/wire-format.md's terms)
STEP_TOLERANCE_MS = 20
HIGH, LOW = 80, 20  # the rules: set ≥ 50, clear ≤ 45


@dataclass(frozen=True)
class Plan:
    boot_s: float  # running at 1970 for this long before NTP sets the clock
    back_after_s: float  # the set → the step back
    back_ms: int  # its size (positive: how far back)
    forward_after_s: float  # the step back → the small step forward
    forward_ms: int
    tail_s: float  # after the last step, before the clean stop
    holds: tuple[float, ...]  # seeded times between crossings
    after_step_s: tuple[float, ...]  # each step → the crossing that follows it


def plan_for(seed_: int) -> Plan:
    rng = random.Random(seed_)
    return Plan(
        boot_s=round(rng.uniform(3.0, 4.0), 2),
        back_after_s=round(rng.uniform(4.0, 5.5), 2),
        back_ms=rng.randint(5_000, 120_000),
        forward_after_s=round(rng.uniform(4.0, 5.5), 2),
        forward_ms=rng.randint(150, 900),
        tail_s=round(rng.uniform(3.0, 4.0), 2),
        holds=tuple(round(rng.uniform(0.6, 2.0), 2) for _ in range(64)),
        after_step_s=tuple(round(rng.uniform(0.05, 0.4), 3) for _ in range(3)),
    )


@dataclass
class Polled:
    ts: int
    mono: float  # when the gateway's sink got it (after the read)
    real_ms: int  # the host's real clock then


@dataclass
class Run:
    polled: dict[int, list[Polled]] = field(default_factory=lambda: defaultdict(list))
    transitions: list[tuple[float, str, str]] = field(default_factory=list)  # (mono, rule, kind)
    crossings: list[tuple[float, bool]] = field(default_factory=list)  # (mono when the device shows it, high)
    steps: list[dict[str, Any]] = field(default_factory=list)  # {"kind", "mono", "applied_ms"}
    outage: tuple[float, float] | None = None  # (mono began, mono ended) of the uplink outage
    arrivals: list[tuple[float, str, bytes]] = field(default_factory=list)  # (mono, topic kind, payload)


async def drive(plan: Plan, clock: SteppableClock, server: SimServer, point: PointSpec, run: Run,
                proxy: FaultProxy | None = None) -> None:
    """Crossings on the seeded schedule, one just after each step; the steps at their planned times; with a
    proxy, the uplink away from a second before the set until a second after the step back."""
    t0 = time.monotonic()
    set_at = plan.boot_s
    back_at = set_at + plan.back_after_s
    forward_at = back_at + plan.forward_after_s
    end = forward_at + plan.tail_s
    pending = [("ntp_set", set_at), ("step_back", back_at), ("step_forward", forward_at)]
    if proxy is not None:
        pending.insert(0, ("outage", set_at - 1.0))
    outage: asyncio.Task[None] | None = None
    high = False
    holds = iter(plan.holds)
    next_cross = t0 + next(holds)

    async def cross() -> None:
        nonlocal high
        high = not high
        await server.set_point(1, point, HIGH if high else LOW)
        run.crossings.append((time.monotonic(), high))

    while time.monotonic() < t0 + end:
        now = time.monotonic()
        if pending and now >= t0 + pending[0][1]:
            kind, _ = pending.pop(0)
            if kind == "outage":
                assert proxy is not None
                outage = asyncio.create_task(proxy.blackhole(back_at - set_at + 2.0))  # new connections wait …
                await asyncio.sleep(0)
                proxy.drop()  # … and the live one goes now: the gateway knows at once
                outage.add_done_callback(functools.partial(_outage_ended, run, time.monotonic()))
                continue
            if kind == "ntp_set":
                applied = clock.set_to(time.time_ns() // 1_000_000)
            else:
                applied = -plan.back_ms if kind == "step_back" else plan.forward_ms
                clock.step(applied)
            run.steps.append({"kind": kind, "mono": time.monotonic(), "applied_ms": applied})
            await asyncio.sleep(plan.after_step_s[len(run.steps) - 1])
            await cross()  # a crossing right after the step: the rules' worst moment
            next_cross = time.monotonic() + next(holds)
            continue
        if now >= next_cross:
            await cross()
            next_cross = time.monotonic() + next(holds)
        await asyncio.sleep(0.01)
    if outage is not None:
        await outage


def _outage_ended(run: Run, began: float, _: object) -> None:
    run.outage = (began, time.monotonic())


def analyse(run: Run, plan: Plan) -> dict[str, Any]:
    data: list[tuple[float, wire.Data]] = []
    seen: dict[tuple[int, int], bytes] = {}
    duplicates = differing = 0
    events: list[dict[str, Any]] = []
    for mono, kind, payload in run.arrivals:
        if kind == "data":
            d = wire.decode_data(payload)
            key = (d.session, d.seq)
            if key in seen:
                duplicates += 1
                differing += seen[key] != payload
                continue
            seen[key] = payload
            data.append((mono, d))
        elif kind == "alarm":
            a = wire.decode_alarm(payload)
            for e in a.events:
                events.append({"kind": e.kind, "rule": e.rule, "ts": e.ts_ms, "message": e.message,
                               "clock_unset": a.clock_unset})
    data.sort(key=lambda x: (x[1].session, x[1].seq))
    seqs = [d.seq for _, d in data]
    gaps = sorted(set(range(1, max(seqs, default=0) + 1)) - set(seqs))
    delivered: dict[int, list[tuple[int, bool, float]]] = defaultdict(list)  # point → (ts, flagged, arrival mono)
    for mono, d in data:
        for r in d.readings:
            delivered[r.point].append((r.ts_ms, d.clock_unset, mono))

    # loss, duplicates, order: each point's delivered stamps are its polled stamps, in poll order
    lost = extra = 0
    order_ok = True
    for point in set(run.polled) | set(delivered):
        want = [p.ts for p in run.polled.get(point, [])]
        got = [ts for ts, _, _ in delivered.get(point, [])]
        order_ok &= want == got
        missing = defaultdict(int)
        for ts in want:
            missing[ts] += 1
        for ts in got:
            missing[ts] -= 1
        lost += sum(n for n in missing.values() if n > 0)
        extra += sum(-n for n in missing.values() if n < 0)

    # the unset flag, and re-timing by the set step's reported size
    set_step = next(s for s in run.steps if s["kind"] == "ntp_set")
    wrong_flag = flagged = unflagged_before_set = flagged_after_set = 0
    reported = {k: _reported_ms(events, k) for k in ("set", "steps")}
    retime_errors: list[float] = []
    for point, got in delivered.items():
        for (ts, flag, _), p in zip(got, run.polled.get(point, [])):
            wrong_flag += flag != (ts < CLOCK_FLOOR_MS)
            flagged += flag
            if p.mono < set_step["mono"] and not flag:
                unflagged_before_set += 1
            if p.mono > set_step["mono"] and flag:
                flagged_after_set += 1
            if flag and reported["set"]:
                retime_errors.append(abs(ts + reported["set"][0] - p.real_ms))
    points = len(run.polled)  # at most one poll (a reading of every point) was in flight when the clock was set

    # the steps as the gateway reported them
    step_reports = []
    others = iter(reported["steps"])
    for s in run.steps:
        got_ms = reported["set"][0] if s["kind"] == "ntp_set" and reported["set"] else next(others, None)
        step_reports.append({"kind": s["kind"], "applied_ms": s["applied_ms"], "reported_ms": got_ms,
                             "error_ms": None if got_ms is None else got_ms - s["applied_ms"]})

    # alarm latency
    fast = [(m, k) for m, r, k in run.transitions if r == "lvl.fast"]
    slow = [(m, k) for m, r, k in run.transitions if r == "lvl.delayed"]
    latencies: list[float] = []
    late: list[dict[str, Any]] = []
    last_poll = max((p[-1].mono for p in run.polled.values() if p), default=0.0)

    def until(i: int) -> float:  # the crossing's value holds until the next crossing, or the last poll
        return run.crossings[i + 1][0] if i + 1 < len(run.crossings) else last_poll

    for i, (t, high) in enumerate(run.crossings):
        if until(i) - t < LATENCY_BOUND_S:  # the gateway stopped polling before it could see this one
            continue
        want = "raised" if high else "cleared"
        hit = next((m for m, k in fast if t <= m < until(i) + LATENCY_BOUND_S and k == want), None)
        lat = None if hit is None else hit - t
        if lat is not None:
            latencies.append(lat)
        if lat is None or lat > LATENCY_BOUND_S:
            late.append({"crossing": i, "high": high, "latency_s": lat})
    delayed_ok, delayed_bad, delayed_lat = 0, [], []
    for i, (t, high) in enumerate(run.crossings):
        if not high:
            continue
        raised = next((m for m, k in slow if t <= m < until(i) and k == "raised"), None)
        held = until(i) - t
        if held >= DELAYED_BOUND_S:
            lat = None if raised is None else raised - t
            if lat is not None and ON_DELAY_S <= lat <= DELAYED_BOUND_S:
                delayed_ok += 1
                delayed_lat.append(lat)
            else:
                delayed_bad.append({"crossing": i, "held_s": round(held, 3), "latency_s": lat})
        elif held < ON_DELAY_S - 0.05 and raised is not None:
            delayed_bad.append({"crossing": i, "held_s": round(held, 3), "raised_after_s": round(raised - t, 3)})
    rule_faults = [(r, k) for _, r, k in run.transitions if k in ("fault", "fault_cleared")]
    unexpected = len(fast) - len(run.crossings)

    # recovery: a step (or the end of the outage it fell in) → the first arrival of a reading polled after it
    recovery = []
    for s in run.steps:
        since = s["mono"]
        if run.outage is not None and run.outage[0] <= since <= run.outage[1]:
            since = run.outage[1]
        first = None
        for point, got in delivered.items():
            for (_, _, arrived), p in zip(got, run.polled.get(point, [])):
                if p.mono > s["mono"]:
                    first = arrived if first is None else min(first, arrived)
                    break
        recovery.append(None if first is None else round(first - since, 3))

    ts_repeats = sum(len(g) - len({ts for ts, _, _ in g}) for g in delivered.values())
    historical_flagged = sum(1 for _, d in data if d.historical and d.clock_unset)
    return {
        "outage_s": None if run.outage is None else round(run.outage[1] - run.outage[0], 3),
        "historical_clock_unset_messages": historical_flagged,
        "readings_polled": sum(len(v) for v in run.polled.values()),
        "readings_delivered": sum(len(v) for v in delivered.values()),
        "lost": lost, "extra": extra, "duplicates": duplicates, "duplicates_not_identical": differing,
        "seq_gaps": gaps[:20], "order_kept": order_ok,
        "flagged_clock_unset": flagged, "flag_disagrees_with_stamp": wrong_flag,
        "unflagged_polled_before_set": unflagged_before_set, "flagged_polled_after_set": flagged_after_set,
        "points": points,
        "retime_error_ms": percentiles(retime_errors, 4),
        "steps": step_reports,
        "crossings": len(run.crossings),
        "latency_s": percentiles(latencies, 4), "late_crossings": late, "unexpected_transitions": unexpected,
        "delayed_raised_in_bounds": delayed_ok, "delayed_latency_s": percentiles(delayed_lat, 4),
        "delayed_wrong": delayed_bad, "rule_faults": rule_faults,
        "recovery_s": recovery,
        "stamps_repeated_after_step_back": ts_repeats,
        "gateway_events": [e for e in events if e["rule"].startswith("gateway.clock")],
    }


_STEPPED = re.compile(r"stepped by ([+-]\d+) ms")


def _reported_ms(events: list[dict[str, Any]], which: str) -> list[int]:
    """The step sizes the gateway reported: the set (gateway_ok of gateway.clock), or the other steps."""
    out = []
    for e in events:
        if which == "set":
            wanted = e["kind"] == "gateway_ok" and e["rule"] == "gateway.clock"
        else:
            wanted = e["rule"] == "gateway.clock.step"
        m = _STEPPED.search(e["message"])
        if wanted and m:
            out.append(int(m.group(1)))
    return out


def table(report: dict[str, Any]) -> str:
    f = report["figures"]
    away = "" if f["outage_s"] is None else f" for {f['outage_s']} s"
    rows = [(f"HIL clock faults, seed {report['seed']}, uplink {report['uplink']}{away} "
             f"(interval {INTERVAL_S} s, bound {LATENCY_BOUND_S:.2f} s)"),
            f"{'step':<13} {'applied ms':>14} {'reported ms':>14} {'err ms':>6} {'recovery s':>10}"]
    for s, rec in zip(f["steps"], f["recovery_s"]):
        rows.append(f"{s['kind']:<13} {s['applied_ms']:>14} {s['reported_ms']!s:>14} {s['error_ms']!s:>6} "
                    f"{rec!s:>10}")
    lat, dl = f["latency_s"] or {}, f["delayed_latency_s"] or {}
    rows.append(f"readings polled {f['readings_polled']}, delivered {f['readings_delivered']}, lost {f['lost']}, "
                f"extra {f['extra']}, duplicate seqs {f['duplicates']}, gaps {len(f['seq_gaps'])}, "
                f"order kept {f['order_kept']}")
    rows.append(f"flagged clock-unset {f['flagged_clock_unset']} (disagreeing with the stamp "
                f"{f['flag_disagrees_with_stamp']}, unflagged before set {f['unflagged_polled_before_set']}, "
                f"flagged after {f['flagged_polled_after_set']}); re-timed error ms {f['retime_error_ms']}")
    rows.append(f"alarm latency, {f['crossings']} crossings: p50 {lat.get('p50')} s, p99 {lat.get('p99')} s, "
                f"max {lat.get('max')} s; late {len(f['late_crossings'])}; on-delay raises in bounds "
                f"{f['delayed_raised_in_bounds']} (latency max {dl.get('max')} s), wrong {len(f['delayed_wrong'])}; "
                f"rule faults {len(f['rule_faults'])}; stamps repeated after the step back "
                f"{f['stamps_repeated_after_step_back']}")
    return "\n".join(rows)


@pytest.mark.parametrize("uplink", ["connected", "away"])
@pytest.mark.needs("simulated_devices", "clock_control")
async def test_clock_set_by_ntp_and_stepped_loses_nothing_and_alarms_stay_on_time(
    private_mosquitto, tmp_path: Path, hil_report: ScenarioRecord, uplink: str
) -> None:
    s = seed()
    hil_report.seed = s
    print(f"\nYUJING_HIL_SEED={s}")
    plan = plan_for(s)
    run = Run()
    with hil_report.infrastructure():
        modbus = free_port()
        server = SimServer([SimSlave(1)], tcp=("127.0.0.1", modbus))
        await server.start()
        await register(private_mosquitto.port, "platform")
    body = (f'[[buses]]\nname = "plc"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {modbus}\n\n'
            f'[[devices]]\nname = "d"\nbus = "plc"\nunit = 1\ninterval_s = {INTERVAL_S}\n'
            '  [[devices.points]]\n  name = "lvl"\n  address = 0\n'
            '  [[devices.points]]\n  name = "aux"\n  address = 1\n\n'
            '[[rules]]\nkind = "threshold"\nid = "lvl.fast"\npoint = "d.lvl"\n'
            'levels = [ { level = "II_ORANGE", set = 50, clear = 45 } ]\n\n'
            f'[[rules]]\nkind = "threshold"\nid = "lvl.delayed"\npoint = "d.lvl"\non_delay_s = {ON_DELAY_S}\n'
            'levels = [ { level = "II_ORANGE", set = 50, clear = 45 } ]\n'
            '  [rules.fault]\n  interval_s = 1\n')
    proxy = FaultProxy(upstream=("127.0.0.1", private_mosquitto.port), seed=s) if uplink == "away" else None
    if proxy is not None:
        with hil_report.infrastructure():
            await proxy.__aenter__()
    cfg = site(proxy.port if proxy is not None else private_mosquitto.port, tmp_path, body)
    clock = SteppableClock()  # 1970-01-01 + uptime
    gw = Gateway(cfg, clock=clock)
    sink = gw._sink

    def counting(readings: list[Any]) -> None:
        mono, real = time.monotonic(), time.time_ns() // 1_000_000
        for r in readings:
            run.polled[r.point].append(Polled(r.ts_ms, mono, real))
        sink(readings)

    gw._sink = counting  # type: ignore[method-assign]
    began = time.monotonic()
    figures: dict[str, Any] = {}
    try:
        async with collecting(private_mosquitto.port, client_id="platform") as col:
            feed = col.decoder.feed

            def stamped(topic: str, payload: bytes) -> Any:
                run.arrivals.append((time.monotonic(), wire.parse_topic(topic).kind, payload))
                return feed(topic, payload)

            col.decoder.feed = stamped  # type: ignore[method-assign]
            async with running(gw):
                while gw.desk is None:
                    await asyncio.sleep(0.002)
                handle = gw.desk._handle

                def timed(transitions: list[Any]) -> None:
                    now = time.monotonic()
                    run.transitions.extend((now, t.rule, str(t.kind)) for t in transitions)
                    handle(transitions)

                gw.desk._handle = timed  # type: ignore[method-assign]
                point = cfg.devices[0].points[0]
                await server.set_point(1, point, LOW)
                await col.wait_for(lambda c: len(c.records) >= 4, timeout=15)
                await drive(plan, clock, server, point, run, proxy)
            # stopped cleanly: everything polled is in the spool and published before the death
            await col.wait_for(lambda c: any(k == "death" for _, k, _ in run.arrivals), timeout=15)
            await asyncio.sleep(0.3)
            figures = analyse(run, plan)
            figures["consumer_notices_clock_back"] = col.decoder.clock_steps_back
            figures["consumer_gaps"] = col.decoder.gaps
    finally:
        await server.stop()
        if proxy is not None:
            await proxy.__aexit__(None, None, None)
        if run.outage is not None:
            hil_report.fault("net.blackhole", round(run.outage[0] - hil_report.started, 3),
                             seconds=round(run.outage[1] - run.outage[0], 3))
        for st in run.steps:
            hil_report.fault("clock.step", round(st["mono"] - hil_report.started, 3), by_s=st["applied_ms"] / 1000,
                             step=st["kind"])
        report = {"seed": s, "uplink": uplink, "duration_s": round(time.monotonic() - began, 2), "plan": plan.__dict__,
                  "figures": figures}
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = "clock-faults.json" if uplink == "connected" else "clock-faults-uplink-away.json"
        (ARTIFACTS / name).write_text(json.dumps(report, indent=2, default=str))
        if figures:
            lat = figures["latency_s"] or {}
            hil_report.figures.update({
                "lost": figures["lost"], "duplicates": figures["duplicates"],
                "latency_p50_s": lat.get("p50"), "latency_p99_s": lat.get("p99"),
                "recovery_s": max((r for r in figures["recovery_s"] if r is not None), default=None),
                "order_kept": figures["order_kept"], "flagged_clock_unset": figures["flagged_clock_unset"],
                "steps": figures["steps"], "crossings": figures["crossings"],
            })
            print(table(report))
    f = figures
    assert f["lost"] == 0 and f["extra"] == 0, f"lost {f['lost']}, extra {f['extra']}"
    assert not f["seq_gaps"] and f["duplicates_not_identical"] == 0
    assert f["order_kept"], "a point's readings did not arrive in the order they were polled"
    assert f["flag_disagrees_with_stamp"] == 0
    assert f["flagged_clock_unset"] > 0 and f["flagged_polled_after_set"] == 0
    assert f["unflagged_polled_before_set"] <= f["points"], "more than one poll per point re-stamped at the set"
    assert f["retime_error_ms"] is not None and f["retime_error_ms"]["max"] <= 250, f["retime_error_ms"]
    for st in f["steps"]:
        assert st["error_ms"] is not None and abs(st["error_ms"]) <= STEP_TOLERANCE_MS, f"step misreported: {st}"
    assert len(f["gateway_events"]) == 4, f["gateway_events"]  # unset at boot, set, back, forward
    assert f["gateway_events"][0]["clock_unset"] and not any(e["clock_unset"] for e in f["gateway_events"][1:])
    assert not f["late_crossings"], f"crossings not alarmed within {LATENCY_BOUND_S:.2f} s: {f['late_crossings']}"
    assert f["unexpected_transitions"] == 0
    assert f["delayed_raised_in_bounds"] > 0 and not f["delayed_wrong"], f["delayed_wrong"]
    assert not f["rule_faults"], f"a rule reported a fault: {f['rule_faults']}"
    assert all(r is not None and r <= RECOVERY_BOUND_S for r in f["recovery_s"]), f["recovery_s"]
    assert f["consumer_notices_clock_back"] >= 1
    if uplink == "away":  # the live lane goes first after the outage: the consumer sees gaps that the backlog fills
        assert f["outage_s"] is not None and f["historical_clock_unset_messages"] > 0
    else:
        assert f["consumer_gaps"] == 0


def test_the_clock_plan_is_a_function_of_the_seed() -> None:
    assert plan_for(7) == plan_for(7) and plan_for(7) != plan_for(8)
    p = plan_for(seed())
    assert 5_000 <= p.back_ms <= 120_000 and 150 <= p.forward_ms <= 900
