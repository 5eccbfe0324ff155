"""The soak (hil_tests/soak.py): a short one in CI (YUJING_HIL_SOAK, default 75 s), the long one by command:

    python -m hil_tests --soak 4h [--seed N]

Its report: test-artifacts/hil/soak.json (every sample, every fault, the per-tenth table), the gateway's log
test-artifacts/hil/logs/…/gateway.log, and the figures in the session report.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pytest

from gateway import wire
from gateway.model import Reading

from .report import ARTIFACTS, ScenarioRecord, seed
from .soak import (
    LINE_CLASSES,
    NET_CLASSES,
    Applied,
    Consumer,
    Episode,
    Sample,
    Soak,
    SoakResult,
    analyse,
    draw_plan,
    parse_duration,
    table,
    write,
)

pytestmark = pytest.mark.hil

DURATION_S = parse_duration(os.environ.get("YUJING_HIL_SOAK", "75s"))
TAIL_S = 10.0


@pytest.mark.needs("simulated_devices", "rs485_fault_injection", "network_faults")
@pytest.mark.timeout(2 * DURATION_S + 240)  # a failed soak is run once more (hil_tests/plugin.py)
async def test_soak_loses_nothing_stays_bounded_and_recovers(private_mosquitto, tmp_path: Path,
                                                             hil_report: ScenarioRecord) -> None:
    s = seed()
    hil_report.seed = s
    print(f"\nYUJING_HIL_SEED={s} YUJING_HIL_SOAK={DURATION_S:.0f}s")
    soak = Soak(private_mosquitto.port, tmp_path, seed=s, duration_s=DURATION_S, tail_s=TAIL_S,
                log_path=hil_report.log_path("gateway"))
    with hil_report.infrastructure():
        result = await soak.run()
    write(result, ARTIFACTS / "soak.json")
    hil_report.log("soak", ARTIFACTS / "soak.json")
    for a in result.applied:
        hil_report.fault(a.episode.name, round(a.began - result.mono0, 3), seconds=round(a.ended - a.began, 3),
                         recovery_s=a.recovery_s,
                         **{k: list(v) if isinstance(v, tuple) else v for k, v in a.episode.params.items()})
    f = result.figures
    hil_report.figures.update({k: f[k] for k in (
        "lost", "duplicates", "latency_p50_s", "latency_p99_s", "recovery_s", "readings_polled", "readings_delivered",
        "rss_first_tenth_max_mib", "rss_last_tenth_max_mib", "fds_first_tenth_max", "fds_last_tenth_max",
        "last_fault_recovery_s", "gateway_tracebacks")})
    hil_report.figures["recovery_by_fault"] = {k: v["recovery_s"] for k, v in f["recovery_by_fault"].items()}
    hil_report.figures["tenths"] = result.tenths
    print(table(result))
    assert f["readings_delivered"] > 0, "nothing arrived at all"
    if DURATION_S >= 75:  # this long, the first pass through every class of both streams fits whatever the seed
        every = {f"net.{c}" for c in NET_CLASSES} | {f"rs485.{c}" for c in LINE_CLASSES}
        assert {a.episode.name for a in result.applied} >= every
    problems = result.problems()
    assert not problems, "\n".join(problems)


def test_the_soak_plan_is_a_function_of_the_seed() -> None:
    assert draw_plan(7, 600, 10) == draw_plan(7, 600, 10)
    assert draw_plan(7, 600, 10) != draw_plan(8, 600, 10)
    plan = draw_plan(7, 600, 10)
    assert all(e.at_s + e.seconds <= 600 - 10 for e in plan), "a fault runs into the clean tail"
    for stream in ("net", "rs485"):
        mine = [e for e in plan if e.stream == stream]
        assert all(a.at_s + a.seconds < b.at_s for a, b in itertools.pairwise(mine)), f"{stream} episodes overlap"
    assert {e.kind for e in plan if e.stream == "net"} == set(NET_CLASSES)
    assert {e.kind for e in plan if e.stream == "rs485"} == set(LINE_CLASSES)


def test_durations_parse() -> None:
    assert parse_duration("4h") == 14400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90s") == parse_duration("90") == 90
    with pytest.raises(ValueError, match="4 hours"):
        parse_duration("4 hours")


def _synthetic(tmp_path: Path, *, drop_seq: int | None = None, twin_seq: int | None = None, rss_growth: int = 0,
               fd_growth: int = 0, exit_code: int | None = 0, stuck: bool = False,
               traceback: bool = False) -> SoakResult:
    """A soak's raw material made up: 20 messages of 4 readings (one poll each 0.5 s), samples every second."""
    wall0 = 1_800_000_000_000
    consumer = Consumer(0)
    mono0 = time.monotonic()
    for seq in range(1, 21):
        readings = [Reading(p, wall0 + seq * 500, 1, 0) for p in range(4)]
        if seq != drop_seq:
            consumer.feed("yujing/v1/S/G/data", wire.encode_data(7, seq, readings))
        if seq == twin_seq:
            consumer.feed("yujing/v1/S/G/data", wire.encode_data(7, seq, readings[:3]))
    samples = [Sample(float(t), 30 * 2**20 + (rss_growth if t >= 9 else 0), 10 + (fd_growth if t >= 9 else 0),
                      float(4 * min(20, 2 * t)), wall0 + t * 1000 + 5, 1.0) for t in range(11)]
    log = tmp_path / "gateway.log"
    log.write_text("Traceback (most recent call last):\n" if traceback else "INFO fine\n")
    applied = []
    if stuck:  # a line fault that ends after the last reading: no good reading follows it
        e = Episode("rs485", "disconnect", 9.0, 1.0)
        applied.append(Applied(e, mono0 + 9, mono0 + 10, wall0 + 10_600))
    r = SoakResult(1, 10.0, [], applied, samples, consumer, mono0, wall0, None if exit_code == 0 else exit_code, 0.05,
                   log)
    analyse(r, exit_code)
    return r


def test_the_soak_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """The soak passes only when it should: each made-up fault trips its own check (and a clean run none)."""
    clean = _synthetic(tmp_path)
    assert clean.problems() == [] and clean.figures["lost"] == 0 and clean.figures["readings_delivered"] == 80
    assert [row["polled"] for row in clean.tenths] == [0, 8, 8, 8, 8, 8, 8, 8, 8, 8]
    lost = _synthetic(tmp_path, drop_seq=5).problems()
    assert any("readings lost" in p for p in lost) and any("seqs never delivered: [(7, 5)]" in p for p in lost)
    assert any("different bytes" in p for p in _synthetic(tmp_path, twin_seq=3).problems())
    assert any("RSS grew 9.0 MiB" in p for p in _synthetic(tmp_path, rss_growth=9 * 2**20).problems())
    assert _synthetic(tmp_path, rss_growth=7 * 2**20).problems() == []  # within the bound
    assert any("file descriptors grew by 5" in p for p in _synthetic(tmp_path, fd_growth=5).problems())
    assert any("never recovered after: ['rs485.disconnect']" in p for p in _synthetic(tmp_path, stuck=True).problems())
    assert any("exited during the soak" in p for p in _synthetic(tmp_path, exit_code=-9).problems())
    assert any("tracebacks" in p for p in _synthetic(tmp_path, traceback=True).problems())
