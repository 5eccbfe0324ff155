"""Rigs: where the devices under test come from. `simulated_rig` builds one here; a real bench is a site file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import Config, load, parse
from gateway.sim.devices import SimServer, SimSlave, site_value
from gateway.sim.ptybridge import PtyBridge

SIM_SITE = """
[site]
id = "HIL-SIM"
gateway = "rig"
[uplink]
host = "127.0.0.1"
port = {broker}
tls = false
batch_delay_s = 0.1
backoff_min_s = 0.1
[spool]
path = "{tmp}/spool"
[status]
listen = "127.0.0.1:0"
[[buses]]
name = "rs485"
type = "rtu"
port = "{tty}"
baudrate = 9600
timeout_s = 0.3
pause_s = 0.01
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
port = {modbus}
[[devices]]
name = "radar"
bus = "rs485"
unit = 1
interval_s = 0.5
  [[devices.points]]
  name = "gap"
  address = 1
  unit = "mm"
[[devices]]
name = "rain"
bus = "rs485"
unit = 2
interval_s = 0.5
  [[devices.points]]
  name = "total"
  address = 0
  type = "uint32"
  scale = 0.1
  unit = "mm"
[[devices]]
name = "midas"
bus = "plc"
unit = 1
interval_s = 0.5
  [[devices.points]]
  name = "conc"
  address = 2
  type = "float32"
  word_order = "little"
  unit = "ppm"
"""


@dataclass
class Rig:
    config: Config
    site_text: str
    simulated: bool
    skip_devices: set[str] = field(default_factory=set)


def _with_local_uplink(text: str, broker_port: int, tmp: Path) -> str:
    """Point a bench's site file at the test broker, and its spool at a scratch file."""
    out = []
    skipping = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            skipping = stripped in ("[uplink]", "[spool]", "[status]")
        if not skipping:
            out.append(line)
    out.append(f'[uplink]\nhost = "127.0.0.1"\nport = {broker_port}\ntls = false\nbatch_delay_s = 0.1\n')
    out.append(f'[spool]\npath = "{tmp / "spool"}"\n')
    out.append('[status]\nlisten = "127.0.0.1:0"\n')  # a port of its own: the bench's gateway may run beside
    return "\n".join(out)


@contextlib.asynccontextmanager
async def rig(broker_port: int, tmp: Path, site: Path | None = None) -> AsyncIterator[Rig]:
    """`site`: a bench's site file (hil_tests/targets.py); None: $YUJING_HIL_SITE if set, else the simulated rig."""
    bench = str(site) if site is not None else os.environ.get("YUJING_HIL_SITE")
    skip = {s for s in os.environ.get("YUJING_HIL_SKIP_DEVICES", "").split(",") if s}
    if bench:
        text = _with_local_uplink(Path(bench).read_text(), broker_port, tmp)
        load(Path(bench))  # the bench file itself must be valid as it stands
        yield Rig(parse(text, bench, base=Path(bench).parent), text, simulated=False, skip_devices=skip)
        return
    from tests.conftest import free_port

    bridge = PtyBridge()
    bridge.start()
    modbus = free_port()
    text = SIM_SITE.format(broker=broker_port, tmp=tmp, tty=bridge.gateway_port, modbus=modbus)
    cfg = parse(text, "hil-sim.toml", base=tmp)
    rtu = SimServer([SimSlave(1), SimSlave(2)], serial={"port": bridge.device_port, "baudrate": 9600})
    tcp = SimServer([SimSlave(1)], tcp=("127.0.0.1", modbus))
    await rtu.start()
    await tcp.start()
    import random

    rng = random.Random(3)
    servers = {"rs485": rtu, "plc": tcp}
    for d in cfg.devices:
        for p in d.points:
            await servers[d.bus].set_point(d.unit, p, site_value(d, p, 0.0, rng))
    try:
        yield Rig(cfg, text, simulated=True)
    finally:
        await rtu.stop()
        await tcp.stop()
        bridge.close()
