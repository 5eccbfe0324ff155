"""Signed commands to a gateway: COSE_Sign1 (RFC 9052) with Ed25519 (RFC 9053, alg EdDSA = -8).

The platform holds the private key; a gateway holds only public keys, so a stolen gateway cannot command
the others. Verification runs over the received bytes before anything inside the signed payload is decoded:

    1. size: more than MAX_COMMAND_BYTES is refused unread;
    2. shape: a strict walk of the envelope (cborcheck: definite lengths, no floats, no tags but COSE_Sign1's
       18, integers within 64 bits, integer header labels, no duplicate keys), then the four fields;
    3. signature: Ed25519 over Sig_structure ["Signature1", protected, h'', payload], built from the bytes
       as received (nothing is re-encoded), with the key named by the protected header's kid;
    4. only then the payload, walked just as strictly and decoded: site, gateway, command, arguments,
       timestamp and a counter that must exceed the last one accepted from that key (ReplayStore, kept on
       disk, so a captured command does not replay after a restart or on another gateway: the site and
       gateway are inside what was signed).

Replies and logs quote at most a short, escaped prefix of anything that came from outside (`quote`).
`sign_command` is the platform side (`yujing send-ack` uses it); pycose verifies what it makes (tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from . import cborcheck

MAX_COMMAND_BYTES = 1024
COMMAND_VERSION = 2
COSE_SIGN1_TAG = 18
ALG_EDDSA = -8
H_ALG, H_KID = 1, 4  # COSE header labels
KID_BYTES = 8

# Payload keys (a command is a map with small unsigned keys, as every Yujing message)
K_VERSION, K_SITE, K_GATEWAY = 0, 7, 8
K_COMMAND, K_RULE, K_BY, K_ID, K_TS, K_COUNTER = 20, 21, 22, 23, 24, 28
COMMANDS = ("ack",)
MAX_TEXT = 64  # characters in rule, by, id

_ENVELOPE = cborcheck.Policy(max_bytes=MAX_COMMAND_BYTES, max_depth=3, max_items=64, max_string=MAX_COMMAND_BYTES,
                             tags=frozenset({COSE_SIGN1_TAG}), canonical=True)
_HEADER = cborcheck.Policy(max_bytes=64, max_depth=1, max_items=8, max_string=32, canonical=True)
_PAYLOAD = cborcheck.Policy(max_bytes=MAX_COMMAND_BYTES, max_depth=1, max_items=32, max_string=256, canonical=True)


# Every CommandRejected reason, here and in gateway.command_inbox: a fixed set, so a count by reason stays
# bounded (gateway.metrics labels by it).
REJECT_REASONS = ("size", "shape", "unauthorised", "target", "content", "retained", "stale", "replay", "storage")


class CommandRejected(ValueError):
    """A command that is not carried out. `reason` is a short machine-readable word (size, shape,
    unauthorised, target, replay, stale, content), the message says what is wrong in plain words and never
    repeats more than a short escaped prefix of the untrusted input."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Command:
    command: str
    rule: str
    by: str
    request_id: str
    ts_ms: int
    counter: int
    kid: bytes


def quote(value: object, limit: int = 32) -> str:
    """A short, escaped rendering of untrusted input for a log line or a reply (no newlines, no megabytes)."""
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value[:limit]).hex() + ("…" if len(value) > limit else "")
        return f"h'{text}'"
    if isinstance(value, str):
        cut = value[:limit]
        return json.dumps(cut, ensure_ascii=True) + ("…" if len(value) > limit else "")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if -(1 << 64) < value < (1 << 64) else "(an integer too large to print)"
    return f"({type(value).__name__})"


def digest(payload: bytes) -> bytes:
    """What a reply names a command by: the first 8 bytes of SHA-256 of its raw bytes (never its content)."""
    return hashlib.sha256(payload).digest()[:8]


# ---------------------------------------------------------------------------------------------- keys


def _crypto():  # type: ignore[no-untyped-def]
    # Imported on first use: the platform's decoder (gateway.wire) does not need it.
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    return InvalidSignature, serialization, Ed25519PrivateKey, Ed25519PublicKey


def kid_of(public_raw: bytes) -> bytes:
    """A key's id: the first 8 bytes of SHA-256 of its 32 raw bytes (stable, derived, nothing to configure)."""
    return hashlib.sha256(public_raw).digest()[:KID_BYTES]


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and what to do."""


def load_public_key(path: Path) -> Any:
    """An Ed25519 public key from a PEM file ("-----BEGIN PUBLIC KEY-----"). Raises KeyFileError."""
    _, serialization, _, Ed25519PublicKey = _crypto()
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc}); make one with: yujing command-key new FILE") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def load_private_key(path: Path) -> Any:
    """The platform's Ed25519 private key (PEM, unencrypted). Refused when others may read the file."""
    _, serialization, Ed25519PrivateKey, _ = _crypto()
    mode = _mode(path)
    if mode & 0o077:
        raise KeyFileError(f"{path}: a signing key readable by others (mode {mode:04o}); run: chmod 600 {path}")
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
    return key


