"""Gateway benchmark: prints figures, asserts nothing. Run: .venv/bin/python bench/gateway_bench.py [--quick]

1. pipeline throughput on one core: register decode → spool → CBOR encode → QoS 1 publish to mosquitto
   (in-process, no polling), readings per second and CPU seconds per 1,000 readings;
2. the real gateway (`yujing run`, its own process) polling 100 holding registers every 100 ms from a
   pymodbus TCP server (another process), QoS 1 to mosquitto — the ThingsBoard comparison workload:
   CPU seconds per 1,000 readings, threads, resident memory;
3. idle: 10 points at 1 s (10 readings/s): % of one core;
4. resident memory after 60 s with 500 points at 1 s;
5. bytes per reading on the wire, measured on what the broker delivered.

CPU is read from /proc (utime+stime of the gateway process only). Repeats give medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import wire  # noqa: E402
from gateway.consumer import Decoder  # noqa: E402
from gateway.model import PointInfo, Reading  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing on port {port}")


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


SIM = """
import asyncio, sys, random
from gateway.sim.devices import SimServer, SimSlave
async def main(port, count):
    units = range(1, (count + 99) // 100 + 1)
    server = SimServer([SimSlave(u, size=256) for u in units], tcp=("127.0.0.1", port))
    await server.start()
    rng = random.Random(1)
    while True:
        for u in units:
            await server.server.async_setValues(u, 16, 0, [rng.randrange(256, 65536) for _ in range(100)])
        await asyncio.sleep(0.5)
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


def site_toml(broker_port: int, modbus_port: int, points: int, interval: float, spool: Path, *,
              site_id: str = "BENCH-01", spool_extra: str = "") -> str:
    """A bench site: one Modbus TCP server, devices of at most 100 registers each (units 1, 2, …)."""
    per_device = 100
    parts = [f"""
[site]
id = "{site_id}"
gateway = "gw"
[uplink]
host = "127.0.0.1"
port = {broker_port}
tls = false
[spool]
path = "{spool}"
{spool_extra}
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
port = {modbus_port}
"""]
    for d in range(0, points, per_device):
        parts.append(f'[[devices]]\nname = "d{d}"\nbus = "plc"\nunit = {d // per_device + 1}\ninterval_s = {interval}\n')
        for a in range(d, min(points, d + per_device)):
            parts.append(f'  [[devices.points]]\n  name = "r{a}"\n  address = {a - d}\n')
    return "\n".join(parts)


class Counter:
    def __init__(self, port: int) -> None:
        self.port = port
        self.readings = 0
        self.data_bytes = 0
        self.decoder = Decoder()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port) as c:
            await c.subscribe("yujing/v1/#", qos=1)
            self.ready.set()
            async for m in c.messages:
                payload = bytes(m.payload)
                res = self.decoder.feed(str(m.topic), payload)
                if str(m.topic).endswith("/data"):
                    self.readings += len(res.records)
                    self.data_bytes += len(payload)


async def run_gateway_scenario(workdir: Path, broker_port: int, points: int, interval: float, warmup: float, seconds: float,
                               root: Path = ROOT) -> dict[str, float]:
    """`root` is the checkout whose gateway runs (bench/driver_seam.py compares two)."""
    modbus_port = free_port()
    sim = subprocess.Popen([sys.executable, "-c", SIM, str(modbus_port), str(points)], cwd=ROOT)
    spool = workdir / f"spool-{points}-{interval}.db"
    site = workdir / f"site-{points}-{interval}.toml"
    site.write_text(site_toml(broker_port, modbus_port, points, interval, spool))
    counter = Counter(broker_port)
    ctask = asyncio.create_task(counter.run())
    await counter.ready.wait()
    try:
        wait_port(modbus_port)
        gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", str(site)], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await asyncio.sleep(warmup)
            cpu0, n0, t0 = proc_cpu(gw.pid), counter.readings, time.monotonic()
            await asyncio.sleep(seconds)
            cpu1, n1, t1 = proc_cpu(gw.pid), counter.readings, time.monotonic()
            status = proc_status(gw.pid)
        finally:
            gw.terminate()
            gw.wait(10)
    finally:
        sim.kill()
        sim.wait()
        ctask.cancel()
    readings = n1 - n0
    return {
        "readings_per_s": readings / (t1 - t0),
        "cpu_s_per_1000": (cpu1 - cpu0) / readings * 1000 if readings else float("nan"),
        "cpu_pct": (cpu1 - cpu0) / (t1 - t0) * 100,
        "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
        "threads": int(status["Threads"]),
        "bytes_per_reading": counter.data_bytes / counter.readings if counter.readings else float("nan"),
    }


