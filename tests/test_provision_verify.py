"""Verifying a node online (provisioning.verify) against a real mosquitto that runs the files `broker-files`
generated (TLS listener with the site CA, password file, ACL). The verifier reads as the platform account over
TLS with its client certificate.

The node here is a stand-in: CPython publishing a genuine birth and data made with gateway.wire (the bytes the
firmware's own encoder produces, tests/test_firmware_cbor.py), with the node's own generated username and password,
because the node firmware does not run under the unix port in these tests yet. The rig (`SiteBroker`,
`publish_as_node`) is reused by tests/test_provision_install.py and tests/test_provision_gateway.py.
"""

from __future__ import annotations

import asyncio
import getpass
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import aiomqtt
import pytest

from gateway import wire
from gateway.model import PointInfo, Reading
from provisioning.verify import BrokerAccess, verify_online
from provisioning.workflow import Site
from tests.conftest import free_port, wait_port

SITE = "xishan"
PREFIX = "yujing/v1"
CATALOGUE = (PointInfo("crack", "opening", "mm", "decimal"), PointInfo("rain", "rain", "mm", "decimal"))


@dataclass
class SiteBroker:
    """mosquitto run with the site's generated broker files: `port` username + password, `tls_port` client
    certificates (CN = username), both under the generated passwd and ACL."""

    site: Site
    files: Path
    port: int
    tls_port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def reload(self) -> None:
        """SIGHUP: mosquitto rereads passwd and acl (what a technician does after broker-files)."""
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)

    def platform(self, *, tls: bool = True) -> BrokerAccess:
        return BrokerAccess.platform(self.site, "127.0.0.1", self.tls_port if tls else self.port, tls=tls)

    def password(self, name: str) -> str:
        pw = self.site.store.password(name)
        assert pw is not None
        return pw

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


def start_site_broker(work: Path, site: Site) -> SiteBroker:
    files = work / "broker"
    site.broker_files(files, server_names=("127.0.0.1",))
    port, tls_port = free_port(), free_port()
    conf = work / "mosquitto.conf"
    # `user`: started as root, mosquitto would drop to "mosquitto", which cannot read the test's 0600 files
    conf.write_text(
        f"user {getpass.getuser()}\npersistence false\nallow_anonymous false\npassword_file {files / 'passwd'}\n"
        f"acl_file {files / 'acl'}\nlistener {port} 127.0.0.1\n"
        f"listener {tls_port} 127.0.0.1\ncafile {files / 'ca.crt'}\ncertfile {files / 'server.crt'}\n"
        f"keyfile {files / 'server.key'}\nrequire_certificate true\nuse_identity_as_username true\n"
        f"crlfile {files / 'crl.pem'}\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        pytest.fail("mosquitto is not installed: run scripts/test.sh, which installs it (apt-get install mosquitto)")
    log = work / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", port)
        wait_port("127.0.0.1", tls_port)
    except TimeoutError:
        proc.terminate()
        pytest.fail(f"mosquitto did not start with the generated files:\n{log.read_text()}")
    return SiteBroker(site, files, port, tls_port, proc, log)


async def publish_as_node(port: int, node_id: str, password: str, *, site: str = SITE, session: int = 7,
                          birth_id: str | None = None, kind: str = "node", data: bool = True,
                          retain_birth: bool = True, ts_ms: int | None = None) -> None:
    """The stand-in node: birth (retained, as the firmware sends it) then one live data message."""
    ts = ts_ms if ts_ms is not None else int(time.time() * 1000)
    async with aiomqtt.Client("127.0.0.1", port, username=node_id, password=password,
                              identifier=f"standin-{node_id}-{session}", timeout=5) as c:
        birth = wire.encode_birth(session=session, ts_ms=ts, site=site, gateway=birth_id or node_id,
                                  software="yujing-node standin", catalogue=CATALOGUE, kind=kind)
        await c.publish(f"{PREFIX}/{SITE}/{node_id}/birth", birth, qos=1, retain=retain_birth)
        if data:
            readings = [Reading(0, ts, Decimal("1.25")), Reading(1, ts, Decimal("0.2"))]
            await c.publish(f"{PREFIX}/{SITE}/{node_id}/data", wire.encode_data(session, 1, readings), qos=1)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteBroker]:
    work = tmp_path_factory.mktemp("verify")
    site = Site(work / "site")
    site.init(SITE, PREFIX)
    for n in ("slope-07", "slope-08"):
        site.add_node(n, serial=f"S-{n}", location="bench", technician="ci")
    b = start_site_broker(work, site)
    yield b
    b.stop()


async def test_online_with_birth_and_first_readings(rig: SiteBroker) -> None:
    async def reboot() -> None:  # what the runner does here: restart the board; the stand-in then comes up
        await publish_as_node(rig.port, "slope-07", rig.password("slope-07"), session=11)

    r = await verify_online(rig.platform(), SITE, "slope-07", timeout_s=10, after_subscribe=reboot)
    print("\n" + r.line())
    assert r.online and r.problem is None, r.problem
    assert r.birth is not None and (r.birth.site, r.birth.gateway, r.birth.kind, r.birth.session) == (
        SITE, "slope-07", "node", 11)
    assert [(x["device"], x["point"], x["value"], x["unit"]) for x in r.readings] == [
        ("crack", "opening", 1.25, "mm"), ("rain", "rain", 0.2, "mm")]
    assert "online" in r.line() and "crack.opening=1.25 mm" in r.line()


