"""`yujing provision gateway ID --target DIR`: the gateway's identity, secrets, site file and systemd unit written into
a target root, then the real gateway with those files connecting over TLS to a real mosquitto that runs the
generated broker files (password file, ACL, CA, CRL)."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
from pathlib import Path

import aiomqtt
import pytest

from gateway import config as gwconfig
from gateway.app import Gateway
from gateway.cli import main as yujing
from gateway.sim.devices import SimServer, SimSlave
from provisioning.gateway_install import set_uplink_keys
from provisioning.inventory import Inventory
from provisioning.workflow import Site
from tests.conftest import free_port
from tests.e2e import running
from tests.test_provision_verify import PREFIX, SITE, start_site_broker

TEMPLATE = """\
# the site file as the integrator wrote it
[site]
id = "xishan"
gateway = "xishan-gw1"

[uplink]
host = "127.0.0.1"
port = {port}
#   password_file = "secrets/old.pass"   # commented out: stays as it is
username = "someone-else"
backoff_min_s = 0.2
backoff_max_s = 0.5

[spool]
path = "state/spool"

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


def test_set_uplink_keys_replaces_adds_and_keeps_comments() -> None:
    text = ('[site]\nid = "s"\n[uplink]\nhost = "h"  # the broker\n# key_file = "x"\nusername = "u"\n'
            '[spool]\npath = "p"\n')
    out = set_uplink_keys(text, {"username": "gw", "key_file": "secrets/gateway.key"})
    assert out.splitlines() == ['[site]', 'id = "s"', '[uplink]', 'host = "h"  # the broker', '# key_file = "x"',
                                'username = "gw"  # written by yujing provision gateway',
                                'key_file = "secrets/gateway.key"  # written by yujing provision gateway',
                                '[spool]', 'path = "p"']


async def test_gateway_install_into_a_target_root_then_it_connects(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    site = Site(tmp_path / "site")
    site.init(SITE, PREFIX)
    broker = start_site_broker(tmp_path, site)
    modbus = free_port()
    template = tmp_path / "template.toml"
    template.write_text(TEMPLATE.format(port=broker.tls_port, modbus=modbus))
    root = tmp_path / "rootfs"  # an SD card image mounted here
    root.mkdir()
    try:
        args = ["provision", "--site-dir", str(site.root), "--technician", "li", "gateway", "xishan-gw1", "--target",
                str(root), "--template", str(template), "--broker-files", str(broker.files), "--python",
                "/opt/yujing/.venv/bin/python"]
        assert yujing(args) == 0
        first = capsys.readouterr()
        broker.reload()
        # the site file loads, with the secrets filled in (relative to it: the same on the laptop and the gateway)
        site_file = root / "etc/yujing/site.toml"
        cfg = gwconfig.load(site_file)
        secrets = root / "etc/yujing/secrets"
        assert cfg.uplink.username == "xishan-gw1"
        assert (cfg.uplink.password_file, cfg.uplink.ca_file, cfg.uplink.cert_file, cfg.uplink.key_file) == (
            secrets / "mqtt-password", secrets / "ca.crt", secrets / "gateway.crt", secrets / "gateway.key")
        text = site_file.read_text()
        assert '#   password_file = "secrets/old.pass"   # commented out: stays as it is' in text
        assert "someone-else" not in text
        assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
        for name in ("gateway.key", "mqtt-password"):
            assert stat.S_IMODE((secrets / name).stat().st_mode) == 0o600, name
        password = site.store.password("xishan-gw1")
        assert password is not None and (secrets / "mqtt-password").read_text().strip() == password
        # the unit: hardened, watched, restarted, pointing at the paths as the gateway sees them
        unit = (root / "etc/systemd/system/yujing.service").read_text()
        for line in ("Type=notify", "WatchdogSec=30", "Restart=always", "User=yujing", "ProtectSystem=strict",
                     "ReadWritePaths=/etc/yujing/state", "NoNewPrivileges=yes",
                     "ExecStart=/opt/yujing/.venv/bin/python -m gateway.cli run /etc/yujing/site.toml"):
            assert line in unit.splitlines(), line
        wants = root / "etc/systemd/system/multi-user.target.wants/yujing.service"
        assert os.readlink(wants) == "/etc/systemd/system/yujing.service"
        assert (root / "etc/yujing/state").is_dir()
        # the inventory has it as a gateway, the broker files give it its own topics; nothing secret anywhere
        inv = Inventory.load(site.inventory_path)
        assert inv.devices["xishan-gw1"].kind == "gateway"
        acl = (broker.files / "acl").read_text()
        assert f"user xishan-gw1\ntopic write {PREFIX}/{SITE}/xishan-gw1/birth" in acl
        key_pem = (secrets / "gateway.key").read_text()
        for shown in (first.out, first.err, site.inventory_path.read_text(), unit, text):
            assert password not in shown and key_pem.strip().splitlines()[1] not in shown
        # a rerun changes nothing and issues nothing new
        cert_before = (secrets / "gateway.crt").read_bytes()
        assert yujing(args) == 0
        assert (secrets / "gateway.crt").read_bytes() == cert_before
        assert "nothing to do" in capsys.readouterr().out

        # the gateway with exactly these files connects (TLS, client certificate, password, ACL) and publishes
        server = SimServer([SimSlave(1)], tcp=("127.0.0.1", modbus))
        await server.start()
        try:
            async with running(Gateway(cfg)) as gw:
                ctx = ssl.create_default_context(cafile=str(broker.files / "ca.crt"))
                platform = site.store.folder("platform")
                ctx.load_cert_chain(platform / "client.crt", platform / "client.key")
                async with aiomqtt.Client("127.0.0.1", broker.tls_port, tls_context=ctx, identifier="t-platform",
                                          timeout=5) as sub:
                    await sub.subscribe(f"{PREFIX}/{SITE}/xishan-gw1/data", qos=1)
                    async with asyncio.timeout(15):
                        async for _ in sub.messages:
                            break
                assert gw.uplink.acked >= 1
        finally:
            await server.stop()
    finally:
        broker.stop()


def test_a_site_file_for_another_gateway_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = Site(tmp_path / "site")
    site.init(SITE, PREFIX)
    template = tmp_path / "t.toml"
    template.write_text(TEMPLATE.format(port=8883, modbus=502))
    root = tmp_path / "rootfs"
    root.mkdir()
    assert yujing(["provision", "--site-dir", str(site.root), "gateway", "xishan-gw2", "--target", str(root),
                   "--template", str(template)]) == 2
    err = capsys.readouterr().err
    assert "[site] says id 'xishan', gateway 'xishan-gw1'" in err and "gateway 'xishan-gw2'" in err
    assert "xishan-gw2" not in json.loads(site.inventory_path.read_text())["devices"]
