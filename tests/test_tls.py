"""TLS by default: the gateway talks to a real mosquitto TLS listener with a per-device client certificate
and a password file, and a gateway without the client certificate is refused."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
from pathlib import Path

import aiomqtt
import pytest

from gateway.app import Gateway
from gateway.config import parse
from gateway.sim.devices import SimServer, SimSlave
from tests.conftest import free_port, wait_port

from .e2e import running


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make test certificates")
    d = tmp_path / "pki"
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Yujing test CA",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    for name, cn in (("server", "localhost"), ("gw1", "gw1")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n" if name == "server" else "extendedKeyUsage=clientAuth\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
                "-extfile", ext.name, "-out", f"{name}.crt", cwd=d)
    for key in d.glob("*.key"):
        os.chmod(key, 0o600)
    return d


@pytest.fixture
def tls_broker(pki: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    passwd = tmp_path / "mosquitto.passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "gw1", "s3cret-pw"], check=True, capture_output=True)
    os.chmod(passwd, 0o600)
    conf = tmp_path / "tls.conf"
    import getpass

    conf.write_text(
        # run as ourselves: mosquitto started as root would switch to its own user, which cannot read 0600 files
        f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
        f"cafile {pki / 'ca.crt'}\ncertfile {pki / 'server.crt'}\nkeyfile {pki / 'server.key'}\n"
        "require_certificate true\n"
    )
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_port("127.0.0.1", port)
    yield port
    proc.terminate()
    proc.wait(5)


def tls_site(tmp_path: Path, pki: Path, broker: int, modbus: int, *, with_cert: bool) -> str:
    secret = tmp_path / "gw1.pass"
    secret.write_text("s3cret-pw\n")
    os.chmod(secret, 0o600)
    client = f'cert_file = "{pki / "gw1.crt"}"\nkey_file = "{pki / "gw1.key"}"\n' if with_cert else ""
    return f"""
[site]
id = "TLS-01"
gateway = "gw1"
[uplink]
host = "127.0.0.1"
port = {broker}
username = "gw1"
password_file = "{secret}"
ca_file = "{pki / 'ca.crt'}"
{client}backoff_min_s = 0.2
backoff_max_s = 0.5
[spool]
path = "{tmp_path / ('spool-%s.db' % with_cert)}"
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
port = {modbus}
[[devices]]
name = "d"
bus = "plc"
interval_s = 0.2
  [[devices.points]]
  name = "a"
  address = 0
"""


async def test_gateway_over_tls_with_client_certificate_and_password(tls_broker: int, pki: Path, tmp_path: Path, caplog) -> None:
    modbus = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", modbus))
    await server.start()
    caplog.set_level("DEBUG", logger="yujing")
    try:
        good = parse(tls_site(tmp_path, pki, tls_broker, modbus, with_cert=True), "tls.toml", base=tmp_path)
        assert good.uplink.tls  # the default
        async with running(Gateway(good)) as gw:
            ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            ctx.load_cert_chain(str(pki / "gw1.crt"), str(pki / "gw1.key"))
            async with aiomqtt.Client("127.0.0.1", tls_broker, username="gw1", password="s3cret-pw", tls_context=ctx,
                                      identifier="tls-test-consumer") as client:
                await client.subscribe("yujing/v1/TLS-01/gw1/data", qos=1)
                async with asyncio.timeout(10):
                    async for _ in client.messages:
                        break
            assert gw.uplink.acked >= 1
        bad = parse(tls_site(tmp_path, pki, tls_broker, modbus, with_cert=False), "tls.toml", base=tmp_path)
        async with running(Gateway(bad)) as gw:
            await asyncio.sleep(1.5)
            assert not gw.uplink.connected and gw.uplink.acked == 0  # no client certificate: refused
            assert gw.spool.backlog() > 0  # and nothing is lost: it waits in the spool
    finally:
        await server.stop()
    assert "s3cret-pw" not in caplog.text  # secrets are never logged
