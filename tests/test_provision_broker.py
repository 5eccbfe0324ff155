"""The generated password file, ACL and certificates in a real mosquitto, with real clients (aiomqtt):
each node publishes on its own topics only, revoked and wrong credentials are refused at connect."""

from __future__ import annotations

import asyncio
import getpass
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from provisioning.identity import IdentityStore
from provisioning.workflow import Site
from tests.conftest import free_port, wait_port
from tests.firmware_helpers import HostClock, import_firmware

import_firmware()

from simboard import _SockStream  # noqa: E402
from yujing_node.config import Secrets, read_json  # noqa: E402
from yujing_node.mqtt import Client, MQTTError  # noqa: E402

SITE = "xishan"
PREFIX = f"yujing/v1/{SITE}"


@dataclass
class Provisioned:
    site: Site
    store: IdentityStore
    port: int
    tls_port: int
    files: Path
    old_a_password: str  # slope-07's password before its rekey
    old_a_tls: Path  # slope-07's key and certificate before its rekey (the certificate is in the CRL)
    old_c_password: str  # slope-09's, before it was replaced by slope-19

    def password(self, name: str) -> str:
        pw = self.store.password(name)
        assert pw is not None, name
        return pw


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    work = tmp_path_factory.mktemp("provision")
    site = Site(work / "site")
    site.init(SITE, "yujing/v1")
    for dev, serial in (("slope-07", "S7"), ("slope-08", "S8"), ("slope-09", "S9")):
        site.add_node(dev, serial=serial, location="test bench", technician="ci")
    store = site.store
    old_a, old_c = store.password("slope-07"), store.password("slope-09")
    assert old_a and old_c
    old_a_tls = work / "old-slope-07"
    old_a_tls.mkdir()
    for f in ("client.key", "client.crt"):
        (old_a_tls / f).write_bytes((store.folder("slope-07") / f).read_bytes())
    site.rekey("slope-07", technician="ci")
    site.replace("slope-09", "slope-19", serial=None, location=None, technician="ci")
    files = work / "broker"
    site.broker_files(files, server_names=("127.0.0.1",))

    port, tls_port = free_port(), free_port()
    conf = work / "mosquitto.conf"
    # Started as root (CI containers) mosquitto drops to the user "mosquitto", which could not read the 0600
    # files this test's user owns; `user` keeps it as the test's user (no effect when not root).
    # Global auth settings (no per_listener_settings): the password file and ACL apply to both listeners; on
    # the TLS one the certificate's CN is the username and the CRL refuses revoked certificates.
    conf.write_text(
        f"user {getpass.getuser()}\npersistence false\nallow_anonymous false\npassword_file {files / 'passwd'}\nacl_file {files / 'acl'}\n"
        f"listener {port} 127.0.0.1\n"
        f"listener {tls_port} 127.0.0.1\ncafile {files / 'ca.crt'}\ncertfile {files / 'server.crt'}\n"
        f"keyfile {files / 'server.key'}\nrequire_certificate true\nuse_identity_as_username true\n"
        f"crlfile {files / 'crl.pem'}\n"
    )
    log = (work / "mosquitto.log").open("wb")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        pytest.fail("mosquitto is not installed: run scripts/test.sh, which installs it (apt-get install mosquitto)")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_port("127.0.0.1", port)
            wait_port("127.0.0.1", tls_port)
        except TimeoutError:
            log.flush()
            pytest.fail(f"mosquitto did not start with the generated files:\n{(work / 'mosquitto.log').read_text()}")
        yield Provisioned(site, store, port, tls_port, files, old_a, old_a_tls, old_c)
    finally:
        proc.terminate()
        proc.wait(5)
        log.close()


def client(b: Provisioned, user: str, password: str | None = None) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", b.port, username=user,
                          password=b.password(user) if password is None else password, identifier=f"t-{user}",
                          timeout=5)


def tls_client(b: Provisioned, name: str, folder: Path | None = None) -> aiomqtt.Client:
    ctx = ssl.create_default_context(cafile=str(b.files / "ca.crt"))
    folder = folder or b.store.folder(name)
    ctx.load_cert_chain(folder / "client.crt", folder / "client.key")
    return aiomqtt.Client("127.0.0.1", b.tls_port, tls_context=ctx, identifier=f"tls-{name}", timeout=5)


async def receive_until(sub: aiomqtt.Client, marker: str, timeout: float = 5.0) -> list[str]:
    """Topics received up to and including `marker` (published last, by the same client, so everything sent
    before it has been through the broker when it arrives)."""
    seen: list[str] = []

    async def collect() -> None:
        async for msg in sub.messages:
            seen.append(str(msg.topic))
            if str(msg.topic) == marker:
                return

    await asyncio.wait_for(collect(), timeout)
    return seen


async def test_node_publishes_on_its_own_topics_only(broker: Provisioned) -> None:
    async with client(broker, "platform") as sub:
        await sub.subscribe(f"{PREFIX}/#", qos=1)
        async with client(broker, "slope-07") as a:
            await a.publish(f"{PREFIX}/slope-08/data", b"forged", qos=1)  # B's topic: must be dropped
            await a.publish(f"{PREFIX}/slope-08/birth", b"forged", qos=1)
            await a.publish(f"{PREFIX}/slope-07/birth", b"birth", qos=1)
            await a.publish(f"{PREFIX}/slope-07/data", b"reading", qos=1)
        seen = await receive_until(sub, f"{PREFIX}/slope-07/data")
    assert seen == [f"{PREFIX}/slope-07/birth", f"{PREFIX}/slope-07/data"]


