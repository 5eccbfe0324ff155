"""The wire format: deterministic bytes, value encoding rules, decoding, size and the CDDL schema."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

import cbor2
import pycddl
import pytest

from gateway import wire
from gateway.model import PointInfo, Quality, Reading

SCHEMA = pycddl.Schema((Path(__file__).parent.parent / "docs" / "wire-format.cddl").read_text())
T = 1_764_390_000_000


def test_pinned_cbor2_canonical_mode_sorts_length_first() -> None:
    # cbor2 6.2's canonical mode uses RFC 7049's length-first order (10, -1, 100), not RFC 8949
    # §4.2.1's bytewise order (10, 100, -1). If this changes, re-check the next test's premise.
    encoded = cbor2.dumps({"aa": 5, "z": 4, -1: 3, 100: 2, 10: 1}, canonical=True)
    assert encoded == bytes.fromhex("a5" "0a01" "2003" "186402" "617a04" "62616105")


def _maps_in_stream_order(item: object) -> list[list[object]]:
    if isinstance(item, dict):
        return [list(item)] + [m for v in item.values() for m in _maps_in_stream_order(v)]
    if isinstance(item, list):
        return [m for v in item for m in _maps_in_stream_order(v)]
    return []


def test_every_map_is_in_rfc8949_bytewise_key_order() -> None:
    # Yujing maps only have unsigned integer keys, for which length-first and bytewise order agree;
    # check the emitted order directly (cbor2 decodes maps in stream order), qualities up to index 300.
    readings = [Reading(i, T, None if i % 7 == 0 else i, Quality.TIMEOUT if i % 7 == 0 else 0) for i in range(300)]
    payloads = [
        wire.encode_data(1, 2, readings, historical=True),
        wire.encode_birth(session=1, ts_ms=T, site="s", gateway="g", software="v", catalogue=[], back_at_ms=T),
        wire.encode_death(session=1, reason=2, ts_ms=T, back_at_ms=T),
    ]
    for payload in payloads:
        for keys in _maps_in_stream_order(cbor2.loads(payload)):
            assert all(isinstance(k, int) and k >= 0 for k in keys)
            assert keys == sorted(keys, key=lambda k: cbor2.dumps(k))


def test_data_message_golden_bytes() -> None:
    payload = wire.encode_data(3, 17, [Reading(0, T, 9617), Reading(1, T, Decimal("1953.383"))])
    assert payload.hex() == (
        "a5"  # map of 5
        "0001"  # 0: version 1
        "0103"  # 1: session 3
        "0211"  # 2: seq 17
        "031b0000019acdd6d580"  # 3: t0
        "04" "81" "84" "00" "820001" "82192591" "c482221a001dce67" "a0"
        # 4: [[dt 0, points [0, +1], values [9617, 4([-3, 1953383])], {}]]
    )


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (7, "07"),
        (-10, "29"),
        (65535, "19ffff"),
        (True, "f5"),
        (None, "f6"),
        (32.5, "f95010"),  # float16 holds it exactly
        (100000.0, "fa47c35000"),  # float32, not float16
        (1.1, "fb3ff199999999999a"),  # only float64 holds the double 1.1
        (Decimal("32.5"), "f95010"),  # a binary-exact decimal is the shortest float
        (Decimal("20.0"), "14"),  # a whole decimal is an integer
        (Decimal("1953.38"), "c482211a0002fb0a"),  # 4([-2, 195338]): no float holds 1953.38
        (Decimal("12.860"), "c48221190506"),  # normalised: 4([-2, 1286]), not 4([-3, 12860])
        (Decimal("-10.1"), "c482203864"),  # 4([-1, -101])
    ],
)
def test_value_encoding_rules(value: object, encoded: str) -> None:
    assert cbor2.dumps(wire.wire_value(value), canonical=True).hex() == encoded  # type: ignore[arg-type]


def test_round_trip_keeps_values_qualities_and_times() -> None:
    readings = [
        Reading(4, T + 1000, Decimal("1953.38")),
        Reading(2, T, -7),
        Reading(9, T, None, Quality.TIMEOUT),
        Reading(3, T + 1000, 0.15625),
        Reading(7, T, 12, 0x82),
        Reading(8, T + 5, True),
    ]
    data = wire.decode_data(wire.encode_data(1, 2, readings, historical=True))
    assert (data.session, data.seq, data.historical) == (1, 2, True)
    key = lambda r: (r.ts_ms, r.point)  # noqa: E731
    assert sorted(data.readings, key=key) == sorted(readings, key=key)


def test_hundred_uint16_readings_fit_the_byte_budget() -> None:
    rng = random.Random(1)
    readings = [Reading(i, T, rng.randrange(256, 65536)) for i in range(100)]  # worst case: 3-byte values
    size = len(wire.encode_data(12, 123456, readings))
    assert size / 100 <= 6.0, f"{size / 100:.2f} bytes per reading"


def test_birth_and_death_round_trip() -> None:
    cat = [PointInfo("radar", "gap", "mm", "uint16"), PointInfo("rain", "total", "mm", "uint32")]
    b = wire.decode_birth(wire.encode_birth(session=4, ts_ms=T, site="KM-RES-01", gateway="gw1", software="0.1.0", catalogue=cat, dropped=3))
    assert (b.session, b.site, b.gateway, b.catalogue, b.dropped, b.kind) == (4, "KM-RES-01", "gw1", tuple(cat), 3, "gateway")
    d = wire.decode_death(wire.encode_death(session=4, reason=wire.DEATH_LOST))
    assert (d.session, d.reason, d.ts_ms) == (4, "lost", None)


def test_payloads_validate_against_cddl() -> None:
    SCHEMA.validate_cbor(wire.encode_data(1, 1, [Reading(0, T, Decimal("1953.38")), Reading(1, T, None, 0x84), Reading(2, T + 9, 3.5)]))
    SCHEMA.validate_cbor(wire.encode_birth(session=1, ts_ms=T, site="s", gateway="g", software="v", catalogue=[PointInfo("d", "p", "", "bool")]))
    SCHEMA.validate_cbor(wire.encode_death(session=1, reason=wire.DEATH_CLEAN, ts_ms=T))
    SCHEMA.validate_cbor(wire.encode_death(session=1, reason=wire.DEATH_SLEEPING, ts_ms=T, back_at_ms=T + 600_000))


@pytest.mark.parametrize(
    "bad",
    [
        {0: 1, 1: 1, 2: 1, 3: T, 4: [[0, [0], [1], {0: 99}]]},  # unknown quality code
        {0: 2, 1: 1, 2: 1, 3: T, 4: [[0, [0], [1], {}]]},  # wrong version
        {0: 1, 1: 1, 3: T, 4: [[0, [0], [1], {}]]},  # no seq
        {0: 1, 1: 1, 2: 1, 3: T, 4: [[0, [0], ["x"], {}]]},  # a string value
    ],
)
def test_cddl_rejects_malformed_data(bad: dict) -> None:
    with pytest.raises(pycddl.ValidationError):
        SCHEMA.validate_cbor(cbor2.dumps(bad, canonical=True))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\x00", r"refused before decoding: byte 0: unexpected break code"),
        (b"\xa1\x00", r"refused before decoding: byte 0: truncated map"),
        (cbor2.dumps([1, 2]), "expected a CBOR map"),
        (cbor2.dumps({0: 9}), "format version 9"),
        (cbor2.dumps({0: 1, 1: 1, 2: 5, 3: T, 4: [[0, [0, 1], [7], {}]]}), "2 points but 1 values"),
        (cbor2.dumps({0: 1, 1: "x", 2: 5, 3: T, 4: []}), "key 1 has type str"),
    ],
)
def test_decoder_errors_name_the_fault(payload: bytes, message: str) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.decode_data(payload)


def test_topics() -> None:
    t = wire.parse_topic("yujing/v1/KM-RES-01/gw1/data")
    assert (t.prefix, t.site, t.gateway, t.kind) == ("yujing/v1", "KM-RES-01", "gw1", "data")
    assert str(t) == "yujing/v1/KM-RES-01/gw1/data"
    with pytest.raises(wire.WireError, match="expected <prefix>"):
        wire.parse_topic("yujing/v1/KM-RES-01/gw1/status")
