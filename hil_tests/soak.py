"""Soak: one real gateway process (`yujing run`) for a long time, network and RS-485 faults drawn continuously from
one seed, its memory and file handles sampled, and every figure summarised per tenth of the run.

The rig: two simulated RTU slaves (unit 1 `radar`, the victim of the line faults; unit 2 `rain`) behind a FaultyLine
(hil_tests/linefault.py), the gateway's `[uplink]` through a FaultProxy (hil_tests/netfault.py) to the session's own
mosquitto, and the platform's consumer, a persistent session on that mosquitto directly. Two fault streams run at
once, each drawn from its own sub-stream of the seed: the network (latency with jitter, a bandwidth cap, abrupt
resets while PUBACKs are held back, half-open links, blackholes) and the line (flipped bits, split replies, late and
doubled replies, noise, the victim disconnected, a wrong UART setting, a second master). Each stream first goes
through all of its classes in a seeded order (so a short soak meets every class once), then draws classes at random,
with clean gaps between; both stop `tail_s` before the end, and the tail is clean. The gateway runs on the system
clock (it is a separate process; no fast clock there): the intervals are short instead (0.5 s polls).

Sampled every `sample_s`: the gateway's resident memory (VmRSS, /proc/PID/status), its open file descriptors
(/proc/PID/fd), its readings counter (yujing_readings_total, scraped from /metrics) and uplink state.

Checks (`SoakResult.problems()`):
- nothing lost: the session's data seqs have no gap, and at every scrape, the readings the gateway had made by then
  (the counter) all arrived (readings with a timestamp up to the scrape's end, by point and timestamp: a reading is
  stamped before it is counted, so this never blames a reading still in its poll);
- duplicates only as the format allows: a repeated seq is byte-identical, no reading under two seqs;
- per point, within each lane (live, historical), readings arrive in time order;
- memory and file handles bounded: the last tenth's highest RSS is at most RSS_GROWTH_BYTES above the first
  tenth's highest, and its most file descriptors at most FD_GROWTH above the first tenth's most;
- the gateway recovers after the last fault: a new message reaches the consumer within NET_RECOVERY_S of the last
  network fault's end, the victim reads good again within RS485_RECOVERY_S of the last line fault's end, and every
  point's last reading is good;
- the gateway process stays up for the whole soak, logs no exception traceback, and stops cleanly on SIGTERM at the end.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from gateway import wire
from gateway.model import Quality
from gateway.sim.devices import SimServer, SimSlave

from . import linefault
from .linefault import FaultyLine
from .netfault import FaultProxy

BAUD = 19200
TIMEOUT_S = 0.1
INTERVAL_S = 0.5
BACKOFF_MAX_S = 1.2  # an offline device's longest wait between probes
KEEPALIVE_S = 5
UPLINK_BACKOFF_MAX_S = 1.0
VICTIM, BYSTANDER = 1, 2
POINTS = {0: ("radar", "gap", VICTIM, 1), 1: ("radar", "temp", VICTIM, 20), 2: ("rain", "total", BYSTANDER, 1),
          3: ("rain", "aux", BYSTANDER, 20)}  # catalogue index → (device, point, unit, register)
VALUES = {0: 1234, 1: 215, 2: 4321, 3: 77}

# The bounds the checks use (see the module docstring).
RSS_GROWTH_BYTES = 8 * 1024 * 1024
FD_GROWTH = 4  # a reconnect in flight holds a socket or two beside the one it replaces
NET_RECOVERY_S = 10.0  # the last network fault's end → a new message at the consumer (keepalive 5 s, backoff ≤ 1 s)
# An offline device is probed at most max(backoff_max_s, interval) apart, at its polling slots: it reads good again
# within ceil(backoff / interval) + 2 slots of a clean line (test_line_faults.py's bound, 2.5 s here). The soak allows
# two such cycles (5 s): once in a 75 s run the first probe after a wrong UART setting (38400 8E1) failed on a clean
# line, and the victim was back 2.98 s after the fault's end (31 such faults in a 20 min soak: at most 1.26 s).
RS485_RECOVERY_S = 2 * (math.ceil(BACKOFF_MAX_S / INTERVAL_S) + 2) * INTERVAL_S

NET_CLASSES = ("latency", "bandwidth", "reset", "half_open", "blackhole")
LINE_CLASSES = ("flip", "split", "late", "twice", "noise", "disconnect", "uart", "rogue")


def parse_duration(text: str) -> float:
    """"90", "90s", "45m", "4h", "1h30m" → seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"soak duration {text!r}: write e.g. 90s, 45m, 4h or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Episode:
    stream: str  # "net" or "rs485"
    kind: str  # the class, e.g. "latency", "flip"
    at_s: float  # start, seconds after the soak's start
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.stream}.{self.kind}"


