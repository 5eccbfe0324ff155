"""Alarm latency: register change on a gas detector → siren coil written on the relay module.

Prints figures, asserts nothing. Run: .venv/bin/python bench/alarm_bench.py [--trials N]

The detector (unit 11) and the relay module (unit 30) are pymodbus slaves on one RS-485 line made of
two pseudo-terminals at 19200 baud; the gateway polls the detector every `interval` and drives the
siren coil through the same bus scheduler. Each trial raises the gas past the II_ORANGE threshold at a
random moment in the poll cycle, waits for the coil to switch on, lowers the gas and acknowledges.
The latency includes up to one poll interval of waiting for the next poll, by design: report median
and p99, with the uplink up (mosquitto) and down (no broker at all).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import free_port, start_mosquitto  # noqa: E402
from gateway.app import Gateway  # noqa: E402
from gateway.config import parse  # noqa: E402
from gateway.rules import Level  # noqa: E402
from gateway.sim.devices import SimServer, SimSlave  # noqa: E402
from gateway.sim.ptybridge import PtyBridge  # noqa: E402

SITE = """
[site]
id = "BENCH-03"
gateway = "gw"
[uplink]
host = "127.0.0.1"
port = {broker}
tls = false
[spool]
path = "{tmp}/spool"
[[buses]]
name = "rs485"
type = "rtu"
port = "{tty}"
baudrate = 19200
timeout_s = 0.2
pause_s = 0.005
[[devices]]
name = "lel1"
bus = "rs485"
unit = 11
interval_s = {interval}
  [[devices.points]]
  name = "conc"
  address = 1
  scale = 0.1
  unit = "%LEL"
[[rules]]
kind = "threshold"
id = "gas.lel1"
point = "lel1.conc"
latch = true
levels = [ {{ level = "II_ORANGE", set = 50, clear = 48 }} ]
[[actions]]
kind = "coil"
name = "siren"
when = {{ rules = ["gas.*"], level = "II_ORANGE" }}
bus = "rs485"
unit = 30
address = 0
"""


async def trials(broker_port: int, tmp: Path, interval: float, n: int, rng: random.Random) -> list[float]:
    bridge = PtyBridge(response_timeout=0.2)
    bridge.start()
    detector, relay = SimSlave(11), SimSlave(30, clock=time.monotonic)
    server = SimServer([detector, relay], serial={"port": bridge.device_port, "baudrate": 19200})
    await server.start()
    cfg = parse(SITE.format(broker=broker_port, tmp=tmp, tty=bridge.gateway_port, interval=interval), "bench.toml", base=tmp)
    point = cfg.devices[0].points[0]
    await server.set_point(11, point, 5)
    gw = Gateway(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    out = []
    try:
        while gw.desk is None or gw.readings < 2:
            await asyncio.sleep(0.05)
        for _ in range(n):
            await asyncio.sleep(rng.uniform(0, interval))
            before = len(relay.coil_writes)
            changed = time.monotonic()
            await server.set_point(11, point, 60)
            while not any(w[1] for w in relay.coil_writes[before:]):
                await asyncio.sleep(0.001)
            out.append(next(w[2] for w in relay.coil_writes[before:] if w[1]) - changed)
            await server.set_point(11, point, 5)
            gw.desk.acknowledge("gas.lel1", "bench")
            while gw.desk.engine.level("gas.lel1") != Level.NONE or await server.coil(30, 0):
                await asyncio.sleep(0.01)  # cleared and the siren off again before the next trial
    finally:
        stop.set()
        await task
        await server.stop()
        bridge.close()
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args()
    import logging

    logging.getLogger("yujing").setLevel(logging.ERROR)  # the alarm log lines are the point of the gateway, not of this bench
    rng = random.Random(3)
    with tempfile.TemporaryDirectory(prefix="yujing-alarm-bench-") as tmp:
        workdir = Path(tmp)
        broker, port = start_mosquitto(workdir)
        try:
            up = await trials(port, workdir / "up", args.interval, args.trials, rng)
        finally:
            broker.terminate()
            broker.wait(5)
        down = await trials(free_port(), workdir / "down", args.interval, args.trials, rng)  # nothing listens there
    for name, xs in (("uplink up", up), ("uplink down", down)):
        print(f"alarm latency, register change → siren coil written, poll every {args.interval:g} s, {name}: "
              f"median {statistics.median(xs) * 1000:.0f} ms, p99 {pct(xs, 99) * 1000:.0f} ms, max {max(xs) * 1000:.0f} ms "
              f"({len(xs)} trials; up to one poll interval is waiting for the next poll)")


if __name__ == "__main__":
    asyncio.run(main())
