"""`yujing provision` through its command line (gateway.cli.main, as a technician types it): resumable
steps, clear refusals, and an inventory that holds nothing secret."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.cli import main as yujing
from provisioning.identity import IdentityStore
from provisioning.inventory import Inventory


def provision(site: Path, *args: str, tech: str = "li") -> int:
    return yujing(["provision", "--site-dir", str(site), "--technician", tech, *args])


@pytest.fixture
def site(tmp_path: Path) -> Path:
    d = tmp_path / "site"
    assert provision(d, "init-site", "xishan") == 0
    return d


def inventory(site: Path) -> Inventory:
    return Inventory.load(site / "inventory.json")


def test_add_node_records_the_installation(site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fw = tmp_path / "fw"
    (fw / "yujing_node").mkdir(parents=True)
    (fw / "yujing_node" / "app.py").write_text("print('hi')\n")
    cfg = tmp_path / "config.json"
    cfg.write_text('{"node_id": "slope-07"}')
    assert provision(site, "add-node", "slope-07", "--serial", "A4:CF:12:00:00:07", "--location", "slope 3, post 12",
                     "--firmware", str(fw), "--config", str(cfg)) == 0
    dev = inventory(site).devices["slope-07"]
    assert (dev.board_serial, dev.location, dev.technician, dev.status) == ("A4:CF:12:00:00:07", "slope 3, post 12",
                                                                          "li", "installed")
    assert dev.firmware_hash and dev.firmware_hash.startswith("sha256:")
    assert dev.config_hash and dev.config_hash.startswith("sha256:") and dev.config_hash != dev.firmware_hash
    creds = IdentityStore(site).load("slope-07")
    assert creds is not None
    der = creds.cert.public_bytes(serialization.Encoding.DER)
    assert dev.cert_fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
    secrets = json.loads(creds.secrets_path.read_text())
    assert set(secrets) == {"mqtt_username", "mqtt_password"} and secrets["mqtt_username"] == "slope-07"
    out = capsys.readouterr()
    assert creds.password not in out.out + out.err


def test_rerun_with_same_serial_is_a_no_op(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("add-node", "slope-07", "--serial", "S1", "--location", "post 12")
    assert provision(site, *args) == 0
    before = (site / "inventory.json").read_bytes()
    files = {p: p.read_bytes() for p in (site / "identities" / "slope-07").iterdir()}
    capsys.readouterr()
    assert provision(site, *args, tech="wang") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (site / "inventory.json").read_bytes() == before
    assert {p: p.read_bytes() for p in (site / "identities" / "slope-07").iterdir()} == files


def test_same_id_on_another_board_is_refused_with_the_fix(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(site, "add-node", "slope-07", "--serial", "S1", "--location", "a") == 0
    capsys.readouterr()
    assert provision(site, "add-node", "slope-07", "--serial", "S2", "--location", "a") == 2
    err = capsys.readouterr().err
    assert "already installed on board S1" in err and "yujing provision replace slope-07" in err
    assert provision(site, "add-node", "slope-08", "--serial", "S1", "--location", "a") == 2
    assert "board S1 already carries slope-07" in capsys.readouterr().err


def test_interrupted_add_node_is_finished_by_the_rerun(site: Path) -> None:
    """Secrets are written before the inventory: an identity folder without an entry is completed, with
    the secrets it already has, not issued twice."""
    store = IdentityStore(site)
    half = store.ensure(store.load_ca(), "slope-07")  # the run died here
    assert "slope-07" not in inventory(site).devices
    assert provision(site, "add-node", "slope-07", "--serial", "S1", "--location", "a") == 0
    done = store.load("slope-07")
    assert done is not None and done.password == half.password
    assert inventory(site).devices["slope-07"].cert_serial == half.serial_hex


def test_rekey_revokes_the_old_certificate(site: Path) -> None:
    assert provision(site, "add-node", "slope-07", "--serial", "S1", "--location", "a") == 0
    old = inventory(site).devices["slope-07"]
    old_pw = IdentityStore(site).password("slope-07")
    assert provision(site, "rekey", "slope-07", tech="wang") == 0
    inv = inventory(site)
    new = inv.devices["slope-07"]
    assert new.cert_fingerprint != old.cert_fingerprint and new.status == "installed"
    assert new.technician == "li" and [r.by for r in new.rekeys] == ["wang"]
    assert [r.cert_serial for r in inv.revoked_certificates] == [old.cert_serial]
    assert IdentityStore(site).password("slope-07") != old_pw


def test_replace_revokes_old_and_installs_new(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(site, "add-node", "slope-07", "--serial", "S1", "--location", "post 12") == 0
    assert provision(site, "replace", "slope-07", "slope-17", "--serial", "S9") == 0
    inv = inventory(site)
    old, new = inv.devices["slope-07"], inv.devices["slope-17"]
    assert (old.status, old.replaced_by, new.replaces) == ("revoked", "slope-17", "slope-07")
    assert (new.board_serial, new.location) == ("S9", "post 12")
    assert old.cert_serial in {r.cert_serial for r in inv.revoked_certificates}
    assert not (site / "identities" / "slope-07" / "client.key").exists()
    assert not (site / "identities" / "slope-07" / "secrets.json").exists()
    capsys.readouterr()
    assert provision(site, "replace", "slope-07", "slope-17") == 0  # rerun
    assert "nothing to do" in capsys.readouterr().out
    assert provision(site, "add-node", "slope-07", "--serial", "S5", "--location", "a") == 2
    assert "never reused" in capsys.readouterr().err
    assert provision(site, "rekey", "slope-07") == 2
    assert "replaced by slope-17" in capsys.readouterr().err
    assert provision(site, "add-node", "slope-08", "--serial", "S8", "--location", "b") == 0
    assert provision(site, "replace", "slope-17", "slope-27", "--serial", "S8") == 2
    assert "board S8 already carries slope-08" in capsys.readouterr().err


def test_broker_files_leave_out_revoked_identities(site: Path, tmp_path: Path) -> None:
    for i, serial in (("slope-07", "S1"), ("slope-08", "S2")):
        assert provision(site, "add-node", i, "--serial", serial, "--location", "a") == 0
    assert provision(site, "replace", "slope-08", "slope-18") == 0
    out = tmp_path / "broker"
    assert provision(site, "broker-files", str(out)) == 0
    users = {line.split(":")[0] for line in (out / "passwd").read_text().splitlines()}
    assert users == {"platform", "slope-07", "slope-18"}
    acl = (out / "acl").read_text()
    assert "user slope-18" in acl and "slope-08" not in acl
    assert stat.S_IMODE((out / "passwd").stat().st_mode) == 0o600


def test_errors_name_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(tmp_path / "none", "add-node", "n1", "--serial", "S", "--location", "a") == 2
    assert "init-site" in capsys.readouterr().err
    assert provision(tmp_path / "s", "init-site", "xishan") == 0
    assert provision(tmp_path / "s", "init-site", "dongshan") == 2
    assert "another --site-dir" in capsys.readouterr().err
    assert provision(tmp_path / "s", "add-node", "a/b", "--serial", "S", "--location", "a") == 2
    assert "no '/'" in capsys.readouterr().err
    assert provision(tmp_path / "s", "add-node", "platform", "--serial", "S", "--location", "a") == 2
    assert "platform account" in capsys.readouterr().err


def _secrets_on_disk(*roots: Path) -> set[str]:
    """Every password, and every private key as PEM line, raw hex and raw base64."""
    found: set[str] = set()
    for root in roots:
        for secrets_file in root.rglob("secrets.json"):
            found.add(json.loads(secrets_file.read_text())["mqtt_password"])
        for key_file in [*root.rglob("*.key")]:
            if key_file.name == "command.key":  # a node's command key: 64 hex digits, not PEM
                found.add(key_file.read_text().strip())
                continue
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            raw = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
            found |= {raw.hex(), base64.b64encode(raw).decode(), key_file.read_text().splitlines()[1]}
    return found


def test_inventory_holds_no_secret(site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Collected after every step, so the passwords and keys that rekey and replace delete are searched for too."""
    secrets = _secrets_on_disk(site)
    steps = [("add-node", "slope-07", "--serial", "S1", "--location", "a"),
             ("add-node", "slope-08", "--serial", "S2", "--location", "b"),
             ("rekey", "slope-07"), ("replace", "slope-08", "slope-18"),
             ("broker-files", str(tmp_path / "b"), "--server-name", "127.0.0.1"), ("list",), ("list", "--json")]
    for step in steps:
        assert provision(site, *step) == 0, step
        secrets |= _secrets_on_disk(site, tmp_path / "b")
    printed = capsys.readouterr()
    printed_all = printed.out + printed.err
    text = (site / "inventory.json").read_text()
    keys = [site / "ca" / "ca.key", tmp_path / "b" / "server.key", *site.rglob("client.key")]
    command_keys = sorted(k.parent.name for k in site.rglob("command.key"))
    assert command_keys == ["slope-07", "slope-18"], command_keys  # slope-08's went with its other secrets
    # passwords: platform, slope-07 twice, slope-08, slope-18; keys (3 forms each): CA, server, 5 clients
    assert len(secrets) >= 5 + 3 * 7, len(secrets)
    for secret in secrets:
        assert secret not in text, "a secret is in the inventory"
        assert secret not in printed_all, "a secret was printed"
    assert stat.S_IMODE((site / "inventory.json").stat().st_mode) == 0o644
    for private in [*keys, *site.rglob("secrets.json"), *site.rglob("command.key"), tmp_path / "b" / "passwd"]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private


def test_one_step_at_a_time(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import fcntl
    import os

    fd = os.open(site / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds the site
        assert provision(site, "add-node", "slope-07", "--serial", "S1", "--location", "a") == 2
        assert "another `yujing provision` is working" in capsys.readouterr().err
    finally:
        os.close(fd)
    assert provision(site, "add-node", "slope-07", "--serial", "S1", "--location", "a") == 0


def test_a_mistyped_site_dir_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(tmp_path / "typo", "rekey", "slope-07") == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_the_gateway_command_line_does_not_load_cryptography() -> None:
    """`yujing` builds the provision parser on every start (also `yujing run` on a gateway): the steps and
    their cryptography import only when a provision command runs."""
    import subprocess
    import sys

    code = ("import sys, gateway.cli; gateway.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography' or m.startswith('provisioning.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['provisioning.cli']"


def test_broker_files_keep_an_existing_folders_mode(site: Path, tmp_path: Path) -> None:
    """/etc/mosquitto/yujing belongs to the broker's user, which must go on reading it after a run."""
    shared = tmp_path / "etc-mosquitto"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert provision(site, "broker-files", str(shared)) == 0
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    fresh = tmp_path / "new"
    assert provision(site, "broker-files", str(fresh)) == 0
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
