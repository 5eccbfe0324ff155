"""The platform side of node commands: COSE_Mac0 (RFC 9052, tag 17) with HMAC 256/256 (alg 5) under a node's
own 32-byte key. The node's verifier is firmware/yujing_node/command.py; the format is in docs/wire-format.md
("Node commands"). A node has no Ed25519 (see there for the measurement), so unlike a gateway it shares a key
with the platform — one key per node, so a captured node can only command itself.

`mac_node_command` makes the bytes; `yujing provision` generates the key (`new_node_key`) and writes it to the
node's /secrets.json as "command_key" (64 hex digits). pycose checks what this makes (tests/test_node_commands.py).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

import cbor2

from .commands import (
    H_ALG,
    H_KID,
    K_BY,
    K_COMMAND,
    K_COUNTER,
    K_GATEWAY,
    K_ID,
    K_RULE,
    K_SITE,
    K_TS,
    K_VERSION,
    kid_of,
)

COSE_MAC0_TAG = 17
ALG_HMAC_256_256 = 5
COMMAND_VERSION = 2
K_LEVEL, K_VALUE, K_CLEAR = 30, 31, 32  # threshold: level 1..4, set and clear as decimal text ("45.5")
NODE_COMMANDS = ("ack", "threshold", "report")
KEY_BYTES = 32
MAX_NODE_COMMAND_BYTES = 384  # the node refuses larger ones unread


def new_node_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def node_kid(key: bytes) -> bytes:
    """The key's id as the node computes it: the first 8 bytes of SHA-256 of the key (as a gateway key's kid)."""
    return kid_of(key)


def _mac_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["MAC0", protected, b"", payload], canonical=True)


def mac_node_command(
    key: bytes, kid: bytes | None, site: str, node: str, command: str, *, by: str, request_id: str,
    rule: str | None = None, level: int | None = None, value: str | None = None, clear: str | None = None,
    counter: int | None = None, ts: int | None = None,
) -> bytes:
    """One command for one node. `counter` must grow with every command for that node (default: the time in
    microseconds); `ts` is epoch ms (default now). `kid` None: derived from the key."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a node command key has {KEY_BYTES} bytes, not {len(key)}")
    if command not in NODE_COMMANDS:
        raise ValueError(f"unknown node command {command!r} (known: {', '.join(NODE_COMMANDS)})")
    now_us = time.time_ns() // 1000
    msg: dict[int, object] = {
        K_VERSION: COMMAND_VERSION, K_SITE: site, K_GATEWAY: node, K_COMMAND: command, K_BY: by, K_ID: request_id,
        K_TS: ts if ts is not None else now_us // 1000, K_COUNTER: counter if counter is not None else now_us,
    }
    for k, v in ((K_RULE, rule), (K_LEVEL, level), (K_VALUE, value), (K_CLEAR, clear)):
        if v is not None:
            msg[k] = v
    payload = cbor2.dumps(msg, canonical=True)
    protected = cbor2.dumps({H_ALG: ALG_HMAC_256_256, H_KID: kid if kid is not None else node_kid(key)}, canonical=True)
    tag = hmac.new(key, _mac_structure(protected, payload), hashlib.sha256).digest()
    out = cbor2.dumps(cbor2.CBORTag(COSE_MAC0_TAG, [protected, {}, payload, tag]), canonical=True)
    if len(out) > MAX_NODE_COMMAND_BYTES:
        raise ValueError(f"{len(out)} bytes: the node refuses commands above {MAX_NODE_COMMAND_BYTES} "
                         "(shorten by, id or rule)")
    return out
