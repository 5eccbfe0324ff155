"""systemd integration with a real notify socket: the gateway reports READY=1, sends WATCHDOG=1 while the
safety core is healthy, and withholds it when a poll loop hangs or the event loop is blocked (so systemd
would restart it). And the unit file `yujing service install` writes passes `systemd-analyze verify`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.sim.devices import SimServer, SimSlave
from tests.conftest import free_port

ROOT = Path(__file__).parent.parent

GATEWAY = r"""
import asyncio, sys, time
from pathlib import Path
from device_drivers.drivers.modbus import ModbusDriver
from device_drivers.modbus import ModbusTransport
from gateway.app import Gateway, run_until_signalled
from gateway.config import load

hang, block = Path(sys.argv[2]), Path(sys.argv[3])

class Faulty(ModbusTransport):
    async def read(self, *args):
        if hang.exists():
            await asyncio.Event().wait()   # a transaction that never ends: the poll loop is stuck
        if block.exists():
            block.unlink()
            time.sleep(4)                  # something blocks the whole event loop
        return await super().read(*args)

cfg = load(sys.argv[1])
def driver(bus, devices):
    d = ModbusDriver(bus, devices)
    d.transport = Faulty(bus.name, bus.settings)
    return d

asyncio.run(run_until_signalled(Gateway(cfg, driver_factory=driver)))
"""

SITE = """
[site]
id = "TEST-01"
gateway = "gw1"
[uplink]
host = "127.0.0.1"
port = {broker}
tls = false
[spool]
path = "{state}/spool"
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
port = {modbus}
timeout_s = 0.2
[[devices]]
name = "d"
bus = "plc"
interval_s = 0.2
  [[devices.points]]
  name = "p"
  address = 0
"""


class NotifyListener:
    """What systemd does with $NOTIFY_SOCKET: a datagram socket that collects the messages, with times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        end = time.monotonic() + seconds
        got = []
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            got.append((time.monotonic(), data.decode()))
        self.messages += got
        return got

    def wait_for(self, text: str, timeout: float) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for at, message in self.collect(0.2):
                if text in message:
                    return at
        raise AssertionError(f"no {text!r} within {timeout} s; got {self.messages[-5:]}")

    def close(self) -> None:
        self.sock.close()


def _keepalives(messages: list[tuple[float, str]]) -> list[float]:
    return [at for at, m in messages if "WATCHDOG=1" in m.split("\n")]


async def test_the_watchdog_keep_alive_follows_the_health_of_the_safety_core(mosquitto, tmp_path: Path) -> None:
    port = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", port))
    await server.start()
    (tmp_path / "site.toml").write_text(SITE.format(broker=mosquitto.port, state=tmp_path / "state", modbus=port))
    listener = NotifyListener(tmp_path / "notify.sock")
    hang, block = tmp_path / "hang", tmp_path / "block"
    env = {**os.environ, "NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", GATEWAY, str(tmp_path / "site.toml"), str(hang), str(block)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import asyncio

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, listener.wait_for, "READY=1", 15)
        healthy = await loop.run_in_executor(None, listener.collect, 2.5)
        beats = _keepalives(healthy)
        assert len(beats) >= 4, healthy  # every half interval (0.5 s)
        assert max(b - a for a, b in zip(beats, beats[1:])) < 1.0

        block.touch()  # the event loop is blocked for 4 s: nothing can send a keep-alive
        start = time.monotonic()
        blocked = await loop.run_in_executor(None, listener.collect, 7.0)
        beats = [start, *_keepalives(blocked), time.monotonic()]
        assert max(b - a for a, b in zip(beats, beats[1:])) > 3.0, blocked
        assert len(beats) > 4, blocked  # and it came back

        hang.touch()  # a transaction that never returns: the keep-alive stops once it outlives its bound
        await loop.run_in_executor(None, listener.wait_for, "STATUS=unhealthy: bus plc", 15)
        stuck = await loop.run_in_executor(None, listener.collect, 3.0)
        assert _keepalives(stuck) == [], stuck
        hang.unlink()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        listener.close()
        await server.stop()
    assert any("STOPPING=1" in m for _, m in listener.messages) or proc.returncode is not None


def test_service_install_writes_a_unit_systemd_accepts(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text(SITE.format(broker=1883, state=tmp_path / "state", modbus=502))
    target = tmp_path / "units"
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "service", "install", str(site), "--target", str(target),
                           "--user", "root"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    unit = (target / "yujing.service").read_text()
    for line in ("Type=notify", "WatchdogSec=30", "Restart=always", "NotifyAccess=main", "StartLimitIntervalSec=0",
                 f"ExecStart={sys.executable} -m gateway.cli run {site.resolve()}", f"ReadWritePaths={(tmp_path / 'state').resolve()}"):
        assert line in unit.splitlines(), line
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    verify = subprocess.run(["systemd-analyze", "verify", str(target / "yujing.service")], capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
