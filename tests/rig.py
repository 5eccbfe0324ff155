"""A gas detector and a relay module on one Modbus TCP server (real pymodbus), with the site file that
wires them: a latched gas rule, a siren coil at orange. Tests break one stage of the gateway and then
measure what matters — register change → siren coil written — against the poll interval."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from device_drivers.registers import PointSpec
from gateway.config import Config
from gateway.sim.devices import SimServer, SimSlave
from tests.conftest import free_port

from .e2e import site

INTERVAL_S = 0.5
# A CI machine with two cores and a busy neighbour: the write after the poll that saw the gas may take a
# little longer than on a quiet one. The latency is still measured against the interval, not a constant.
SLACK_S = 0.35

GAS_SITE = """
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
port = {port}
timeout_s = 0.5

[[devices]]
name = "lel1"
bus = "plc"
unit = 1
interval_s = {interval}
{points}

[[rules]]
kind = "threshold"
id = "gas.lel1"
point = "lel1.conc"
latch = true
levels = [ {{ level = "III_YELLOW", set = 25, clear = 23 }}, {{ level = "II_ORANGE", set = 50, clear = 48 }} ]
{rule_fault}

[[actions]]
kind = "coil"
name = "area.siren"
when = {{ rules = ["gas.*"], level = "II_ORANGE" }}
bus = "plc"
unit = 30
address = 0

[[actions]]
kind = "coil"
name = "area.beacon"
when = {{ rules = ["gas.*"], level = "III_YELLOW" }}
bus = "plc"
unit = 30
address = 1
{extra}
"""

CONC = """
  [[devices.points]]
  name = "conc"
  address = 0
  scale = 0.1
  unit = "%LEL"
{validity}"""

STATUS = """
  [[devices.points]]
  name = "fault"
  address = 1
  type = "bit"
  bit = 0
"""


def gas_config(broker_port: int, tmp_path: Path, modbus_port: int, *, status_first: bool = False, rule_flags: bool = False,
               point_validity: bool = False, uplink_extra: str = "", extra: str = "", interval: float = INTERVAL_S,
               spool_path: Path | None = None) -> Config:
    conc = CONC.format(validity='  fault = { flags = ["fault"] }\n' if point_validity else "")
    points = STATUS + conc if status_first else conc + STATUS
    body = GAS_SITE.format(port=modbus_port, interval=interval, points=points, extra=extra,
                           rule_fault='[rules.fault]\nflags = ["lel1.fault"]' if rule_flags else "")
    cfg = site(broker_port, tmp_path, body, uplink_extra=uplink_extra, reconnect_s=0.5)
    if spool_path is not None:
        from dataclasses import replace

        cfg = replace(cfg, spool=replace(cfg.spool, path=spool_path))
    return cfg


@dataclass
class Rig:
    server: SimServer
    detector: SimSlave
    relay: SimSlave
    port: int

    def point(self, cfg: Config, name: str = "conc") -> PointSpec:
        return next(p for p in cfg.devices[0].points if p.name == name)

    async def gas(self, cfg: Config, value: float) -> None:
        await self.server.set_point(1, self.point(cfg), value)

    async def siren_latency(self, cfg: Config, *, value: float = 55, timeout: float = 10.0) -> float:
        """Raise the gas past orange; seconds until the relay module saw the siren coil switched on."""
        before = len(self.relay.coil_writes)
        changed = time.monotonic()
        await self.gas(cfg, value)
        deadline = changed + timeout
        while time.monotonic() < deadline:
            for address, on, at in self.relay.coil_writes[before:]:
                if address == 0 and on:
                    return at - changed
            await asyncio.sleep(0.01)
        raise AssertionError(f"siren not switched on within {timeout} s of the gas reaching {value} %LEL")


@contextlib.asynccontextmanager
async def gas_rig() -> AsyncIterator[Rig]:
    port = free_port()
    detector, relay = SimSlave(1), SimSlave(30, clock=time.monotonic)
    server = SimServer([detector, relay], tcp=("127.0.0.1", port))
    await server.start()
    try:
        yield Rig(server, detector, relay, port)
    finally:
        await server.stop()


async def until(predicate, timeout: float = 10.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)
