"""Site CA, per-identity keys, certificates and MQTT passwords, kept on disk under the site directory.

Layout (the site directory and every folder in it 0700):

    ca/ca.key                  the CA's private key (0600): never leaves this directory
    ca/ca.crt                  the CA certificate (0644): for the broker's `cafile`
    identities/<id>/client.key the identity's private key (0600)
    identities/<id>/client.crt its certificate, CN = id, signed by the CA (0644)
    identities/<id>/secrets.json  {"mqtt_username", "mqtt_password"} (0600): the node firmware's /secrets.json keys
    identities/<id>/command.key   a node's command key, 64 hex digits (0600): the COSE_Mac0 key the platform signs
                               the node's commands with (gateway/node_commands.py); a gateway has none (Ed25519)

ECDSA P-256 rather than Ed25519: mbedTLS on the ESP32 and every mosquitto build speak it, while
Ed25519 client certificates are still missing from many TLS stacks.

Nothing here prints or logs a secret; `Credentials.password` is left out of its repr so a traceback or a
debug print of the object cannot show it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import ProvisionError
from .atomic import PRIVATE, PUBLIC, private_dir, write_atomic

# An id becomes an MQTT username, a topic level, a certificate CN and a folder name: no `+`, `#` or `/`
# (they would widen an ACL), no `:` (the password file's separator), no leading dot (a hidden folder).
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
PLATFORM = "platform"  # the site's consumer account: reads the whole site, writes commands
CA_YEARS = 20
COMMAND_KEY = "command.key"
CLIENT_YEARS = 10  # nodes stay on a slope for years; renewal in the field is not built (see README)


def check_id(name: str, what: str = "device id") -> str:
    if not _ID.match(name):
        raise ProvisionError(f"{what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                             f"or digit (it becomes the MQTT username and a topic level, so no '/', '+', '#' or ':')")
    return name


def new_password() -> str:
    """256 random bits: far beyond guessing, so the broker's PBKDF2 iteration count does not matter for it."""
    return secrets.token_urlsafe(32)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as `openssl x509 -fingerprint -sha256` shows it (without colons)."""
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class SiteCA:
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert: x509.Certificate


@dataclass(frozen=True)
class Credentials:
    """One MQTT identity as it was written to disk."""

    name: str
    cert: x509.Certificate
    password: str = field(repr=False)
    key_path: Path
    cert_path: Path
    secrets_path: Path

    @property
    def serial_hex(self) -> str:
        return format(self.cert.serial_number, "x")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def create_ca(site: str) -> SiteCA:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Yujing"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"Yujing site CA {site}")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return SiteCA(key, cert)


def issue(ca: SiteCA, cn: str, key: ec.EllipticCurvePrivateKey, *, server_names: tuple[str, ...] = ()) -> x509.Certificate:
    """A leaf certificate: a client one (CN = identity, which mosquitto's use_identity_as_username turns into
    the username the ACL names), or with `server_names` the broker's own."""
    now = _now()
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365 * CLIENT_YEARS))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False))
    if server_names:
        sans: list[x509.GeneralName] = []
        for n in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        b = (b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(ca.key, hashes.SHA256())


def crl_pem(ca: SiteCA, revoked_serials: list[int]) -> bytes:
    """The CA's revocation list, for mosquitto's `crlfile`: with certificates a revoked node is refused at
    the TLS handshake, not only by the ACL. Valid for a year; `broker-files` rewrites it on every change."""
    now = _now()
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
         .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=365)))
    for serial in sorted(set(revoked_serials)):
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(now - dt.timedelta(minutes=5)).build())
    return b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


