"""The site manifest: what was installed where, by whom, when — and nothing secret.

JSON rather than TOML: the standard library reads and writes it (tomllib only reads, and a hand-written
TOML writer would be one more thing to get right), platform tools ingest it as it is, and the file is
written by this tool, not edited by hand. It is public (0644), sits in the site directory and is meant to
be copied into the site's records; a test searches it for every password and key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import ProvisionError
from .atomic import PUBLIC, write_atomic

FORMAT = 1
INSTALLED = "installed"
REVOKED = "revoked"
NODE = "node"
GATEWAY = "gateway"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def sha256_path(path: Path) -> str:
    """Hash of a file, or of a folder (every file's relative path and bytes, in sorted order), so the
    same firmware tree gives the same hash on every laptop."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            rel = f.relative_to(path).as_posix().encode()
            data = f.read_bytes()
            h.update(len(rel).to_bytes(4, "big") + rel + len(data).to_bytes(8, "big") + data)
    else:
        h.update(path.read_bytes())
    return "sha256:" + h.hexdigest()


@dataclass
class Rekey:
    at: str
    by: str  # the technician; the installer stays in Device.technician


@dataclass
class Device:
    device_id: str
    board_serial: str
    location: str
    technician: str
    installed_at: str
    cert_fingerprint: str
    cert_serial: str  # hex; what the CRL names when the certificate is revoked
    firmware_hash: str | None = None
    config_hash: str | None = None
    status: str = INSTALLED
    rekeys: list[Rekey] = field(default_factory=list)
    replaces: str | None = None
    replaced_by: str | None = None
    revoked_at: str | None = None
    kind: str = NODE  # "node" or "gateway" (`yujing provision gateway`); older inventories hold nodes only
    # where the node's command key is (relative to the site directory; the key itself never is in here): the
    # platform signs the node's commands with it (gateway/node_commands.py)
    command_key_file: str | None = None


@dataclass
class RevokedCert:
    device_id: str
    cert_serial: str
    cert_fingerprint: str
    revoked_at: str
    reason: str  # "rekey" or "replaced"


@dataclass
class Inventory:
    site: str
    prefix: str
    ca_fingerprint: str
    created_at: str
    platform_username: str
    devices: dict[str, Device] = field(default_factory=dict)
    revoked_certificates: list[RevokedCert] = field(default_factory=list)

    def installed(self) -> list[Device]:
        return [d for d in self.devices.values() if d.status == INSTALLED]

    def revoke_cert(self, device: Device, reason: str, at: str) -> None:
        if not any(r.cert_serial == device.cert_serial for r in self.revoked_certificates):
            self.revoked_certificates.append(RevokedCert(device.device_id, device.cert_serial,
                                                         device.cert_fingerprint, at, reason))

    def to_json(self) -> bytes:
        doc = {"format": FORMAT, **asdict(self)}
        return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()

    def save(self, path: Path) -> None:
        write_atomic(path, self.to_json(), PUBLIC)

    @classmethod
    def load(cls, path: Path) -> Inventory:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ProvisionError(f"{path} does not exist: run `yujing provision init-site SITE` first, or pass "
                                 f"--site-dir for the site directory that has it") from None
        except ValueError as exc:
            raise ProvisionError(f"{path}: not valid JSON ({exc}); restore it from the site backup") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ProvisionError(f"{path}: not a Yujing inventory of format {FORMAT}; is --site-dir right?")
        try:
            devices = {k: Device(**{**v, "rekeys": [Rekey(**r) for r in v.get("rekeys", [])]})
                       for k, v in doc["devices"].items()}
            revoked = [RevokedCert(**r) for r in doc["revoked_certificates"]]
            return cls(doc["site"], doc["prefix"], doc["ca_fingerprint"], doc["created_at"],
                       doc["platform_username"], devices, revoked)
        except (KeyError, TypeError) as exc:
            raise ProvisionError(f"{path}: damaged inventory ({type(exc).__name__}: {exc}); restore it from the "
                                 f"site backup") from None