def _net_params(kind: str, rng: random.Random) -> dict[str, Any]:
    if kind == "latency":
        return {"latency_up_s": round(rng.uniform(0.1, 0.3), 3), "latency_down_s": round(rng.uniform(0.1, 0.3), 3),
                "jitter_s": round(rng.uniform(0.05, 0.15), 3)}
    if kind == "bandwidth":
        return {"bandwidth_bps": float(rng.choice([150, 250, 400]))}
    if kind == "reset":  # PUBACKs held back in the proxy for the episode, then every connection reset
        return {"latency_down_s": round(rng.uniform(0.3, 0.6), 3)}
    return {}


def _line_params(kind: str, rng: random.Random) -> dict[str, Any]:
    if kind == "flip":
        return {"flip_rate": round(rng.uniform(0.3, 0.6), 2)}
    if kind == "split":
        return {"split_rate": round(rng.uniform(0.5, 0.9), 2)}
    if kind == "late":
        return {"late_rate": round(rng.uniform(0.3, 0.6), 2),
                "late_s": (round(TIMEOUT_S * 1.2, 3), round(TIMEOUT_S * 3.5, 3))}
    if kind == "twice":
        return {"twice_rate": round(rng.uniform(0.3, 0.6), 2), "twice_gap_s": (0.002, 0.05)}
    if kind == "noise":
        return {"noise_rate": round(rng.uniform(4.0, 8.0), 1), "noise_before_rate": round(rng.uniform(0.3, 0.6), 2)}
    if kind == "uart":
        return {"baudrate": rng.choice([9600, 38400]), "parity": rng.choice(["N", "E"])}
    if kind == "rogue":
        return {"rogue_rate": round(rng.uniform(2.0, 5.0), 1), "rogue_collide": round(rng.uniform(0.2, 0.5), 2)}
    return {}  # disconnect


def draw_plan(seed: int, duration_s: float, tail_s: float, *, lead_s: float = 4.0) -> list[Episode]:
    """Both streams' episodes, from the seed alone: a function of (seed, duration, tail, the line's classes)."""
    root = random.Random(seed)
    plan: list[Episode] = []
    for stream, classes, params, secs in (("net", NET_CLASSES, _net_params, (2.0, 4.0)),
                                          ("rs485", LINE_CLASSES, _line_params, (2.0, 3.5))):
        rng = random.Random(root.getrandbits(64))
        order = list(classes)
        rng.shuffle(order)
        t = lead_s + rng.uniform(0.0, 1.0)
        i = 0
        while True:
            kind = order[i] if i < len(order) else rng.choice(classes)
            seconds = round(rng.uniform(*secs), 2)
            if t + seconds > duration_s - tail_s:
                break
            plan.append(Episode(stream, kind, round(t, 2), seconds, params(kind, rng)))
            t += seconds + rng.uniform(1.0, 2.5)
            i += 1
    return sorted(plan, key=lambda e: e.at_s)


# ------------------------------------------------------------------------------------------------ the gateway