async def test_node_receives_its_own_commands_not_another_nodes(broker: Provisioned) -> None:
    async with client(broker, "slope-08") as b_node:
        await b_node.subscribe(f"{PREFIX}/slope-07/cmd", qos=1)  # A's: refused by the ACL
        await b_node.subscribe(f"{PREFIX}/slope-08/cmd", qos=1)
        async with client(broker, "platform") as platform:
            await platform.publish(f"{PREFIX}/slope-07/cmd", b"for A", qos=1)
            await platform.publish(f"{PREFIX}/slope-08/cmd", b"for B", qos=1)
        seen = await receive_until(b_node, f"{PREFIX}/slope-08/cmd")
    assert seen == [f"{PREFIX}/slope-08/cmd"]


async def test_node_cannot_send_commands(broker: Provisioned) -> None:
    async with client(broker, "slope-08") as b_node:
        await b_node.subscribe(f"{PREFIX}/slope-08/cmd", qos=1)
        async with client(broker, "slope-07") as a_node:
            await a_node.publish(f"{PREFIX}/slope-08/cmd", b"forged command", qos=1)
        async with client(broker, "platform") as platform:
            await platform.publish(f"{PREFIX}/slope-08/cmd", b"real", qos=1)
        first = await asyncio.wait_for(anext(aiter(b_node.messages)), 5)
    assert first.payload == b"real"  # the forged command, published before it, never arrived


@pytest.mark.parametrize("who", ["replaced", "rekeyed", "wrong", "unknown"])
async def test_refused_at_connect(broker: Provisioned, who: str) -> None:
    user, password = {
        "replaced": ("slope-09", broker.old_c_password),
        "rekeyed": ("slope-07", broker.old_a_password),
        "wrong": ("slope-08", broker.password("slope-08")[:-1] + "x"),
        "unknown": ("slope-99", "whatever"),
    }[who]
    with pytest.raises(aiomqtt.MqttError, match="[Nn]ot authori[sz]ed"):
        async with client(broker, user, password):
            pass


async def test_current_credentials_are_accepted(broker: Provisioned) -> None:
    for user in ("slope-07", "slope-08", "slope-19", "platform"):
        async with client(broker, user):
            pass


async def test_tls_client_certificate_is_the_identity(broker: Provisioned) -> None:
    """On the TLS listener the certificate's CN is the username the ACL names: A's certificate may publish
    on A's topics and not on B's."""
    async with tls_client(broker, "platform") as sub:
        await sub.subscribe(f"{PREFIX}/#", qos=1)
        async with tls_client(broker, "slope-07") as a:
            await a.publish(f"{PREFIX}/slope-08/data", b"forged", qos=1)
            await a.publish(f"{PREFIX}/slope-07/data", b"reading", qos=1)
        seen = await receive_until(sub, f"{PREFIX}/slope-07/data")
    assert seen == [f"{PREFIX}/slope-07/data"]


async def test_tls_revoked_certificate_is_refused(broker: Provisioned) -> None:
    """slope-07's certificate from before its rekey is in the CRL: the broker ends the handshake."""
    async with tls_client(broker, "slope-07"):
        pass  # the current one is accepted
    with pytest.raises(aiomqtt.MqttError):
        async with tls_client(broker, "slope-07", broker.old_a_tls) as c:
            await c.publish(f"{PREFIX}/slope-07/data", b"x", qos=1)


def firmware_session(b: Provisioned, secrets_file: Path, node: str) -> None:
    """What a node does with the provisioned /secrets.json: the firmware's own config reader and MQTT client
    (under CPython), its will on its death topic, a birth and a data message."""
    s = Secrets(read_json(str(secrets_file)), "/secrets.json")  # unknown keys would be a ConfigError
    c = Client(node.encode(), HostClock(), user=s.mqtt_username.encode(), password=s.mqtt_password.encode(),
               timeout_ms=3000)
    c.set_will(f"{PREFIX}/{node}/death".encode(), b"\xa0")
    c.connect(_SockStream(socket.create_connection(("127.0.0.1", b.port), 5)))
    c.publish(f"{PREFIX}/{node}/birth".encode(), b"\xa0", qos=1, retain=True)
    c.publish(f"{PREFIX}/{node}/data".encode(), b"\xa0", qos=1)
    c.disconnect()


async def test_node_firmware_connects_with_its_provisioned_secrets(broker: Provisioned, tmp_path: Path) -> None:
    async with client(broker, "platform") as sub:
        await sub.subscribe(f"{PREFIX}/slope-08/#", qos=1)
        await asyncio.to_thread(firmware_session, broker, broker.store.folder("slope-08") / "secrets.json", "slope-08")
        seen = await receive_until(sub, f"{PREFIX}/slope-08/data")
    assert seen == [f"{PREFIX}/slope-08/birth", f"{PREFIX}/slope-08/data"]

    stale = tmp_path / "secrets.json"  # slope-07's file from before its rekey, still on an unvisited board
    stale.write_text(json.dumps({"mqtt_username": "slope-07", "mqtt_password": broker.old_a_password}))
    with pytest.raises(MQTTError, match="broker refused the connection: (not authorised|bad user name or password)"):
        await asyncio.to_thread(firmware_session, broker, stale, "slope-07")
