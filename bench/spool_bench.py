"""Backlog benchmark: prints figures, asserts nothing. Run: .venv/bin/python bench/spool_bench.py [--readings N]

1. spooling rate: readings per second appended to the segment log (one record per 50-point poll, each in
   the kernel before the call returns; one fsync at the end), and the log's size per reading;
2. backlog drain: a spool holding N readings (default one million) from an outage, drained by the real
   gateway (`yujing run`, its own process) to mosquitto: readings per second until the spool is empty,
   while the gateway keeps polling a live device;
3. the gateway's resident memory with an empty spool and with the N-reading spool (it must not grow
   with the backlog).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import SIM, free_port, proc_status, site_toml, start_mosquitto, wait_port  # noqa: E402
from bench.gateway_bench import Counter as BaseCounter  # noqa: E402
from gateway.model import PointInfo, Reading  # noqa: E402
from gateway.spool import Spool  # noqa: E402

POINTS = 50


def site(broker: int, modbus: int, spool: Path) -> str:
    return site_toml(broker, modbus, POINTS, 1, spool, site_id="BENCH-02", spool_extra="max_bytes = 2000000000")


def fill(path: Path, n: int) -> float:
    s = Spool(path, max_bytes=2_000_000_000)
    session = s.start_session([PointInfo("d", f"r{i}", "", "uint16") for i in range(POINTS)], 0)
    t0 = time.perf_counter()
    ts = 1_780_000_000_000
    for k in range(n // POINTS):
        s.append(session, [Reading(i, ts + k * 60_000, (k * 7 + i) % 65536) for i in range(POINTS)])
    rate = n / (time.perf_counter() - t0)
    s.close()
    return rate


async def measure(broker: int, modbus: int, workdir: Path, spool: Path, n: int) -> dict[str, float]:
    """Run the gateway on `spool` until the broker has delivered n backlog readings (or 10 s when n = 0)."""
    site_file = workdir / f"site-{spool.stem}.toml"
    site_file.write_text(site(broker, modbus, spool))
    counter = Counter(broker)
    ctask = asyncio.create_task(counter.run())
    await counter.ready.wait()
    gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", str(site_file)], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    rss_peak = 0.0
    done_at = None
    try:
        while time.monotonic() - t0 < 1800:
            await asyncio.sleep(0.5)
            rss_peak = max(rss_peak, int(proc_status(gw.pid)["VmRSS"].split()[0]) / 1024)
            if n == 0 and time.monotonic() - t0 > 10:
                break
            if n and counter.historical >= n:
                done_at = time.monotonic()
                break
        rss_end = int(proc_status(gw.pid)["VmRSS"].split()[0]) / 1024
    finally:
        gw.terminate()
        gw.wait(10)
        ctask.cancel()
    took = (done_at or time.monotonic()) - t0
    return {"seconds": took, "rate": counter.historical / took if n else 0.0, "rss_peak_mb": rss_peak,
            "rss_end_mb": rss_end, "live": counter.readings - counter.historical, "delivered": counter.historical}


class Counter(BaseCounter):
    """Counts historical (backlog) readings apart from live ones."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.historical = 0

    async def run(self) -> None:
        import aiomqtt

        from gateway import wire

        async with aiomqtt.Client("127.0.0.1", self.port) as c:
            await c.subscribe("yujing/v1/BENCH-02/#", qos=1)
            self.ready.set()
            async for m in c.messages:
                if str(m.topic).endswith("/data"):
                    data = wire.decode_data(bytes(m.payload))
                    self.readings += len(data.readings)
                    if data.historical:
                        self.historical += len(data.readings)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--readings", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="yujing-spool-bench-") as tmp:
        workdir = Path(tmp)
        broker, port = start_mosquitto(workdir)
        modbus = free_port()
        sim = subprocess.Popen([sys.executable, "-c", SIM, str(modbus), str(POINTS)], cwd=ROOT)
        try:
            wait_port(modbus)
            rate = fill(workdir / "full", args.readings)
            size = sum(f.stat().st_size for f in (workdir / "full").iterdir() if f.name.startswith("seg-"))
            print(f"spooling: {rate:,.0f} readings/s appended in 50-reading polls; "
                  f"{args.readings:,} readings = {size / 1e6:.1f} MB on disk ({size / args.readings:.1f} B/reading)")
            empty = await measure(port, modbus, workdir, workdir / "empty", 0)
            print(f"gateway with an empty spool: RSS {empty['rss_end_mb']:.1f} MB (peak {empty['rss_peak_mb']:.1f} MB)")
            full = await measure(port, modbus, workdir, workdir / "full", args.readings)
            print(f"backlog drain of {args.readings:,} readings to mosquitto (QoS 1, while polling live): "
                  f"{full['seconds']:.1f} s, {full['rate']:,.0f} readings/s; RSS peak {full['rss_peak_mb']:.1f} MB, "
                  f"at the end {full['rss_end_mb']:.1f} MB; {full['live']:,} live readings delivered meanwhile")
        finally:
            sim.kill()
            broker.terminate()
            broker.wait(5)


if __name__ == "__main__":
    asyncio.run(main())
