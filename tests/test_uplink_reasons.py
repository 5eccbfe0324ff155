"""A broker that refuses a message (MQTT 5 PUBACK with a failure reason) has not received it: the message
goes to the spool's dead-letter table with the reason, the gateway reports it once, and the rest flows.
Real mosquitto with an ACL that lets this gateway publish everything but data."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.spool import Spool
from gateway.sim.devices import SimServer, SimSlave
from tests.conftest import free_port, wait_port

from .e2e import collecting, running, site

BODY = """
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
port = {port}

[[devices]]
name = "d"
bus = "plc"
interval_s = 0.2
  [[devices.points]]
  name = "p"
  address = 0
"""


@pytest.fixture
def acl_broker(tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    writable = getattr(request, "param", ("birth", "death", "alarm", "alarms", "reply"))
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "gw1", "pw"], check=True, capture_output=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "platform", "pw"], check=True, capture_output=True)
    os.chmod(passwd, 0o600)
    acl = tmp_path / "acl"
    acl.write_text("user gw1\n" + "".join(f"topic write yujing/v1/TEST-01/gw1/{k}\n" for k in writable)
                   + "topic read yujing/v1/TEST-01/gw1/cmd\n\nuser platform\ntopic read yujing/v1/#\n")
    port = free_port()
    conf = tmp_path / "acl.conf"
    conf.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port("127.0.0.1", port)
    yield port
    proc.terminate()
    proc.wait(5)


@contextlib.asynccontextmanager
async def gateway_as_gw1(broker: int, tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway that logs in as gw1 (whom the ACL restricts), polling one simulated Modbus device."""
    modbus = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", modbus))
    await server.start()
    (tmp_path / "pw").write_text("pw")
    os.chmod(tmp_path / "pw", 0o600)
    cfg = site(broker, tmp_path, BODY.format(port=modbus), uplink_extra='username = "gw1"\npassword_file = "pw"')
    try:
        async with running(Gateway(cfg)) as gw:
            yield gw
    finally:
        await server.stop()


async def _until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


async def test_refused_messages_go_to_the_dead_letter_table_with_the_reason(acl_broker: int, tmp_path: Path) -> None:
    async with gateway_as_gw1(acl_broker, tmp_path) as gw:
        await _until(lambda: gw.uplink is not None and gw.uplink.rejected >= 3)
        rejected, acked = gw.uplink.rejected, gw.uplink.acked
        faults = dict(gw.health.faults)
    assert rejected >= 3 and acked >= 1  # births and the alarm event went through, data did not
    assert "uplink.refused.data" in faults and "Not authorized (0x87)" in faults["uplink.refused.data"]
    spool = Spool(gw.config.spool.path)
    letters = spool.dead_letters()
    spool.close()
    assert len(letters) >= 3
    assert all(kind == "data" and "Not authorized (0x87)" in reason for kind, _, _, reason in letters), letters
    # what the technician reads, without sqlite3 or the gateway's lock
    shown = subprocess.run([sys.executable, "-m", "gateway.cli", "dead-letters", str(tmp_path / "site.toml"), "--limit", "2"],
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("data ") and "Not authorized (0x87)" in line for line in lines), lines
    assert f"seq {letters[0][2]}:" in lines[0]  # newest first


@pytest.mark.parametrize("acl_broker", [("data", "death", "alarm", "alarms", "reply")], indirect=True)
async def test_a_refused_birth_is_a_gateway_fault_too(acl_broker: int, tmp_path: Path) -> None:
    """Births, the retained alarm state and replies are not spooled, so they have no dead letter; a broker
    that refuses them must still be seen (it was not: the refusal was dropped, and its record kept)."""
    async with gateway_as_gw1(acl_broker, tmp_path) as gw:
        await _until(lambda: gw.health is not None and "uplink.refused.birth" in gw.health.faults)
        faults = dict(gw.health.faults)
        await _until(lambda: gw.uplink is not None and gw.uplink.acked >= 1)
        acked = gw.uplink.acked
    assert "Not authorized (0x87)" in faults.get("uplink.refused.birth", ""), faults
    assert acked >= 1  # data still flows
