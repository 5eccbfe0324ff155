"""`yujing provision gateway ID --target DIR`: the gateway's identity, its site file's secret paths and its service,
written into a target root (`/` on the gateway itself, or an SD card image mounted at /mnt/rootfs).

Into DIR (paths as the gateway will see them, with DIR as its `/`):

    etc/yujing/site.toml                  the site file: [uplink] username, password_file, ca_file, cert_file,
                                          key_file set (relative to the file, so it reads the same on the laptop
                                          and on the gateway); created from --template when missing
    etc/yujing/secrets/                   0700: ca.crt, gateway.crt, gateway.key (0600), mqtt-password (0600)
    etc/systemd/system/yujing.service     gateway.systemd's unit (Type=notify, WatchdogSec, Restart=always,
                                          User=yujing, ProtectSystem=strict, ReadWritePaths=the state directory)
    etc/systemd/system/multi-user.target.wants/yujing.service   the link `systemctl enable` makes
    <the spool's state directory>         created 0700, so ReadWritePaths= names something that exists

The identity is the site CA's, recorded in the inventory as kind "gateway"; the broker files then give it the
same topics as a node (`<prefix>/<site>/<gateway>/…`). The site file is edited line by line inside its [uplink]
table (comments and the rest kept as they are) and must then load with `gateway.config.load`.
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import ProvisionError
from .atomic import PRIVATE, PUBLIC, private_dir, write_atomic
from .inventory import GATEWAY
from .workflow import Site

SITE_FILE = Path("etc/yujing/site.toml")
UNIT_NAME = "yujing.service"


@dataclass
class GatewayInstall:
    gateway_id: str
    site_file: Path  # on the laptop (under the target)
    secrets_dir: Path
    unit: Path
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [*(f"wrote {p} ({p.stat().st_mode & 0o777:04o})" for p in self.written), *self.notes]


def _on_target(target: Path, path: Path) -> Path:
    """`path` (on the laptop, under target) as the gateway sees it."""
    try:
        return Path("/") / path.resolve().relative_to(target.resolve())
    except ValueError:
        return path


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def set_uplink_keys(text: str, values: dict[str, str]) -> str:
    """Set `key = "value"` for each key inside the [uplink] table: an existing line is replaced, a missing key is
    added after the table's last key line; comments (even commented-out keys) stay. A file without [uplink]
    gets one at the end."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(r"\s*\[uplink\]\s*(#.*)?$", ln)), None)
    if start is None:
        lines += ["", "[uplink]"]
        start = len(lines) - 1
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\s*\[", lines[i])), len(lines))
    last_key = start
    for i in range(start + 1, end):
        if re.match(r"\s*[A-Za-z0-9_-]+\s*=", lines[i]):
            last_key = i
    for key, value in values.items():
        pattern = re.compile(rf"\s*{re.escape(key)}\s*=")
        hit = next((i for i in range(start + 1, end) if pattern.match(lines[i])), None)
        line = f"{key} = {_toml_str(value)}  # written by yujing provision gateway"
        if hit is not None:
            lines[hit] = line
        else:
            last_key += 1
            end += 1
            lines.insert(last_key, line)
    return "\n".join(lines) + "\n"


def install_gateway(site: Site, gateway_id: str, target: Path, *, technician: str, template: Path | None = None,
                    site_file: Path = SITE_FILE, serial: str | None = None, location: str = "gateway",
                    python: str = "/usr/bin/python3", user: str = "yujing", owner: tuple[int, int] | None = None,
                    broker_files: Path | None = None) -> GatewayInstall:
    from cryptography.hazmat.primitives import serialization

    from gateway import config as gwconfig
    from gateway.systemd import unit_text

    inv = site.load()
    if not target.is_dir():
        raise ProvisionError(f"--target {target}: no such folder (the gateway's root: / or a mounted image)")
    path = target / site_file
    if not path.exists():
        if template is None:
            raise ProvisionError(f"{path} does not exist: give --template SITE.toml (e.g. examples/slope.toml) to "
                                 f"start it from")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
    text = path.read_text(encoding="utf-8")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProvisionError(f"{path}: {exc}") from None
    site_t = doc.get("site", {}) if isinstance(doc.get("site"), dict) else {}
    if site_t.get("gateway") != gateway_id or site_t.get("id") != inv.site:
        raise ProvisionError(f"{path}: [site] says id {site_t.get('id')!r}, gateway {site_t.get('gateway')!r}; this "
                             f"is site {inv.site!r}, gateway {gateway_id!r}: fix [site] (the topics and the broker's "
                             f"ACL are built from them)")
    prefix = (doc.get("uplink") or {}).get("topic_prefix", "yujing/v1")
    if prefix != inv.prefix:
        raise ProvisionError(f"{path}: uplink.topic_prefix {prefix!r} but the site uses {inv.prefix!r}")

    # the identity first (inventory kind gateway); a rerun keeps it
    outcome = site.add_node(gateway_id, serial=serial or f"gateway {gateway_id}", location=location,
                            technician=technician, kind=GATEWAY)
    creds = site.store.load(gateway_id)
    if creds is None:
        raise ProvisionError(f"{gateway_id}: identity incomplete in {site.store.folder(gateway_id)}; run again")
    secrets = path.parent / "secrets"
    private_dir(secrets)
    result = GatewayInstall(gateway_id, path, secrets, target / "etc/systemd/system" / UNIT_NAME)
    files = {"ca.crt": (site.store.ca_cert_path.read_bytes(), PUBLIC),
             "gateway.crt": (creds.cert.public_bytes(serialization.Encoding.PEM), PUBLIC),
             "gateway.key": (creds.key_path.read_bytes(), PRIVATE),
             "mqtt-password": ((creds.password + "\n").encode(), PRIVATE)}
    for name, (data, mode) in files.items():
        write_atomic(secrets / name, data, mode)
        result.written.append(secrets / name)
    text = set_uplink_keys(text, {"username": gateway_id, "password_file": "secrets/mqtt-password",
                                  "ca_file": "secrets/ca.crt", "cert_file": "secrets/gateway.crt",
                                  "key_file": "secrets/gateway.key"})
    write_atomic(path, text.encode(), PUBLIC)
    result.written.append(path)
    try:
        cfg = gwconfig.load(path)
    except gwconfig.ConfigError as exc:
        raise ProvisionError(f"the site file does not load after filling in its secrets:\n{exc}") from None

    state_dir = cfg.state_dir
    state_on_target = _on_target(target, state_dir)
    state_local = target / state_on_target.relative_to("/")
    private_dir(state_local)
    unit = unit_text(_on_target(target, path), state_on_target, python=python, user=user or None, name=UNIT_NAME)
    result.unit.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(result.unit, unit.encode(), PUBLIC)
    result.written.append(result.unit)
    wants = result.unit.parent / "multi-user.target.wants" / UNIT_NAME
    wants.parent.mkdir(exist_ok=True)
    if not wants.is_symlink():
        wants.symlink_to(Path("/etc/systemd/system") / UNIT_NAME)
    if owner is not None:
        for p in [secrets, *secrets.iterdir(), state_local]:
            os.chown(p, *owner)
    elif user:
        result.notes.append(f"on the gateway: sudo useradd --system --groups dialout {user}; sudo chown -R {user}: "
                            f"{_on_target(target, secrets)} {state_on_target} (or pass --owner UID:GID when "
                            f"preparing an image as root)")
    if broker_files is not None:
        result.written += site.broker_files(broker_files)
        result.notes.append(f"broker files in {broker_files} include {gateway_id}: reload the broker (SIGHUP)")
    else:
        result.notes.append(f"{gateway_id} is in the inventory: run `yujing provision broker-files DIR` and reload "
                            f"the broker so it may connect")
    result.notes.insert(0, outcome.message.split(";")[0])
    result.notes.append(f"the unit runs {python} -m gateway.cli run {_on_target(target, path)} (--python for the "
                        f"gateway's virtualenv); enabled through {wants}")
    return result
