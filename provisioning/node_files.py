"""What a node's flash holds besides the firmware, built from the site directory: the files a TLS node needs.

    /config.json    the plan's config with its mqtt section set for TLS ("tls": true; host and port from the
                    plan's [broker] when the config leaves them out)
    /secrets.json   the identity's mqtt_username and mqtt_password, its command_key (64 hex digits: COSE_Mac0
                    commands, gateway/node_commands.py) and, when the plan gives one, wifi_password
    /ca.der         the site CA certificate         } DER: the firmware's mbedTLS has no PEM parser
    /cert.der       the node's client certificate   } (firmware/README.md); paths from mqtt.ca_file, cert_file
    /key.der        the node's private key (SEC1)   } and key_file when the config names others

The secret ones (/secrets.json, the key) are `Secret` bytes, whose repr shows no byte of them, and they exist on
the laptop only in memory and in the 0600 temporary files of the copy (provisioning.board). The bytes are
deterministic for the same identity and config, so the journal's inputs hash of the files step is stable and
changes with any of them (a re-key, a new config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import ProvisionError
from .identity import IdentityStore

TLS_FILES = (("ca_file", "/ca.der"), ("cert_file", "/cert.der"), ("key_file", "/key.der"))


class Secret(bytes):
    """Bytes of a secret file whose repr shows no secret (a traceback or a debug print cannot leak it)."""

    name = "secret"

    def __repr__(self) -> str:
        return f"<{self.name}, {len(self)} bytes>"


def secret(data: bytes, name: str) -> Secret:
    s = Secret(data)
    s.name = name
    return s


@dataclass(frozen=True)
class Broker:
    """Where the node reaches the broker, when its config does not say (the plan's [broker])."""

    host: str
    port: int
    tls: bool = True


def tls_config(config: bytes, where: str, broker: Broker | None) -> tuple[bytes, dict[str, str]]:
    """(the config to write, {"ca_file": path, …} on the board). A config whose mqtt section already says all
    this is written as it is, byte for byte; otherwise it is rewritten (JSON, keys in their order)."""
    try:
        cfg: Any = json.loads(config)
    except ValueError as exc:
        raise ProvisionError(f"{where}: not valid JSON ({exc})") from None
    mqtt = cfg.get("mqtt")
    if mqtt is None:
        mqtt = {}
    if not isinstance(mqtt, dict):
        raise ProvisionError(f"{where}: mqtt: an object (firmware/README.md)")
    if broker is not None and not broker.tls:
        raise ProvisionError(f"{where}: the plan's [broker] says tls = false; nodes are provisioned for TLS with "
                             f"their own certificate only (set tls = true and the broker's TLS port)")
    if mqtt.get("tls") is False:
        raise ProvisionError(f"{where}: mqtt.tls is false; this tool installs nodes with TLS and a client "
                             f"certificate: remove the key (it is set to true) or set it to true")
    want = dict(mqtt)
    want["tls"] = True
    if "host" not in want:
        if broker is None:
            raise ProvisionError(f"{where}: mqtt.host is missing and the plan has no [broker]: give the broker's "
                                 f"address as the node reaches it")
        want["host"] = broker.host
    if "port" not in want and broker is not None:
        want["port"] = broker.port
    files = {}
    for key, default in TLS_FILES:
        path = want.get(key, default)
        if not isinstance(path, str) or not path.startswith("/") or "'" in path or path.endswith("/"):
            raise ProvisionError(f"{where}: mqtt.{key}: an absolute file path on the board, like {default}")
        files[key] = path
    if want == mqtt:
        return config, files
    cfg["mqtt"] = want
    return (json.dumps(cfg, indent=1, ensure_ascii=False) + "\n").encode(), files


def der_files(store: IdentityStore, node_id: str, paths: dict[str, str]) -> dict[str, bytes]:
    """The site CA, the node's certificate and its key as DER under the config's paths."""
    folder = store.folder(node_id)
    try:
        ca = x509.load_pem_x509_certificate(store.ca_cert_path.read_bytes())
        cert = x509.load_pem_x509_certificate((folder / "client.crt").read_bytes())
        key = serialization.load_pem_private_key((folder / "client.key").read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ProvisionError(f"{exc.filename} is missing: the identity step did not finish; run again") from None
    key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return {paths["ca_file"]: ca.public_bytes(serialization.Encoding.DER),
            paths["cert_file"]: cert.public_bytes(serialization.Encoding.DER),
            paths["key_file"]: secret(key_der, f"{node_id}'s key")}


def node_secrets(store: IdentityStore, node_id: str, wifi_password_file: Path | None = None) -> Secret:
    """/secrets.json: the identity's MQTT account, its command key and the Wi-Fi password (firmware/README.md)."""
    path = store.folder(node_id) / "secrets.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProvisionError(f"{path} is missing: the identity step did not finish; run again") from None
    doc["command_key"] = store.command_key(node_id).hex()
    if wifi_password_file is not None:
        doc["wifi_password"] = wifi_password_file.read_text(encoding="utf-8").strip()
    return secret((json.dumps(doc, indent=1) + "\n").encode(), "secrets.json")


def node_files(store: IdentityStore, node_id: str, config: bytes | None, where: str, *, broker: Broker | None,
               wifi_password_file: Path | None = None) -> dict[str, bytes]:
    """Every file the files step writes (one copy: all are put in force together, or none). Without a config
    (`flash --node` alone), no /config.json and the TLS files at the firmware's default paths."""
    files: dict[str, bytes] = {}
    paths = dict(TLS_FILES)
    if config is not None:
        files["/config.json"], paths = tls_config(config, where, broker)
    return {**files, "/secrets.json": node_secrets(store, node_id, wifi_password_file),
            **der_files(store, node_id, paths)}