def _mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None


def _read_key_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    if not data.strip():
        raise KeyFileError(f"{path}: empty")
    if len(data) > 16_384:
        raise KeyFileError(f"{path}: {len(data)} bytes is no key file")
    return data


def public_raw(key: Any) -> bytes:
    _, serialization, _, _ = _crypto()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def new_key_pair(private_path: Path) -> tuple[Path, bytes]:
    """Write a new Ed25519 key pair: the private key (0600) at `private_path`, the public one beside it
    as `<name>.pub`. Returns (public path, kid). Refuses to overwrite."""
    _, serialization, Ed25519PrivateKey, _ = _crypto()
    key = Ed25519PrivateKey.generate()
    public_path = private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise KeyFileError(f"{p}: exists; not overwritten")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key()
    public_path.write_bytes(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return public_path, kid_of(public_raw(pub))


class Keyring:
    """The platform public keys a gateway accepts commands from, by kid (several during a key rotation)."""

    def __init__(self, keys: Iterable[Any]) -> None:
        self._keys = {kid_of(public_raw(k)): k for k in keys}

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> Keyring:
        return cls(load_public_key(p) for p in paths)

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, kid: bytes) -> Any | None:
        return self._keys.get(kid)


# ---------------------------------------------------------------------------------------------- signing


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, b"", payload], canonical=True)


def sign_command(
    private_key: Any, *, site: str, gateway: str, command: str, rule: str, by: str, request_id: str,
    ts_ms: int | None = None, counter: int | None = None,
) -> bytes:
    """Platform side: a COSE_Sign1 command for one gateway. `counter` must grow with every command signed
    with this key (default: the time in microseconds, which does on one host with a sane clock)."""
    now_us = time.time_ns() // 1000
    payload = cbor2.dumps({
        K_VERSION: COMMAND_VERSION, K_SITE: site, K_GATEWAY: gateway, K_COMMAND: command, K_RULE: rule, K_BY: by,
        K_ID: request_id, K_TS: ts_ms if ts_ms is not None else now_us // 1000, K_COUNTER: counter if counter is not None else now_us,
    }, canonical=True)
    kid = kid_of(public_raw(private_key.public_key()))
    protected = cbor2.dumps({H_ALG: ALG_EDDSA, H_KID: kid}, canonical=True)
    signature = private_key.sign(_sig_structure(protected, payload))
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]), canonical=True)


# ---------------------------------------------------------------------------------------------- verifying


def _strict(data: bytes, policy: cborcheck.Policy, what: str) -> Any:
    try:
        cborcheck.check(data, policy)
    except cborcheck.CborRejected as exc:
        raise CommandRejected("shape", f"{what}: {exc}") from None
    return cbor2.loads(data)