async def pipeline_throughput(workdir: Path, broker_port: int, total: int) -> dict[str, float]:
    """decode → storage (its own thread) → spool → encode → publish, in this process."""
    from decimal import Decimal

    from device_drivers.registers import PointSpec, Table, evaluate
    from gateway.clock import SystemClock
    from gateway.config import UplinkConfig
    from gateway.storage import Storage
    from gateway.uplink.mqtt import Identity, Uplink

    points = [PointSpec(f"r{i}", Table.HOLDING, i, "uint16", scale=Decimal("0.1")) for i in range(100)]
    path = workdir / "pipeline" / "spool"
    shutil.rmtree(path.parent, ignore_errors=True)
    storage = Storage(path)
    storage.bind(asyncio.get_running_loop())
    session = storage.open([PointInfo("d", p.name, "", p.type) for p in points], 0).session
    cfg = UplinkConfig(host="127.0.0.1", port=broker_port, tls=False, batch_max=500, batch_delay_s=0.0, client_id="bench-pipeline")
    uplink = Uplink(cfg, Identity("BENCH-01", "pipe", "bench"), storage, session, SystemClock())
    storage.on_stored = uplink.wake.set
    stop = asyncio.Event()
    words = [[(i * 37) % 65536] for i in range(100)]
    cpu0, t0 = time.process_time(), time.monotonic()
    writer = asyncio.create_task(storage.run())
    task = asyncio.create_task(uplink.run(stop))
    ts = 1_764_390_000_000
    for batch in range(total // 100):
        readings = [Reading(i, ts + batch, *evaluate(points[i], words=words[i])) for i in range(100)]
        storage.append(readings)
        if batch % 10 == 0:
            await asyncio.sleep(0)
    while storage.pending_readings or await storage.call(lambda s: s.backlog() or s.unsent(limit=1)):
        await asyncio.sleep(0.01)
    cpu1, t1 = time.process_time(), time.monotonic()
    stop.set()
    await task
    writer.cancel()
    await storage.close()
    return {"readings_per_s": total / (t1 - t0), "cpu_s_per_1000": (cpu1 - cpu0) / total * 1000, "acked": uplink.acked}


def wire_size() -> float:
    import random

    rng = random.Random(1)
    payload = wire.encode_data(1, 1, [Reading(i, 1_764_390_000_000, rng.randrange(256, 65536)) for i in range(100)])
    return len(payload) / 100


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short runs (for a smoke check, not for figures)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    scale = 0.2 if args.quick else 1.0
    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory(prefix="yujing-bench-") as tmp:
        workdir = Path(tmp)
        broker, port = start_mosquitto(workdir)
        try:
            print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; mosquitto on 127.0.0.1:{port}")
            print(f"wire: 100 random 16-bit readings in one message: {wire_size():.2f} bytes/reading (ThingsBoard JSON: 12.8)")

            runs = [await pipeline_throughput(workdir, port, int(200_000 * scale)) for _ in range(repeats)]
            print(f"pipeline decode→spool→encode→publish (QoS 1, one core): median {statistics.median(r['readings_per_s'] for r in runs):,.0f} readings/s, "
                  f"{statistics.median(r['cpu_s_per_1000'] for r in runs):.4f} CPU-s per 1,000 readings")

            tb = [await run_gateway_scenario(workdir, port, 100, 0.1, 3, 20 * scale) for _ in range(repeats)]
            med = {k: statistics.median(r[k] for r in tb) for k in tb[0]}
            print(f"gateway, 100 registers every 100 ms (TB workload): {med['readings_per_s']:.0f} readings/s delivered, "
                  f"{med['cpu_s_per_1000']:.4f} CPU-s per 1,000 readings (TB 0.077, ratio {med['cpu_s_per_1000'] / 0.077:.2f}), "
                  f"RSS {med['rss_mb']:.1f} MB (TB 64), {med['threads']:.0f} threads (TB 16), "
                  f"{med['bytes_per_reading']:.2f} bytes/reading on the wire")

            idle = [await run_gateway_scenario(workdir, port, 10, 1.0, 3, 30 * scale) for _ in range(repeats)]
            print(f"gateway idle, 10 readings/s: {statistics.median(r['cpu_pct'] for r in idle):.2f} % of a core (TB 4.4 %), "
                  f"RSS {statistics.median(r['rss_mb'] for r in idle):.1f} MB")

            big = await run_gateway_scenario(workdir, port, 500, 1.0, 60 * scale, 5)
            print(f"gateway, 500 points at 1 s, after {60 * scale:.0f} s: RSS {big['rss_mb']:.1f} MB, {big['threads']} threads, "
                  f"{big['cpu_pct']:.1f} % of a core, {big['bytes_per_reading']:.2f} bytes/reading on the wire")
        finally:
            broker.terminate()
            broker.wait(5)


if __name__ == "__main__":
    asyncio.run(main())
