"""provisioning.node_files: the files a TLS node gets (config set for TLS, secrets with the command key, DER
certificate, key and CA), checked with `cryptography` and the firmware's own config reader (under CPython), and the
journal's inputs hash that changes with every one of them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provisioning import ProvisionError
from provisioning.inventory import Inventory
from provisioning.node_files import Broker, node_files, tls_config
from provisioning.runner import _files_key
from provisioning.workflow import Site
from tests.test_provision_e2e import node_config

ROOT = Path(__file__).resolve().parents[1]
BROKER = Broker("broker.xishan.local", 8884)


def _config(**mqtt: object) -> bytes:
    return json.dumps({"node_id": "slope-07", "site": "xishan", "sample_period_s": 60, "mqtt": mqtt}).encode()


@pytest.fixture
def site(tmp_path: Path) -> Site:
    s = Site(tmp_path / "site")
    s.init("xishan", "yujing/v1")
    s.add_node("slope-07", serial="S1", location="a", technician="li")
    return s


def test_the_config_is_set_for_tls_and_a_complete_one_is_copied_byte_for_byte() -> None:
    out, paths = tls_config(_config(keepalive_s=30), "slope-07.json", BROKER)
    assert json.loads(out)["mqtt"] == {"keepalive_s": 30, "tls": True, "host": "broker.xishan.local", "port": 8884}
    assert paths == {"ca_file": "/ca.der", "cert_file": "/cert.der", "key_file": "/key.der"}
    done = _config(host="10.0.0.2", port=8883, tls=True, ca_file="/tls/ca.der")
    again, paths = tls_config(done, "slope-07.json", BROKER)
    assert again == done and paths["ca_file"] == "/tls/ca.der"  # the config's own host, port and paths stay


@pytest.mark.parametrize(("config", "broker", "message"), [
    (_config(host="h", tls=False), BROKER, "slope-07.json: mqtt.tls is false"),
    (_config(), None, "slope-07.json: mqtt.host is missing and the plan has no [broker]"),
    (_config(host="h"), Broker("h", 1883, tls=False), "the plan's [broker] says tls = false"),
    (_config(host="h", key_file="key.der"), BROKER, "mqtt.key_file: an absolute file path on the board"),
])
def test_configs_a_tls_node_cannot_run_with_are_refused(config: bytes, broker: Broker | None, message: str) -> None:
    with pytest.raises(ProvisionError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        tls_config(config, "slope-07.json", broker)


def test_node_files_are_der_with_the_command_key_and_the_firmware_accepts_them(site: Site, tmp_path: Path) -> None:
    config = json.dumps(node_config("slope-07")).encode()  # a whole node config, as a technician writes it
    files = node_files(site.store, "slope-07", config, "slope-07.json", broker=BROKER)
    assert list(files) == ["/config.json", "/secrets.json", "/ca.der", "/cert.der", "/key.der"]
    cert = x509.load_der_x509_certificate(files["/cert.der"])
    assert cert == x509.load_pem_x509_certificate((site.store.folder("slope-07") / "client.crt").read_bytes())
    assert serialization.load_der_private_key(files["/key.der"], None).public_key() == cert.public_key()
    assert x509.load_der_x509_certificate(files["/ca.der"]).subject == cert.issuer
    secrets = json.loads(files["/secrets.json"])
    assert secrets["command_key"] == site.store.command_key("slope-07", create=False).hex()
    assert "bytes>" in repr(files["/key.der"]) and files["/key.der"].hex()[:16] not in repr(files)  # no secret shown
    assert Inventory.load(site.inventory_path).devices["slope-07"].command_key_file == "identities/slope-07/command.key"

    # the firmware's own reader (firmware/yujing_node/config.py, under CPython) takes the flash as written
    flash = tmp_path / "flash"
    flash.mkdir()
    for name, data in files.items():
        (flash / name.lstrip("/")).write_bytes(data)
    sys.path.insert(0, str(ROOT / "firmware"))
    try:
        from yujing_node import config as fw_config
    finally:
        sys.path.pop(0)
    cfg, sec = fw_config.load(str(flash / "config.json"), str(flash / "secrets.json"),
                              lambda p: str(flash / p.lstrip("/")))
    assert cfg.tls == {"ca": files["/ca.der"], "cert": files["/cert.der"], "key": files["/key.der"]}
    assert (cfg.host, cfg.port) == ("127.0.0.1", 8884) and sec.command_key == bytes.fromhex(
        secrets["command_key"])


def test_the_files_key_changes_with_a_rekey_and_a_config_and_not_otherwise(site: Site) -> None:
    def key(config: bytes = _config()) -> str:
        return _files_key(node_files(site.store, "slope-07", config, "c", broker=BROKER))

    first = key()
    assert key() == first  # the same identity and config: the same bytes, the step is skipped on a rerun
    assert key(_config(keepalive_s=30)) != first
    old_command_key = site.store.command_key("slope-07", create=False)
    site.rekey("slope-07", technician="li")
    assert site.store.command_key("slope-07", create=False) != old_command_key  # a new command key too
    assert key() != first


def test_cli_flash_with_node_writes_the_tls_files_and_the_command_key(site: Site, tmp_path: Path) -> None:
    """`yujing provision flash PORT --config FILE --node ID` on a simulated board (real mpremote)."""
    import subprocess

    from provisioning.simboard import SimBoard

    config = tmp_path / "slope-07.json"
    config.write_text(json.dumps(node_config("slope-07")))
    with SimBoard(tmp_path / "flash") as b:
        out = subprocess.run([sys.executable, "-m", "provisioning.cli", "--site-dir", str(site.root), "flash", b.port,
                              "--firmware", str(ROOT / "firmware"), "--config", str(config), "--node", "slope-07"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        flash = b.flash
        assert "node files: 5 files copied" in out.stdout, out.stdout
        cfg = json.loads((flash / "config.json").read_text())
        assert cfg["mqtt"] == {"host": "127.0.0.1", "keepalive_s": 60, "tls": True}  # the firmware's default port
        key = site.store.command_key("slope-07", create=False).hex()
        assert json.loads((flash / "secrets.json").read_text())["command_key"] == key
        assert key not in out.stdout + out.stderr
        assert x509.load_der_x509_certificate((flash / "cert.der").read_bytes()).subject.rfc4514_string() == \
            "CN=slope-07"
        assert (flash / "key.der").exists() and (flash / "ca.der").exists()
