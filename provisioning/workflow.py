"""The technician's steps, each safe to run again: a rerun finishes what an interrupted run started and
does nothing where everything is done.

Order inside each step: secrets first (on disk, 0600), the inventory last — an inventory entry means
the identity is complete; an identity folder without one is picked up and completed by the rerun.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from . import ProvisionError
from .atomic import PRIVATE, PUBLIC, private_dir, write_atomic
from .broker_files import TopicLayout, acl_file, password_file
from .identity import PLATFORM, IdentityStore, SiteCA, check_id, crl_pem, fingerprint, issue
from .inventory import INSTALLED, NODE, REVOKED, Device, Inventory, Rekey, sha256_path, utc_now

INVENTORY = "inventory.json"


@dataclass(frozen=True)
class Outcome:
    changed: bool
    message: str


class Site:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = IdentityStore(root)
        self.inventory_path = root / INVENTORY

    def load(self) -> Inventory:
        return Inventory.load(self.inventory_path)

    @contextlib.contextmanager
    def locked(self, *, create: bool = False) -> Iterator[None]:
        """One step at a time per site directory: two technicians' laptops sharing it (or two terminals)
        would otherwise each save an inventory without the other's device."""
        if create:
            private_dir(self.root)
        elif not self.root.is_dir():
            raise ProvisionError(f"site directory {self.root} does not exist: run `yujing provision init-site SITE` "
                                 f"first, or pass --site-dir (or set YUJING_SITE_DIR) for the site's directory")
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ProvisionError(f"another `yujing provision` is working in {self.root}; wait for it to finish") from None
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # --- init-site ----------------------------------------------------------------------------------------

    def init(self, site: str, prefix: str) -> Outcome:
        check_id(site, "site id")
        if not prefix or prefix.startswith("/") or prefix.endswith("/") or any(c in prefix for c in "+#"):
            raise ProvisionError(f"--prefix {prefix!r}: a topic prefix like yujing/v1 (no wildcards, no leading or "
                                 f"trailing '/')")
        if self.inventory_path.exists():
            inv = self.load()
            if (inv.site, inv.prefix) != (site, prefix):
                raise ProvisionError(f"{self.root} already holds site {inv.site!r} (prefix {inv.prefix}); use another "
                                     f"--site-dir for site {site!r}")
            return Outcome(False, f"site {site} already set up in {self.root} (CA {inv.ca_fingerprint})")
        private_dir(self.root)
        ca = self.store.create_ca(site)
        self.store.ensure(ca, PLATFORM)
        inv = Inventory(site, prefix, fingerprint(ca.cert), utc_now(), PLATFORM)
        inv.save(self.inventory_path)
        return Outcome(True, f"site {site}: CA {inv.ca_fingerprint} in {self.store.ca_cert_path}; platform account "
                             f"{PLATFORM!r} in {self.store.folder(PLATFORM)}")

    # --- add-node -----------------------------------------------------------------------------------------

    def add_node(self, device_id: str, *, serial: str, location: str, technician: str,
                 firmware: Path | None = None, config: Path | None = None, kind: str = NODE) -> Outcome:
        check_id(device_id)
        if device_id == PLATFORM:
            raise ProvisionError(f"device id {PLATFORM!r} is the site's platform account; choose another id")
        if not serial.strip():
            raise ProvisionError("--serial: give the board's serial (printed on it, or its MAC address)")
        inv = self.load()
        known = inv.devices.get(device_id)
        if known is not None:
            if known.status == REVOKED:
                raise ProvisionError(f"{device_id} was revoked on {known.revoked_at}; a revoked id is never reused — "
                                     f"choose a new id")
            if known.kind != kind:
                raise ProvisionError(f"{device_id} is already a {known.kind} of this site; choose another id for "
                                     f"the {kind}")
            if known.board_serial != serial:
                raise ProvisionError(f"{device_id} is already installed on board {known.board_serial} at "
                                     f"{known.location!r}; for a new board use `yujing provision replace {device_id} NEW_ID "
                                     f"--serial {serial}`, or `rekey {device_id}` for new credentials on the same board")
            return Outcome(False, f"{device_id} is already installed on board {serial}: nothing to do")
        owner = next((d for d in inv.installed() if d.board_serial == serial), None)
        if owner is not None:
            raise ProvisionError(f"board {serial} already carries {owner.device_id}; use `yujing provision replace "
                                 f"{owner.device_id} {device_id}` to give it a new id")
        hashes = _hashes(firmware, config)
        creds = self.store.ensure(self.store.load_ca(), device_id)
        inv.devices[device_id] = Device(device_id, serial, location, technician, utc_now(), fingerprint(creds.cert),
                                        creds.serial_hex, *hashes, kind=kind,
                                        command_key_file=self._command_key(device_id) if kind == NODE else None)
        inv.save(self.inventory_path)
        return Outcome(True, f"{device_id} on board {serial}: certificate {fingerprint(creds.cert)}; copy "
                             f"{creds.secrets_path} to the board as /secrets.json")

    # --- rekey --------------------------------------------------------------------------------------------

    def rekey(self, device_id: str, *, technician: str) -> Outcome:
        inv = self.load()
        dev = self._installed(inv, device_id)
        at = utc_now()
        # Record the old certificate as revoked before its files are replaced: a crash in between then
        # leaves it revoked (safe), never valid and forgotten.
        inv.revoke_cert(dev, "rekey", at)
        inv.save(self.inventory_path)
        creds = self.store.rekey(self.store.load_ca(), device_id)  # the command key too: a new one below
        dev.cert_fingerprint, dev.cert_serial = fingerprint(creds.cert), creds.serial_hex
        if dev.kind == NODE:
            dev.command_key_file = self._command_key(device_id)
        dev.rekeys.append(Rekey(at, technician))
        inv.save(self.inventory_path)
        return Outcome(True, f"{device_id}: new certificate {dev.cert_fingerprint} and password; copy "
                             f"{creds.secrets_path} to the board, then run `yujing provision broker-files`")

    # --- replace ------------------------------------------------------------------------------------------

    def replace(self, old: str, new: str, *, serial: str | None, location: str | None, technician: str,
                firmware: Path | None = None, config: Path | None = None) -> Outcome:
        check_id(new)
        if new == PLATFORM:
            raise ProvisionError(f"device id {PLATFORM!r} is the site's platform account; choose another id")
        inv = self.load()
        before = inv.devices.get(old)
        if before is not None and before.status == REVOKED and before.replaced_by == new and new in inv.devices:
            self.store.forget(old)  # finish a run interrupted after the inventory was saved
            return Outcome(False, f"{old} was already replaced by {new}: nothing to do")
        dev = self._installed(inv, old)
        if new in inv.devices:
            raise ProvisionError(f"{new} already exists in the inventory ({inv.devices[new].status}); choose a new id")
        owner = next((d for d in inv.installed() if serial and d.board_serial == serial and d is not dev), None)
        if owner is not None:
            raise ProvisionError(f"board {serial} already carries {owner.device_id}; check --serial")
        hashes = _hashes(firmware, config)
        creds = self.store.ensure(self.store.load_ca(), new)
        at = utc_now()
        inv.devices[new] = Device(new, serial or dev.board_serial, location if location is not None else dev.location,
                                  technician, at, fingerprint(creds.cert), creds.serial_hex, *hashes, replaces=old,
                                  command_key_file=self._command_key(new) if dev.kind == NODE else None)
        dev.status, dev.revoked_at, dev.replaced_by = REVOKED, at, new
        inv.revoke_cert(dev, "replaced", at)
        inv.save(self.inventory_path)  # one write: the new id installed and the old revoked together
        self.store.forget(old)
        return Outcome(True, f"{old} revoked, {new} installed on board {inv.devices[new].board_serial}; copy "
                             f"{creds.secrets_path} to the board, then run `yujing provision broker-files`")

    # --- command keys -------------------------------------------------------------------------------------

    def _command_key(self, device_id: str) -> str:
        """Make the node's command key if it has none; where it is, relative to the site directory."""
        self.store.command_key(device_id)
        return self.store.command_key_path(device_id).relative_to(self.root).as_posix()

    def ensure_command_key(self, device_id: str) -> bytes:
        """The node's command key, made (and its place recorded in the inventory) if an older run installed the
        node without one."""
        key = self.store.command_key(device_id)
        inv = self.load()
        dev = inv.devices.get(device_id)
        if dev is not None and dev.kind == NODE and dev.command_key_file is None:
            dev.command_key_file = self._command_key(device_id)
            inv.save(self.inventory_path)
        return key

    # --- broker-files -------------------------------------------------------------------------------------

    def broker_files(self, outdir: Path, *, server_names: tuple[str, ...] = ()) -> list[Path]:
        """Write passwd (0600), acl, ca.crt and crl.pem for mosquitto; with server names also the broker's own
        certificate and key (0600), issued once and kept."""
        inv = self.load()
        ca = self.store.load_ca()
        accounts: list[tuple[str, str]] = []
        for name in [inv.platform_username] + [d.device_id for d in inv.installed()]:
            pw = self.store.password(name)
            if pw is None:
                raise ProvisionError(f"{self.store.folder(name) / 'secrets.json'} is missing; run `yujing provision "
                                     f"rekey {name}` to issue new credentials")
            accounts.append((name, pw))
        layout = TopicLayout(inv.prefix, inv.site)
        if not outdir.is_dir():
            private_dir(outdir)  # new: 0700; an existing one (say /etc/mosquitto/yujing, owned by the broker's user) keeps its mode
        written = [outdir / "passwd", outdir / "acl", outdir / "ca.crt", outdir / "crl.pem"]
        write_atomic(written[0], password_file(accounts).encode(), PRIVATE)
        write_atomic(written[1], acl_file(layout, [d.device_id for d in inv.installed()], inv.platform_username).encode(),
                     PUBLIC)
        write_atomic(written[2], ca.cert.public_bytes(serialization.Encoding.PEM), PUBLIC)
        write_atomic(written[3], crl_pem(ca, [int(r.cert_serial, 16) for r in inv.revoked_certificates]), PUBLIC)
        if server_names:
            written += self._server_cert(ca, outdir, server_names)
        return written

    def _server_cert(self, ca: SiteCA, outdir: Path, names: tuple[str, ...]) -> list[Path]:
        from cryptography.hazmat.primitives.asymmetric import ec

        key_path, cert_path = outdir / "server.key", outdir / "server.crt"
        if key_path.exists():  # kept across runs: a broker restart then needs no new key
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ProvisionError(f"{key_path} is not an EC P-256 key; delete it and run broker-files again")
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            write_atomic(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()), PRIVATE)
        cert = issue(ca, names[0], key, server_names=names)
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), PUBLIC)
        return [key_path, cert_path]

    @staticmethod
    def _installed(inv: Inventory, device_id: str) -> Device:
        dev = inv.devices.get(device_id)
        if dev is None:
            raise ProvisionError(f"{device_id} is not in the inventory; `yujing provision list` shows the devices")
        if dev.status != INSTALLED:
            raise ProvisionError(f"{device_id} was revoked on {dev.revoked_at}"
                                 + (f" and replaced by {dev.replaced_by}" if dev.replaced_by else ""))
        return dev


def _hashes(firmware: Path | None, config: Path | None) -> tuple[str | None, str | None]:
    out: list[str | None] = []
    for opt, path in (("--firmware", firmware), ("--config", config)):
        if path is None:
            out.append(None)
            continue
        if not path.exists():
            raise ProvisionError(f"{opt} {path}: no such file or folder")
        out.append(sha256_path(path))
    return out[0], out[1]