def verify(payload: bytes, keys: Keyring) -> tuple[bytes, bytes]:
    """Steps 1–3: (kid, signed payload bytes) of an authentic envelope, or CommandRejected. Decodes
    nothing of the payload."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandRejected("size", f"{len(payload)} bytes, more than the {MAX_COMMAND_BYTES} a command may have")
    if len(keys) == 0:
        raise CommandRejected("unauthorised", "this gateway accepts no remote commands (no uplink.command_public_key_file)")
    envelope = _strict(payload, _ENVELOPE, "envelope")
    if not (isinstance(envelope, cbor2.CBORTag) and envelope.tag == COSE_SIGN1_TAG):
        raise CommandRejected("shape", "not a COSE_Sign1 (tag 18) message; commands of format 1 (HMAC) are no longer accepted")
    body = envelope.value  # cbor2 gives a tag's content as a tuple, its maps as frozendicts
    if not (isinstance(body, (list, tuple)) and len(body) == 4):
        raise CommandRejected("shape", "COSE_Sign1 must be [protected, unprotected, payload, signature]")
    protected, unprotected, signed, signature = body
    if not (isinstance(protected, bytes) and isinstance(unprotected, Mapping) and isinstance(signed, bytes) and isinstance(signature, bytes)):
        raise CommandRejected("shape", "COSE_Sign1 fields have the wrong types")
    if unprotected:
        raise CommandRejected("shape", "the unprotected header must be empty")
    header = _strict(protected, _HEADER, "protected header")
    if not isinstance(header, dict) or header.get(H_ALG) != ALG_EDDSA or set(header) - {H_ALG, H_KID}:
        raise CommandRejected("shape", "protected header must be {1: -8 (EdDSA), 4: kid}")
    kid = header.get(H_KID)
    if not isinstance(kid, bytes):
        raise CommandRejected("shape", "protected header has no kid (label 4)")
    key = keys.get(kid)
    if key is None:
        raise CommandRejected("unauthorised", f"signed with unknown key {quote(kid)}")
    if len(signature) != 64:
        raise CommandRejected("unauthorised", "bad signature")
    InvalidSignature, *_ = _crypto()
    try:
        key.verify(signature, _sig_structure(protected, signed))
    except InvalidSignature:
        raise CommandRejected("unauthorised", "bad signature") from None
    return kid, signed


def parse_payload(signed: bytes, kid: bytes, *, site: str, gateway: str) -> Command:
    """Step 4: the authentic payload's fields, checked. Raises CommandRejected."""
    msg = _strict(signed, _PAYLOAD, "payload")
    if not isinstance(msg, dict):
        raise CommandRejected("shape", "payload is not a map")
    if msg.get(K_VERSION) != COMMAND_VERSION:
        raise CommandRejected("shape", f"payload version {quote(msg.get(K_VERSION))}, this gateway reads {COMMAND_VERSION}")
    text = {K_SITE: "site", K_GATEWAY: "gateway", K_COMMAND: "command", K_RULE: "rule", K_BY: "by", K_ID: "id"}
    for key, name in text.items():
        if not isinstance(msg.get(key), str):
            raise CommandRejected("shape", f"field {name} (key {key}) missing or not text")
    for key, name in ((K_TS, "ts"), (K_COUNTER, "counter")):
        v = msg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise CommandRejected("shape", f"field {name} (key {key}) missing or not an unsigned integer")
    unknown = set(msg) - {K_VERSION, K_TS, K_COUNTER, *text}
    if unknown:
        raise CommandRejected("shape", f"unknown keys {sorted(unknown)[:8]}")
    if (msg[K_SITE], msg[K_GATEWAY]) != (site, gateway):
        raise CommandRejected("target", f"addressed to {quote(msg[K_SITE])}/{quote(msg[K_GATEWAY])}, this is {site}/{gateway}")
    if msg[K_COMMAND] not in COMMANDS:
        raise CommandRejected("content", f"unknown command {quote(msg[K_COMMAND])} (known: {', '.join(COMMANDS)})")
    for key in (K_RULE, K_BY, K_ID):
        v = msg[key]
        if not v.strip() or len(v) > MAX_TEXT or not v.isprintable():
            raise CommandRejected("content", f"field {text[key]} must be 1–{MAX_TEXT} printable characters, got {quote(v)}")
    return Command(msg[K_COMMAND], msg[K_RULE], msg[K_BY], msg[K_ID], msg[K_TS], msg[K_COUNTER], kid)


# ---------------------------------------------------------------------------------------------- replay


class ReplayStore:
    """The highest counter accepted from each key, in a small JSON file replaced atomically (0600).

    A command is accepted only when its counter is above the stored one, and the new counter is on disk
    before the command runs: a captured command cannot be replayed, not even after a restart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counters: dict[str, int] = {}
        self.lost: str | None = None  # why an unreadable file was set aside, for a gateway fault

    def load(self) -> None:
        from .storefiles import read_json, quarantine

        try:
            raw = read_json(self.path)
        except ValueError as exc:
            aside = quarantine(self.path)
            self.lost = f"command counters {self.path} unreadable ({exc}); moved to {aside.name}; counters restart from the current time"
            raw = None
        if raw is None:
            return
        if not (isinstance(raw, dict) and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in raw.items())):
            aside = quarantine(self.path)
            self.lost = f"command counters {self.path} malformed; moved to {aside.name}"
            return
        self.counters = dict(raw)

    def floor(self, kid: bytes, now_ms: int) -> int:
        """The counter a command from `kid` must exceed. With no record (first command ever, or the file
        was lost), commands signed before the gateway's time minus the skew are refused by their ts."""
        return self.counters.get(kid.hex(), 0)

    def accept(self, kid: bytes, counter: int) -> dict[str, int]:
        """The new counters to save (the caller saves them before running the command)."""
        return {**self.counters, kid.hex(): counter}

    def save(self, counters: Mapping[str, int]) -> None:
        """Durably replace the file; raises OSError (then the command is refused)."""
        from .storefiles import write_json_atomic

        write_json_atomic(self.path, dict(counters))
        self.counters = dict(counters)