SITE = """
[site]
id = "HIL-SOAK"
gateway = "soak"

[uplink]
host = "127.0.0.1"
port = {proxy}
tls = false
keepalive_s = {keepalive}
batch_delay_s = 0.1
backoff_min_s = 0.1
backoff_max_s = {uplink_backoff}

[spool]
path = "{tmp}/spool"

[status]
listen = "127.0.0.1:{status}"

[[buses]]
name = "rs485"
type = "rtu"
port = "{tty}"
baudrate = {baud}
timeout_s = {timeout}
pause_s = 0.005
"""


def site_text(proxy: int, status: int, tty: str, tmp: Path) -> str:
    text = SITE.format(proxy=proxy, status=status, tty=tty, tmp=tmp, baud=BAUD, timeout=TIMEOUT_S,
                       keepalive=KEEPALIVE_S, uplink_backoff=UPLINK_BACKOFF_MAX_S)
    for device, unit in (("radar", VICTIM), ("rain", BYSTANDER)):
        text += (f'\n[[devices]]\nname = "{device}"\nbus = "rs485"\nunit = {unit}\ninterval_s = {INTERVAL_S}\n'
                 f'retries = 1\noffline_after = 3\nbackoff_max_s = {BACKOFF_MAX_S}\n')
        for _, (d, point, _, register) in sorted(POINTS.items()):
            if d == device:
                text += f'  [[devices.points]]\n  name = "{point}"\n  address = {register}\n'
    return text


def proc_sample(pid: int) -> tuple[int, int]:
    """(resident bytes, open file descriptors) of a process, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def scrape(port: int) -> dict[str, float]:
    """The gateway's /metrics, summed per family name (labels dropped)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        body = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    out: dict[str, float] = defaultdict(float)
    for line in body.decode(errors="replace").split("\r\n\r\n", 1)[-1].splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name.split("{", 1)[0]] += float(value)
    return dict(out)


# ------------------------------------------------------------------------------------------------ what arrived


@dataclass
class Arrival:
    mono: float
    wall_ms: int
    session: int
    seq: int
    historical: bool
    readings: list[tuple[int, int, int]]  # (point, ts_ms, quality)
    payload: bytes
    new: bool


class Consumer:
    """The platform: a persistent session on the broker itself, every data message stamped on arrival."""

    def __init__(self, port: int, client_id: str = "soak-platform") -> None:
        self.port = port
        self.client_id = client_id
        self.arrivals: list[Arrival] = []
        self.seen: set[tuple[int, int]] = set()
        self.delivered: dict[tuple[int, int], int] = {}  # (point, ts) → quality
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:  # the consumer's own link is not under test: if it drops, it comes back to its session
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier=self.client_id, clean_session=False) as c:
                    await c.subscribe("yujing/v1/#", qos=1)
                    self.ready.set()
                    async for m in c.messages:
                        self.feed(str(m.topic), bytes(m.payload))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.5)

    def feed(self, topic: str, payload: bytes) -> None:
        if wire.parse_topic(topic).kind != "data":
            return
        d = wire.decode_data(payload)
        key = (d.session, d.seq)
        a = Arrival(time.monotonic(), time.time_ns() // 1_000_000, d.session, d.seq, bool(d.historical),
                    [(r.point, r.ts_ms, r.quality) for r in d.readings], payload, key not in self.seen)
        self.seen.add(key)
        for p, ts, q in a.readings:
            self.delivered[(p, ts)] = q
        self.arrivals.append(a)

    def delivered_up_to(self, ts_ms: int) -> int:
        return sum(1 for (_, ts) in self.delivered if ts <= ts_ms)


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class Sample:
    t: float  # seconds since the soak began
    rss: int
    fds: int
    readings: float | None  # yujing_readings_total (None: the scrape failed)
    scrape_end_ms: int | None
    connected: float | None


@dataclass
class Applied:
    episode: Episode
    began: float  # monotonic
    ended: float
    ended_ms: int  # wall clock at the end
    recovery_s: float | None = None


