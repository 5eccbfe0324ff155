"""Node commands (COSE_Mac0, HMAC 256/256): the platform side (gateway.node_commands) against an independent
COSE implementation (pycose), and the node's verifier (firmware/yujing_node/command.py, imported under CPython
here; it runs under real MicroPython in tests/test_firmware_unix.py)."""

from __future__ import annotations

import cbor2
import pytest
from pycose.algorithms import HMAC256
from pycose.headers import KID, Algorithm
from pycose.keys import SymmetricKey
from pycose.messages import Mac0Message

from gateway.node_commands import mac_node_command, new_node_key, node_kid
from tests.firmware_helpers import import_firmware

import_firmware()

from yujing_node import command as node_cmd

SITE, NODE, T = "xishan", "slope-07", 1_767_225_600_000


def _mac0(key: bytes, **over) -> bytes:  # type: ignore[no-untyped-def]
    kw: dict = {"by": "li", "request_id": "r1", "rule": "crack.opening", "counter": 7, "ts": T}
    kw.update(over)
    return mac_node_command(key, None, SITE, NODE, "ack", **kw)


def test_pycose_verifies_what_the_platform_macs() -> None:
    key = new_node_key()
    raw = _mac0(key)
    tag = cbor2.loads(raw)
    assert tag.tag == 17
    obj = list(tag.value)
    obj[1] = dict(obj[1])
    msg = Mac0Message.from_cose_obj(obj, True)
    msg.key = SymmetricKey(k=key)
    assert msg.verify_tag()
    assert msg.phdr[KID] == node_kid(key)
    assert cbor2.loads(msg.payload)[28] == 7
    msg.key = SymmetricKey(k=new_node_key())
    assert not msg.verify_tag()


def test_the_node_verifies_what_pycose_macs() -> None:
    key = new_node_key()
    payload = cbor2.dumps({0: 2, 7: SITE, 8: NODE, 20: "threshold", 21: "crack.opening", 22: "li", 23: "r2", 24: T,
                           28: 9, 30: 1, 31: "45.5"}, canonical=True)
    msg = Mac0Message(phdr={Algorithm: HMAC256, KID: node_kid(key)}, payload=payload)
    msg.key = SymmetricKey(k=key)
    raw = msg.encode()
    body = node_cmd.verify(raw, key, node_kid(key))
    c = node_cmd.parse(body, SITE, NODE)
    assert (c.command, c.rule, c.level, c.value, c.counter) == ("threshold", "crack.opening", 1, "45.5", 9)


def test_a_flipped_bit_anywhere_is_refused() -> None:
    key = new_node_key()
    raw = _mac0(key)
    node_cmd.parse(node_cmd.verify(raw, key, node_kid(key)), SITE, NODE)  # intact: accepted
    for i in range(len(raw)):
        tampered = bytearray(raw)
        tampered[i] ^= 0x01
        with pytest.raises(node_cmd.Rejected):
            node_cmd.parse(node_cmd.verify(bytes(tampered), key, node_kid(key)), SITE, NODE)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xd1\x84" + b"\x00" * 400, "size"),
        (b"\xd1\x9f\xff", "shape"),  # indefinite array
        (b"\xd2\x84\x40\xa0\x40\x40", "shape"),  # tag 18 (Sign1) is not a Mac0
        (b"\xd1\x84\x40\xa0\x40\xf9\x3c\x00", "shape"),  # a float
        (b"\xd1\x84\x41\xa0\xa0\x40\x40", "shape"),  # protected header not a map in a bstr
        (b"\xd1\x84\x58\x01\x00\xa0\x40\x40", "shape"),  # non-shortest length
    ],
)
def test_malformed_envelopes_are_refused_before_any_mac(raw: bytes, reason: str) -> None:
    key = new_node_key()
    with pytest.raises(node_cmd.Rejected) as e:
        node_cmd.verify(raw, key, node_kid(key))
    assert e.value.reason == reason, str(e.value)


def test_wrong_key_target_and_unknown_fields() -> None:
    key, other = new_node_key(), new_node_key()
    with pytest.raises(node_cmd.Rejected) as e:
        node_cmd.verify(_mac0(other), key, node_kid(key))
    assert e.value.reason == "unauthorised"
    with pytest.raises(node_cmd.Rejected) as e:  # right kid, wrong key: the MAC fails
        node_cmd.verify(mac_node_command(other, node_kid(key), SITE, NODE, "report", by="li", request_id="r"),
                        key, node_kid(key))
    assert e.value.reason == "unauthorised" and "bad MAC" in str(e.value)
    body = node_cmd.verify(mac_node_command(key, None, SITE, "slope-08", "report", by="li", request_id="r"), key,
                           node_kid(key))
    with pytest.raises(node_cmd.Rejected) as e:
        node_cmd.parse(body, SITE, NODE)
    assert e.value.reason == "target"
    with pytest.raises(node_cmd.Rejected) as e:
        node_cmd.parse(cbor2.dumps({0: 2, 7: SITE, 8: NODE, 20: "report", 22: "li", 23: "r", 24: T, 28: 1, 99: 1},
                                   canonical=True), SITE, NODE)
    assert e.value.reason == "shape" and "unknown key 99" in str(e.value)


def test_hmac_matches_the_standard_library() -> None:
    import hashlib
    import hmac

    key = new_node_key()
    assert node_cmd.hmac_sha256(key, (b"ab", b"cd")) == hmac.new(key, b"abcd", hashlib.sha256).digest()