class IdentityStore:
    """The CA and the identities under one site directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_key_path = root / "ca" / "ca.key"
        self.ca_cert_path = root / "ca" / "ca.crt"

    # --- the CA -------------------------------------------------------------------------------------------

    def create_ca(self, site: str) -> SiteCA:
        """Create the CA once; an existing one is loaded, never replaced (every certificate hangs on it)."""
        if self.ca_key_path.exists():
            return self.load_ca()
        private_dir(self.ca_key_path.parent)
        ca = create_ca(site)
        # The certificate last: its presence is what marks the CA as complete.
        write_atomic(self.ca_key_path, _key_pem(ca.key), PRIVATE)
        write_atomic(self.ca_cert_path, ca.cert.public_bytes(serialization.Encoding.PEM), PUBLIC)
        return ca

    def load_ca(self) -> SiteCA:
        try:
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        except FileNotFoundError as exc:
            raise ProvisionError(f"{exc.filename} is missing: run `yujing provision init-site SITE` first, or pass "
                                 f"--site-dir for the site directory that has it") from None
        except ValueError as exc:
            raise ProvisionError(f"{self.root / 'ca'}: the CA files cannot be read ({exc}); restore them from the "
                                 f"site backup — a new CA would orphan every installed certificate") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise ProvisionError(f"{self.ca_key_path} does not belong to {self.ca_cert_path}; restore both from the site backup")
        return SiteCA(key, cert)

    # --- identities ---------------------------------------------------------------------------------------

    def folder(self, name: str) -> Path:
        return self.root / "identities" / check_id(name, "identity")

    def ensure(self, ca: SiteCA, name: str) -> Credentials:
        """The identity's key, certificate and password, creating what is missing and keeping what exists,
        so a run interrupted half-way is finished by the next one with the same secrets."""
        d = self.folder(name)
        private_dir(d)
        key_path, cert_path, secrets_path = d / "client.key", d / "client.crt", d / "secrets.json"
        if key_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ProvisionError(f"{key_path} is not an EC P-256 key; delete it and run the command again")
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            write_atomic(key_path, _key_pem(key), PRIVATE)
        cert = None
        if cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if cert.public_key() != key.public_key() or cert.issuer != ca.cert.subject:
                cert = None  # a rekey interrupted between key and certificate: issue for the key we have
        if cert is None:
            cert = issue(ca, name, key)
            write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), PUBLIC)
        password = self.password(name) if secrets_path.exists() else None
        if password is None:
            password = new_password()
            self._write_secrets(secrets_path, name, password)
        return Credentials(name, cert, password, key_path, cert_path, secrets_path)

    def rekey(self, ca: SiteCA, name: str) -> Credentials:
        """A new key, certificate and password for an existing identity (the old certificate's serial must
        be recorded as revoked by the caller before this runs)."""
        d = self.folder(name)
        for f in ("client.key", "client.crt", "secrets.json", COMMAND_KEY):
            (d / f).unlink(missing_ok=True)
        return self.ensure(ca, name)

    def load(self, name: str) -> Credentials | None:
        d = self.folder(name)
        try:
            cert = x509.load_pem_x509_certificate((d / "client.crt").read_bytes())
        except FileNotFoundError:
            return None
        password = self.password(name)
        if password is None:
            return None
        return Credentials(name, cert, password, d / "client.key", d / "client.crt", d / "secrets.json")

    def password(self, name: str) -> str | None:
        path = self.folder(name) / "secrets.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:
            raise ProvisionError(f"{path} is not valid JSON; run `yujing provision rekey {name}` to issue a new "
                                 f"password (and copy it to the board)") from None
        pw = data.get("mqtt_password") if isinstance(data, dict) else None
        return pw if isinstance(pw, str) and pw else None

    def command_key_path(self, name: str) -> Path:
        return self.folder(name) / COMMAND_KEY

    def command_key(self, name: str, *, create: bool = True) -> bytes:
        """The node's 32-byte command key: made once per identity (a rekey deletes it, so the next call makes
        a new one) and kept 0600 beside its other secrets; the platform reads it from this file."""
        path = self.command_key_path(name)
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            if not create:
                raise ProvisionError(f"{path} is missing: run `yujing provision rekey {name}`") from None
            from gateway.node_commands import new_node_key

            private_dir(path.parent)
            key = new_node_key()
            write_atomic(path, (key.hex() + "\n").encode(), PRIVATE)
            return key
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ProvisionError(f"{path}: not 64 hex digits; run `yujing provision rekey {name}` for a new key "
                                 f"(and install the node again)")
        return key

    def forget(self, name: str) -> None:
        """Delete a revoked identity's secrets: they can no longer do anything but leak. Its certificate
        stays for the record."""
        d = self.folder(name)
        for f in ("client.key", "secrets.json", COMMAND_KEY):
            (d / f).unlink(missing_ok=True)

    @staticmethod
    def _write_secrets(path: Path, name: str, password: str) -> None:
        # The node firmware reads exactly these keys from its /secrets.json (firmware/README.md).
        data = json.dumps({"mqtt_username": name, "mqtt_password": password}, indent=1) + "\n"
        write_atomic(path, data.encode(), PRIVATE)