@dataclass
class SoakResult:
    seed: int
    duration_s: float
    plan: list[Episode]
    applied: list[Applied]
    samples: list[Sample]
    consumer: Consumer
    mono0: float
    wall0_ms: int
    returncode: int | None
    stop_s: float | None
    log_path: Path
    figures: dict[str, Any] = field(default_factory=dict)
    tenths: list[dict[str, Any]] = field(default_factory=list)

    def problems(self) -> list[str]:
        f = self.figures
        out = []
        if f["lost"]:
            out.append(f"{f['lost']} readings lost (the counter ran ahead of what arrived by {f['lost']}, "
                       f"at t={f['lost_at_s']} s)")
        if f["seq_gaps"]:
            out.append(f"data seqs never delivered: {f['seq_gaps'][:10]}")
        if f["duplicate_seqs_not_identical"]:
            out.append(f"repeated seqs with different bytes: {f['duplicate_seqs_not_identical'][:10]}")
        if f["readings_under_two_seqs"]:
            out.append(f"{f['readings_under_two_seqs']} readings under two seqs")
        if f["out_of_order"]:
            out.append(f"{f['out_of_order']} readings out of order within a lane")
        if f["rss_growth_bytes"] > RSS_GROWTH_BYTES:
            out.append(f"RSS grew {f['rss_growth_bytes'] / 2**20:.1f} MiB from the first tenth to the last "
                       f"(bound {RSS_GROWTH_BYTES / 2**20:.0f} MiB)")
        if f["fd_growth"] > FD_GROWTH:
            out.append(f"open file descriptors grew by {f['fd_growth']} (bound {FD_GROWTH})")
        never = [a.episode.name for a in self.applied if a.recovery_s is None]
        if never:
            out.append(f"never recovered after: {never}")
        for stream, bound in (("net", NET_RECOVERY_S), ("rs485", RS485_RECOVERY_S)):
            last = f["last_fault_recovery_s"].get(stream)
            if last is not None and last > bound:
                out.append(f"after the last {stream} fault the gateway took {last} s to recover (bound {bound} s)")
        if f["last_readings_not_good"]:
            out.append(f"points whose last reading is not good at the end: {f['last_readings_not_good']}")
        if f["gateway_tracebacks"]:
            out.append(f"{f['gateway_tracebacks']} exception tracebacks in the gateway's log {self.log_path}")
        if self.returncode is not None:
            out.append(f"the gateway process exited during the soak (code {self.returncode}); see {self.log_path}")
        if f["gateway_exit"] != 0:
            out.append(f"the gateway did not stop cleanly on SIGTERM (exit {f['gateway_exit']}); see {self.log_path}")
        return out

    def report(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "duration_s": self.duration_s,
            "bounds": {"rss_growth_bytes": RSS_GROWTH_BYTES, "fd_growth": FD_GROWTH, "net_recovery_s": NET_RECOVERY_S,
                       "rs485_recovery_s": RS485_RECOVERY_S},
            "rig": {"interval_s": INTERVAL_S, "baud": BAUD, "timeout_s": TIMEOUT_S, "keepalive_s": KEEPALIVE_S,
                    "points": len(POINTS), "line_classes": list(LINE_CLASSES), "net_classes": list(NET_CLASSES)},
            "faults": [{"fault": a.episode.name, **_plain(a.episode.params),
                        "began_s": round(a.began - self.mono0, 3), "ended_s": round(a.ended - self.mono0, 3),
                        "recovery_s": a.recovery_s} for a in self.applied],
            "figures": self.figures,
            "tenths": self.tenths,
            "samples": [dataclasses.asdict(s) for s in self.samples],
            "gateway_log": str(self.log_path),
        }


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as JSON has them (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = sorted(values)
    return {"n": len(v), "p50": round(v[len(v) // 2], 3), "p99": round(v[min(len(v) - 1, int(0.99 * len(v)))], 3),
            "max": round(v[-1], 3)}


class Soak:
    def __init__(self, broker_port: int, workdir: Path, *, seed: int, duration_s: float, tail_s: float = 10.0,
                 sample_s: float | None = None, log_path: Path | None = None) -> None:
        self.broker_port = broker_port
        self.workdir = workdir
        self.seed = seed
        self.duration_s = duration_s
        self.tail_s = tail_s
        self.sample_s = sample_s or min(5.0, max(1.0, duration_s / 40))
        self.plan = draw_plan(seed, duration_s, tail_s)
        self.log_path = log_path or workdir / "gateway.log"
        self.applied: list[Applied] = []
        self.samples: list[Sample] = []

    async def run(self) -> SoakResult:
        from tests.conftest import free_port

        self.workdir.mkdir(parents=True, exist_ok=True)
        line = FaultyLine(seed=self.seed, baudrate=BAUD)
        line.start()
        server = SimServer([SimSlave(VICTIM), SimSlave(BYSTANDER)], serial={"port": line.device_port, "baudrate": BAUD})
        await server.start()
        consumer = Consumer(self.broker_port)
        consuming = asyncio.create_task(consumer.run())
        proc = None
        returncode = stop_s = None
        mono0, wall0_ms = time.monotonic(), time.time_ns() // 1_000_000
        try:
            await asyncio.wait_for(consumer.ready.wait(), 10)
            async with FaultProxy(upstream=("127.0.0.1", self.broker_port), seed=self.seed) as proxy:
                status = free_port()
                site = self.workdir / "soak.toml"
                site.write_text(site_text(proxy.port, status, line.gateway_port, self.workdir))
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log_path, "wb") as log:  # noqa: ASYNC230 (a local file, once, before anything runs)
                    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", "run", str(site),
                                                                stdout=log, stderr=log)
                cfg_points = _point_specs(site)
                for i, (_, _, unit, _) in POINTS.items():
                    await server.set_raw(unit, cfg_points[i], VALUES[i])
                await self._ready(proc, status)  # the soak's clock starts with a running gateway, not an importing one
                mono0, wall0_ms = time.monotonic(), time.time_ns() // 1_000_000
                sampler = asyncio.create_task(self._sample(proc.pid, status, mono0))
                try:
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._drive([e for e in self.plan if e.stream == "net"], proxy, line, mono0))
                        tg.create_task(self._drive([e for e in self.plan if e.stream == "rs485"], proxy, line, mono0))
                    await asyncio.sleep(max(0.0, mono0 + self.duration_s - time.monotonic()))
                    returncode = proc.returncode  # None: it stayed up all along (it is not restarted by anything here)
                    final = await self._final_sample(proc.pid, status, mono0)
                finally:
                    sampler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampler
                # Everything counted by the last scrape must arrive (the link has been clean for tail_s).
                if final.readings is not None and final.scrape_end_ms is not None:
                    deadline = time.monotonic() + 30
                    while (consumer.delivered_up_to(final.scrape_end_ms) < final.readings
                           and time.monotonic() < deadline):
                        await asyncio.sleep(0.1)
                if proc.returncode is None:
                    t = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), 15)
                    stop_s = round(time.monotonic() - t, 3)
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
            consuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consuming
            await server.stop()
            line.close()
        result = SoakResult(self.seed, self.duration_s, self.plan, self.applied, self.samples, consumer, mono0,
                            wall0_ms, returncode, stop_s, self.log_path)
        analyse(result, None if proc is None else proc.returncode)
        return result

    async def _ready(self, proc: asyncio.subprocess.Process, status: int) -> None:
        """Until the gateway's /metrics shows a poll. A gateway that does not get there fails the soak (an
        AssertionError: not an infrastructure error, which the test makes of other exceptions in the run)."""
        deadline = time.monotonic() + 30
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"the gateway exited with {proc.returncode} at start; see {self.log_path}")
            with contextlib.suppress(OSError, TimeoutError):
                if (await scrape(status)).get("yujing_polls_total"):
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"the gateway did not poll within 30 s of its start; see {self.log_path}")
            await asyncio.sleep(0.2)

    async def _drive(self, episodes: list[Episode], proxy: FaultProxy, line: FaultyLine, mono0: float) -> None:
        for e in episodes:
            await asyncio.sleep(max(0.0, mono0 + e.at_s - time.monotonic()))
            began = time.monotonic()
            if e.stream == "net":
                if e.kind == "half_open":
                    await proxy.half_open(e.seconds)
                elif e.kind == "blackhole":
                    await proxy.blackhole(e.seconds)
                else:
                    proxy.set(**e.params)
                    await asyncio.sleep(e.seconds)
                    if e.kind == "reset":
                        proxy.drop()
                    proxy.reset_all()
            elif e.kind == "disconnect":
                await line.disconnect(e.seconds, units={VICTIM})
            else:
                params = dict(e.params)
                if e.kind == "uart":
                    params = {"uart": linefault.Uart(params["baudrate"], params["parity"])}
                line.set(units={VICTIM}, **params)
                await asyncio.sleep(e.seconds)
                line.clear()
            self.applied.append(Applied(e, began, time.monotonic(), time.time_ns() // 1_000_000))

    async def _one_sample(self, pid: int, status: int, mono0: float) -> Sample:
        rss, fds = proc_sample(pid)
        t = time.monotonic() - mono0
        try:
            m = await scrape(status)
            end_ms = time.time_ns() // 1_000_000
            return Sample(round(t, 3), rss, fds, m.get("yujing_readings_total"), end_ms,
                          m.get("yujing_uplink_connected"))
        except (OSError, TimeoutError):
            return Sample(round(t, 3), rss, fds, None, None, None)

    async def _sample(self, pid: int, status: int, mono0: float) -> None:
        while True:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                self.samples.append(await self._one_sample(pid, status, mono0))
            await asyncio.sleep(self.sample_s)

    async def _final_sample(self, pid: int, status: int, mono0: float) -> Sample:
        try:
            s = await self._one_sample(pid, status, mono0)
        except (FileNotFoundError, ProcessLookupError):  # the gateway is gone (the checks say so)
            return Sample(round(time.monotonic() - mono0, 3), 0, 0, None, None, None)
        self.samples.append(s)
        return s


def _point_specs(site: Path) -> dict[int, Any]:
    from gateway.config import load

    cfg = load(site)
    specs = {}
    for i, (device, point, _, _) in POINTS.items():
        d = next(x for x in cfg.devices if x.name == device)
        specs[i] = next(p for p in d.points if p.name == point)
    return specs


def analyse(r: SoakResult, exit_code: int | None) -> None:
    c = r.consumer
    arrivals = c.arrivals
    new = [a for a in arrivals if a.new]
    # Seq gaps per session; repeated seqs byte-identical; a reading under one seq only.
    by_seq: dict[tuple[int, int], list[Arrival]] = defaultdict(list)
    for a in arrivals:
        by_seq[(a.session, a.seq)].append(a)
    gaps = []
    for session in sorted({s for s, _ in by_seq}):
        seqs = {q for s, q in by_seq if s == session}
        gaps += [(session, q) for q in range(1, max(seqs) + 1) if q not in seqs]
    not_identical = sorted(k for k, v in by_seq.items() if len({a.payload for a in v}) > 1)
    under: dict[tuple[int, int], set[tuple[int, int]]] = defaultdict(set)
    for a in arrivals:
        for p, ts, _ in a.readings:
            under[(p, ts)].add((a.session, a.seq))
    two_seqs = sum(1 for v in under.values() if len(v) > 1)
    last: dict[tuple[bool, int], int] = {}
    disorder = 0
    for a in new:
        for p, ts, _ in a.readings:
            key = (a.historical, p)
            if key in last and ts <= last[key]:
                disorder += 1
            last[key] = max(ts, last.get(key, ts))
    # Loss: at each scrape, every reading counted by then must have arrived.
    ts_sorted = sorted(ts for (_, ts) in c.delivered)
    deficits = []
    for s in r.samples:
        if s.readings is not None and s.scrape_end_ms is not None:
            deficits.append((s.t, int(s.readings) - bisect.bisect_right(ts_sorted, s.scrape_end_ms)))
    worst = max(deficits, key=lambda d: d[1], default=(None, 0))
    # Recovery per episode (bisected: a long soak has thousands of episodes).
    new_mono = [a.mono for a in new]  # in arrival order, so sorted
    victims = {i for i, (_, _, unit, _) in POINTS.items() if unit == VICTIM}
    victim_good = sorted(ts for (p, ts), q in c.delivered.items() if p in victims and q == Quality.GOOD)
    for ap in r.applied:
        if ap.episode.stream == "net":
            i = bisect.bisect_right(new_mono, ap.ended)
            ap.recovery_s = None if i == len(new_mono) else round(new_mono[i] - ap.ended, 3)
        else:
            i = bisect.bisect_left(victim_good, ap.ended_ms)
            ap.recovery_s = None if i == len(victim_good) else round((victim_good[i] - ap.ended_ms) / 1000, 3)
    last_recovery = {}
    for stream in ("net", "rs485"):
        mine = [a for a in r.applied if a.episode.stream == stream]
        if mine:
            last_recovery[stream] = mine[-1].recovery_s
    final_quality = {}
    for (p, ts), q in c.delivered.items():
        if p not in final_quality or ts > final_quality[p][0]:
            final_quality[p] = (ts, q)
    not_good = sorted(f"{POINTS[p][0]}.{POINTS[p][1]}" for p, (_, q) in final_quality.items() if q != Quality.GOOD)
    # Latency: reading → consumer, first arrivals.
    lat = [(ts, (a.wall_ms - ts) / 1000) for a in new for _, ts, _ in a.readings]
    # Memory and handles, per tenth.
    tenth = r.duration_s / 10
    rows = []
    for k in range(10):
        t0, t1 = k * tenth, (k + 1) * tenth
        w0, w1 = r.wall0_ms + t0 * 1000, r.wall0_ms + t1 * 1000
        ss = [s for s in r.samples if t0 <= s.t < t1 or (k == 9 and s.t >= t1)]
        counted = [s.readings for s in r.samples if s.readings is not None and s.t < t1]
        before = [s.readings for s in r.samples if s.readings is not None and s.t < t0]
        d_end = [d for t, d in deficits if t < t1]
        d_start = [d for t, d in deficits if t < t0]
        ll = [x for ts, x in lat if w0 <= ts < w1]
        rows.append({
            "from_s": round(t0, 1), "to_s": round(t1, 1),
            "rss_max_mib": round(max((s.rss for s in ss), default=0) / 2**20, 2),
            "fds_max": max((s.fds for s in ss), default=0),
            "polled": int((counted[-1] if counted else 0) - (before[-1] if before else 0)),
            "delivered": bisect.bisect_left(ts_sorted, w1) - bisect.bisect_left(ts_sorted, w0),
            "lost": max(0, max(d_end, default=0)) - max(0, max(d_start, default=0)),
            "duplicates": sum(1 for a in arrivals if not a.new and r.mono0 + t0 <= a.mono < r.mono0 + t1),
            "latency_s": percentiles(ll),
            "faults": [a.episode.name for a in r.applied if t0 <= a.began - r.mono0 < t1],
        })
    r.tenths = rows
    first = [s for s in r.samples if s.t < tenth]
    lastw = [s for s in r.samples if s.t >= r.duration_s - tenth]
    per_class: dict[str, dict[str, Any]] = {}
    for ap in r.applied:
        pc = per_class.setdefault(ap.episode.name, {"count": 0, "recovery_s": []})
        pc["count"] += 1
        pc["recovery_s"].append(ap.recovery_s)
    for pc in per_class.values():
        rec = [x for x in pc["recovery_s"] if x is not None]
        pc["max_recovery_s"] = max(rec, default=None)
    all_lat = percentiles([x for _, x in lat])
    r.figures = {
        "readings_polled": int(max((s.readings for s in r.samples if s.readings is not None), default=0)),
        "readings_delivered": len(c.delivered),
        "lost": max(0, worst[1]),
        "lost_at_s": worst[0],
        "seq_gaps": gaps[:50],
        "messages": len(arrivals),
        "duplicates": len(arrivals) - len(new),
        "duplicate_seqs_not_identical": not_identical[:20],
        "readings_under_two_seqs": two_seqs,
        "out_of_order": disorder,
        "latency_s": all_lat,
        "latency_p50_s": all_lat["p50"] if all_lat else None,
        "latency_p99_s": all_lat["p99"] if all_lat else None,
        "recovery_s": max((a.recovery_s for a in r.applied if a.recovery_s is not None), default=None),
        "recovery_by_fault": per_class,
        "last_fault_recovery_s": last_recovery,
        "last_readings_not_good": not_good,
        "rss_first_tenth_max_mib": round(max((s.rss for s in first), default=0) / 2**20, 2),
        "rss_last_tenth_max_mib": round(max((s.rss for s in lastw), default=0) / 2**20, 2),
        "rss_growth_bytes": max((s.rss for s in lastw), default=0) - max((s.rss for s in first), default=0),
        "fds_first_tenth_max": max((s.fds for s in first), default=0),
        "fds_last_tenth_max": max((s.fds for s in lastw), default=0),
        "fd_growth": max((s.fds for s in lastw), default=0) - max((s.fds for s in first), default=0),
        "samples": len(r.samples),
        "faults_applied": len(r.applied),
        "gateway_exit": exit_code,
        "gateway_stop_s": r.stop_s,
        "gateway_tracebacks": _count_tracebacks(r.log_path),
    }


def _count_tracebacks(path: Path) -> int:
    try:
        return path.read_text(errors="replace").count("Traceback (most recent call last)")
    except OSError:
        return 0


def table(result: SoakResult) -> str:
    f = result.figures
    rows = [(f"HIL soak, seed {result.seed}, {result.duration_s:.0f} s, {f['faults_applied']} faults, "
             f"{f['samples']} samples"),
            (f"{'tenth':>11} {'RSS MiB':>8} {'fds':>4} {'polled':>7} {'deliv':>6} {'lost':>5} {'dups':>5} "
             f"{'lat p50':>8} {'lat p99':>8}  faults begun")]
    for row in result.tenths:
        lt = row["latency_s"] or {}
        rows.append(f"{row['from_s']:>5.0f}-{row['to_s']:<5.0f} {row['rss_max_mib']:>8.2f} {row['fds_max']:>4} "
                    f"{row['polled']:>7} {row['delivered']:>6} {row['lost']:>5} {row['duplicates']:>5} "
                    f"{lt.get('p50', '-'):>8} {lt.get('p99', '-'):>8}  {', '.join(row['faults'])}")
    rows.append(f"lost {f['lost']}, seq gaps {len(f['seq_gaps'])}, duplicates {f['duplicates']} "
                f"(not identical {len(f['duplicate_seqs_not_identical'])}), RSS growth "
                f"{f['rss_growth_bytes'] / 2**20:.2f} MiB, fd growth {f['fd_growth']}, last recovery "
                f"{f['last_fault_recovery_s']}, stop {f['gateway_stop_s']} s (exit {f['gateway_exit']})")
    for name, pc in sorted(f["recovery_by_fault"].items()):
        rec = sorted(x for x in pc["recovery_s"] if x is not None)
        never = len(pc["recovery_s"]) - len(rec)
        rows.append(f"  {name:<16} x{pc['count']:<4} recovery s: median "
                    + (f"{rec[len(rec) // 2]:.2f}, max {rec[-1]:.2f}" if rec else "-")
                    + (f", NEVER {never}" if never else ""))
    return "\n".join(rows)


def write(result: SoakResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.report(), indent=2, default=str))
