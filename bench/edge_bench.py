"""What a site owner feels, measured on the real gateway (`yujing run`, its own process) with its shipped
defaults: prints figures, asserts nothing.

Per load (10, 100 and ~1,000 readings/s from one pymodbus TCP server, QoS 1 to a real mosquitto):
CPU seconds per 1,000 readings, resident memory, threads, **bytes written to storage per reading**
(`write_bytes` of /proc/PID/io: what the gateway process caused to be written, page-cache writeback
included; the filesystem's own journal is not in it), payload bytes per reading on the wire, **read →
broker latency** (a reading's timestamp against the time the consumer got it, same clock; median and
p95), **exec → first reading at the broker**, and, at 100 readings/s, **broker back → first message**
after a 30 s outage (mosquitto killed and started again on the same port).

With `--before PATH` the same command runs an earlier checkout on the same workload, alternating, and
prints both side by side, so the baseline is measured, not copied:

    git worktree add /tmp/pre12 <commit>
    .venv/bin/python bench/edge_bench.py --before /tmp/pre12 [--seconds 30] [--outage 30] [--repeats 2]

The spool goes to a directory on the machine's real disk (not tmpfs), or --workdir.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import SIM, free_port, proc_cpu, proc_status, site_toml, wait_port  # noqa: E402
from gateway.consumer import Decoder  # noqa: E402

LOADS = {10: (10, 1.0), 100: (100, 1.0), 1000: (100, 0.1)}  # readings/s → (registers, interval)


def proc_io(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = int(v)
    return out


class Broker:
    def __init__(self, workdir: Path, port: int) -> None:
        self.port = port
        self.conf = workdir / f"mosquitto-{port}.conf"
        self.conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@dataclass
class Consumer:
    port: int
    readings: int = 0
    data_bytes: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    first_at: float | None = None  # monotonic time of the first data message
    after: float = 0.0  # only data messages received after this (monotonic) count for first_at
    record: bool = False

    async def run(self) -> None:
        decoder = Decoder()
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier=f"bench-{os.getpid()}") as c:
                    await c.subscribe("yujing/v1/#", qos=1)
                    async for m in c.messages:
                        now_ms, now = time.time() * 1000, time.monotonic()
                        payload = bytes(m.payload)
                        res = decoder.feed(str(m.topic), payload)
                        if not str(m.topic).endswith("/data"):
                            continue
                        if self.first_at is None and now >= self.after:
                            self.first_at = now
                        if self.record:
                            self.readings += len(res.records)
                            self.data_bytes += len(payload)
                            self.latencies_ms += [now_ms - r["ts"] for r in res.records if "ts" in r]
            except aiomqtt.MqttError:
                await asyncio.sleep(0.02)  # the broker is away: try again at once, so our own reconnect is not measured


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


async def run_load(root: Path, workdir: Path, load: int, seconds: float, outage: float | None) -> dict[str, float]:
    registers, interval = LOADS[load]
    broker = Broker(workdir, free_port())
    broker.start()
    modbus = free_port()
    sim = subprocess.Popen([sys.executable, "-c", SIM, str(modbus), str(registers)], cwd=ROOT)
    spool_dir = workdir / f"state-{root.name}-{load}"
    shutil.rmtree(spool_dir, ignore_errors=True)
    spool_dir.mkdir()
    site = spool_dir / "site.toml"
    site.write_text(site_toml(broker.port, modbus, registers, interval, spool_dir / "spool.db"))
    consumer = Consumer(broker.port)
    task = asyncio.create_task(consumer.run())
    result: dict[str, float] = {}
    gw: subprocess.Popen[bytes] | None = None
    try:
        wait_port(modbus)
        await asyncio.sleep(0.5)  # the consumer is subscribed
        consumer.after = started = time.monotonic()
        gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", str(site)], cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while consumer.first_at is None and time.monotonic() - started < 20:
            await asyncio.sleep(0.005)
        result["start_to_first_s"] = (consumer.first_at or float("nan")) - started
        await asyncio.sleep(3.0)  # warm-up
        cpu0, io0 = proc_cpu(gw.pid), proc_io(gw.pid)
        consumer.record = True
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        consumer.record = False
        t1 = time.monotonic()
        cpu1, io1 = proc_cpu(gw.pid), proc_io(gw.pid)
        status = proc_status(gw.pid)
        n = consumer.readings or 1
        result.update({
            "readings_per_s": consumer.readings / (t1 - t0),
            "cpu_s_per_1000": (cpu1 - cpu0) / n * 1000,
            "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
            "threads": int(status["Threads"]),
            "written_per_reading": (io1["write_bytes"] - io0["write_bytes"]) / n,
            "payload_per_reading": consumer.data_bytes / n,
            "latency_median_ms": statistics.median(consumer.latencies_ms) if consumer.latencies_ms else float("nan"),
            "latency_p95_ms": _pct(consumer.latencies_ms, 0.95),
        })
        if outage:
            broker.kill()
            await asyncio.sleep(outage)
            consumer.first_at = None
            broker.start()
            consumer.after = back = time.monotonic()
            while consumer.first_at is None and time.monotonic() - back < 120:
                await asyncio.sleep(0.005)
            result["broker_back_to_first_s"] = (consumer.first_at or float("nan")) - back
    finally:
        if gw is not None:
            gw.send_signal(signal.SIGTERM)
            try:
                gw.wait(10)
            except subprocess.TimeoutExpired:
                gw.kill()
        sim.kill()
        sim.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        broker.kill()
    return result


ROWS = [
    ("cpu_s_per_1000", "CPU-s per 1,000 readings", "{:.4f}"),
    ("rss_mb", "RSS, MB", "{:.1f}"),
    ("threads", "threads", "{:.0f}"),
    ("written_per_reading", "bytes written per reading", "{:.1f}"),
    ("payload_per_reading", "payload bytes per reading", "{:.2f}"),
    ("latency_median_ms", "read → broker median, ms", "{:.1f}"),
    ("latency_p95_ms", "read → broker p95, ms", "{:.1f}"),
    ("start_to_first_s", "exec → first reading, s", "{:.2f}"),
    ("broker_back_to_first_s", "broker back → first message, s", "{:.2f}"),
    ("readings_per_s", "readings/s delivered", "{:.0f}"),
]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, help="an earlier checkout, measured alongside")
    ap.add_argument("--loads", default="10,100,1000")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--outage", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", type=Path, help="where spools go (default: a directory under /var/tmp, on disk)")
    args = ap.parse_args()
    roots = {"after": ROOT} if args.before is None else {"before": args.before.resolve(), "after": ROOT}
    loads = [int(x) for x in args.loads.split(",")]
    base = args.workdir or Path(tempfile.mkdtemp(prefix="yujing-edge-", dir="/var/tmp"))
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for rep in range(args.repeats):
            for load in loads:
                order = list(roots) if rep % 2 == 0 else list(reversed(roots))
                for name in order:
                    r = await run_load(roots[name], base, load, args.seconds, args.outage if load == 100 else None)
                    results.setdefault((name, load), []).append(r)
                    print(f"  {name:>6} {load:>5}/s run {rep + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    print()
    header = f"{'':34}" + "".join(f"{name + ' ' + str(load) + '/s':>16}" for load in loads for name in roots)
    print(header)
    for key, label, fmt in ROWS:
        cells = []
        for load in loads:
            for name in roots:
                runs = results.get((name, load), [])
                values = [r[key] for r in runs if key in r]
                cells.append(fmt.format(statistics.median(values)) if values else "—")
        print(f"{label:34}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    asyncio.run(main())