async def test_the_retained_birth_of_an_earlier_boot_does_not_count(rig: SiteBroker) -> None:
    # slope-08 came online an hour ago: its birth is retained on the broker; it is not rebooted now
    await publish_as_node(rig.port, "slope-08", rig.password("slope-08"), session=3, data=False,
                          ts_ms=int(time.time() * 1000) - 3_600_000)
    r = await verify_online(rig.platform(), SITE, "slope-08", timeout_s=1.5)
    assert not r.online and r.birth is None
    assert r.problem is not None and r.problem.startswith("no birth within 2 s: check the node's network")
    # without a reboot (`yujing provision verify`), a retained birth after since_ms counts, then live data
    r = await verify_online(rig.platform(), SITE, "slope-08", timeout_s=10, since_ms=0, after_subscribe=lambda: (
        asyncio.run(_data_only(rig, "slope-08", session=3))))
    assert r.online, r.problem


async def _data_only(rig: SiteBroker, node: str, session: int) -> None:
    async with aiomqtt.Client("127.0.0.1", rig.port, username=node, password=rig.password(node), timeout=5) as c:
        await c.publish(f"{PREFIX}/{SITE}/{node}/data", wire.encode_data(session, 2, [Reading(0, 1, 3)]), qos=1)


async def test_a_birth_naming_another_id_is_reported(rig: SiteBroker) -> None:
    # the board carries slope-08's config but slope-07's credentials: its birth on slope-07's topic names slope-08
    async def reboot() -> None:
        await publish_as_node(rig.port, "slope-07", rig.password("slope-07"), birth_id="slope-08", data=False)

    r = await verify_online(rig.platform(), SITE, "slope-07", timeout_s=10, after_subscribe=reboot)
    assert not r.online
    assert r.problem is not None and "names site 'xishan', id 'slope-08'" in r.problem and "node_id" in r.problem


async def test_births_from_other_ids_are_named_when_ours_never_comes(rig: SiteBroker) -> None:
    async def reboot() -> None:  # another board came up meanwhile (a swapped config), ours stays silent
        await publish_as_node(rig.port, "slope-08", rig.password("slope-08"), session=21, data=False)

    r = await verify_online(rig.platform(), SITE, "slope-07", timeout_s=2, after_subscribe=reboot)
    assert not r.online and r.other_births == ["slope-08"]
    assert r.problem is not None and "births seen meanwhile from slope-08" in r.problem


async def test_birth_without_readings_says_so(rig: SiteBroker) -> None:
    async def reboot() -> None:
        await publish_as_node(rig.port, "slope-07", rig.password("slope-07"), session=31, data=False)

    r = await verify_online(rig.platform(), SITE, "slope-07", timeout_s=2, after_subscribe=reboot)
    assert not r.online and r.birth is not None and r.birth.session == 31
    assert r.problem is not None and "birth arrived (session 31, 2 points) but no readings" in r.problem


async def test_a_gateway_kind_is_not_a_node(rig: SiteBroker) -> None:
    async def reboot() -> None:
        await publish_as_node(rig.port, "slope-07", rig.password("slope-07"), session=41, kind="gateway")

    r = await verify_online(rig.platform(), SITE, "slope-07", timeout_s=10, after_subscribe=reboot)
    assert not r.online and r.problem is not None and "kind 'gateway'" in r.problem


async def test_broker_problems_are_told_apart(rig: SiteBroker, tmp_path: Path) -> None:
    nobody = BrokerAccess("127.0.0.1", free_port())
    r = await verify_online(nobody, SITE, "slope-07", timeout_s=3)
    assert not r.online and r.problem is not None and r.problem.startswith("cannot reach the broker at 127.0.0.1")
    wrong = BrokerAccess("127.0.0.1", rig.port, "platform", "not-the-password")
    r = await verify_online(wrong, SITE, "slope-07", timeout_s=3)
    assert not r.online and r.problem is not None and "refused the account 'platform'" in r.problem


def test_cli_verify_reads_the_retained_birth_then_waits_for_data(rig: SiteBroker,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main as yujing

    # slope-08 is up and running (its birth retained); the technician asks later, without a reset
    asyncio.run(publish_as_node(rig.port, "slope-08", rig.password("slope-08"), session=51, data=False))
    stop = threading.Event()

    def sampling() -> None:  # the node's next readings, every half second
        while not stop.wait(0.5):
            asyncio.run(_data_only(rig, "slope-08", session=51))

    t = threading.Thread(target=sampling, daemon=True)
    t.start()
    cli = ["provision", "--site-dir", str(rig.site.root), "verify", "--broker", f"127.0.0.1:{rig.tls_port}"]
    try:
        assert yujing([*cli[:4], "slope-08", *cli[4:], "--timeout", "10"]) == 0
    finally:
        stop.set()
        t.join(5)
    out = capsys.readouterr().out
    assert out.startswith("slope-08: online after") and "session 51" in out
    assert yujing([*cli[:4], "slope-99", *cli[4:], "--timeout", "1"]) == 1
    assert capsys.readouterr().out.startswith("slope-99: NOT online: no birth within 1 s")
    for n in ("slope-07", "slope-08", "platform"):
        assert rig.password(n) not in out
