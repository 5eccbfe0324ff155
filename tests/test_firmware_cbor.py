"""The node's CBOR is the gateway's CBOR: byte-for-byte equal to gateway.wire for the same
readings, decodable by the gateway's consumer, valid against docs/wire-format.cddl.

The golden table is encoded by the firmware under real MicroPython (firmware/host/checks/
golden_wire.py via the WebAssembly port); a randomised comparison runs the same firmware
modules under CPython for thousands more values. No fakes are involved.
"""

from __future__ import annotations

import json
import random
import struct
from decimal import Decimal

import pycddl
import pytest

from gateway import wire
from gateway.model import PointInfo, Reading
from tests.firmware_helpers import CHECKS, ROOT, import_firmware, run_micropython

SCHEMA = pycddl.Schema((ROOT / "docs" / "wire-format.cddl").read_text())
T = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def f64(x: float) -> str:
    return struct.pack(">d", x).hex()


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# (point, ts, kind, args..., quality) -> the node's form; value -> the gateway's Reading value
def R(point, ts, kind, *args, q=0):
    return [point, ts, kind, *args, q]


def gateway_value(r: list):
    kind, args = r[2], r[3:-1]
    if kind == "null":
        return None
    if kind in ("bool", "int"):
        return args[0]
    if kind == "f64":
        return struct.unpack(">d", bytes.fromhex(args[0]))[0]
    if kind == "scaled":
        return Decimal(args[0]) * Decimal(args[1]) + Decimal(args[2])
    return Decimal(args[0])


DATA_CASES = {
    "ints": [R(0, T, "int", 0), R(1, T, "int", 23), R(2, T, "int", 24), R(3, T, "int", 65536), R(4, T, "int", 2**40)],
    "negatives": [R(0, T, "int", -1), R(1, T, "int", -25), R(2, T, "int", -(2**31)), R(3, T, "int", -(2**63))],
    "float16": [
        R(0, T, "f64", f64(1.5)),
        R(1, T, "f64", f64(-0.0)),
        R(2, T, "f64", f64(65504.0)),
        R(3, T, "f64", f64(2.0**-24)),
    ],
    "float32": [
        R(0, T, "f64", f64(f32(0.1))),
        R(1, T, "f64", f64(65520.0)),
        R(2, T, "f64", f64(f32(1953.38))),
        R(3, T, "f64", f64(2.0**-149)),
    ],
    "float64": [
        R(0, T, "f64", f64(0.1)),
        R(1, T, "f64", f64(1953.38)),
        R(2, T, "f64", f64(1e300)),
        R(3, T, "f64", f64(5e-324)),
    ],
    "float_specials": [R(0, T, "f64", f64(float("inf"))), R(1, T, "f64", f64(float("-inf")))],
    "decimals": [
        R(0, T, "dec", "1953.38"),
        R(1, T, "dec", "32.5"),
        R(2, T, "dec", "-0.001"),
        R(3, T, "dec", "100.00"),
        R(4, T, "dec", "0.000123"),
    ],
    "scaled_registers": [
        R(0, T, "scaled", 5338, "0.01", "1900"),  # 1953.38 m -> 4([-2, 195338])
        R(1, T, "scaled", 325, "0.1", "0"),  # 32.5 -> float16
        R(2, T, "scaled", 9617, "-0.001", "1963"),  # 1953.383 (radar gap mode)
        R(3, T, "scaled", 65535, "0.0015", "-2.5"),  # 95.8025
        R(4, T, "scaled", 400, "0.25", "0"),  # whole -> int 100
        R(5, T, "scaled", -456, "0.001", "0"),  # int32 tilt -0.456
    ],
    "none_with_quality": [
        R(0, T, "null", q=1),
        R(1, T, "null", q=2),
        R(2, T, "null", q=3),
        R(3, T, "int", 7),
        R(4, T, "null", q=0x82),
        R(5, T, "null", q=6),
    ],
    "out_of_range_keeps_value": [R(0, T, "dec", "120.5", q=4), R(1, T, "int", 3)],
    "bools": [R(0, T, "bool", True), R(1, T, "bool", False), R(5, T, "null", q=5)],
    "several_timestamps_unsorted": [
        R(4, T + 60_000, "int", 3),
        R(0, T, "dec", "1.1"),
        R(2, T + 30_000, "dec", "2.25"),
        R(1, T, "int", 9),
        R(0, T + 60_000, "null", q=1),
        R(0, T + 30_000, "f64", f64(0.5)),
        R(7, T + 86_400_000, "int", 1),
    ],
    "duplicate_point_same_ts": [R(3, T, "int", 1), R(3, T, "int", 2), R(1, T, "int", 0)],
    "sparse_points": [R(200, T, "int", 1), R(0, T, "int", 2), R(254, T, "int", 3), R(17, T, "int", 4)],
    "single": [R(0, T, "int", 0)],
}


def data_cases():
    out = []
    for i, (name, readings) in enumerate(DATA_CASES.items()):
        session, seq = (1, 1) if i % 3 == 0 else ((7, 123456) if i % 3 == 1 else (2**32 - 1, 2**40))
        out.append(
            {
                "name": name,
                "kind": "data",
                "session": session,
                "seq": seq,
                "historical": i % 2 == 1,
                "readings": readings,
            }
        )
    out.append(
        {
            "name": "historical_flag",
            "kind": "data",
            "session": 3,
            "seq": 9,
            "historical": True,
            "readings": DATA_CASES["decimals"],
        }
    )
    return out


CATALOGUE = [
    ("crack", "opening", "mm", "uint16"),
    ("rain", "rain", "mm", "uint32"),
    ("env", "temperature", "Cel", "uint16"),
    ("gas", "ch4", "%LEL", "float32"),
]
BIRTH_CASES = [
    {
        "name": "birth_awake",
        "kind": "birth",
        "session": 4,
        "ts": T,
        "site": "xishan",
        "node": "slope-07",
        "software": "0.1.0",
        "catalogue": CATALOGUE,
        "dropped": 0,
        "back_at": None,
    },
    {
        "name": "birth_sleeping",
        "kind": "birth",
        "session": 70000,
        "ts": T,
        "site": "水库",
        "node": "n-1",
        "software": "0.1.0",
        "catalogue": CATALOGUE[:1],
        "dropped": 1234,
        "back_at": T + 600_000,
    },
]
DEATH_CASES = [
    {"name": "death_will", "kind": "death", "session": 4, "reason": wire.DEATH_LOST, "ts": None, "back_at": None},
    {
        "name": "death_sleeping",
        "kind": "death",
        "session": 4,
        "reason": wire.DEATH_SLEEPING,
        "ts": T + 1234,
        "back_at": T + 600_000,
    },
    {"name": "death_clean", "kind": "death", "session": 300, "reason": wire.DEATH_CLEAN, "ts": T, "back_at": None},
]


def gateway_bytes(c: dict) -> bytes:
    if c["kind"] == "data":
        readings = [Reading(r[0], r[1], gateway_value(r), r[-1]) for r in c["readings"]]
        return wire.encode_data(c["session"], c["seq"], readings, historical=c["historical"])
    if c["kind"] == "birth":
        return wire.encode_birth(
            session=c["session"],
            ts_ms=c["ts"],
            site=c["site"],
            gateway=c["node"],
            software=c["software"],
            catalogue=[PointInfo(*p) for p in c["catalogue"]],
            dropped=c["dropped"],
            kind="node",
            back_at_ms=c["back_at"],
        )
    return wire.encode_death(session=c["session"], reason=c["reason"], ts_ms=c["ts"], back_at_ms=c["back_at"])


@pytest.fixture(scope="module")
def node_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Every case encoded by the firmware under real MicroPython."""
    data = tmp_path_factory.mktemp("golden")
    cases = data_cases() + BIRTH_CASES + DEATH_CASES
    (data / "cases.json").write_text(json.dumps(cases, ensure_ascii=False))
    proc = run_micropython(CHECKS / "golden_wire.py", mounts=((data, "/data"),))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert len(out) == len(cases)
    return {k: bytes.fromhex(v) for k, v in out.items()}


ALL = data_cases() + BIRTH_CASES + DEATH_CASES


@pytest.mark.parametrize("case", ALL, ids=[c["name"] for c in ALL])
def test_node_bytes_equal_the_gateway_encoder(case: dict, node_bytes: dict[str, bytes]) -> None:
    got = node_bytes[case["name"]]
    want = gateway_bytes(case)
    assert got.hex() == want.hex()
    SCHEMA.validate_cbor(got)


@pytest.mark.parametrize("case", data_cases(), ids=[c["name"] for c in data_cases()])
def test_node_data_decodes_with_the_gateway_consumer(case: dict, node_bytes: dict[str, bytes]) -> None:
    d = wire.decode_data(node_bytes[case["name"]])
    assert (d.session, d.seq, d.historical) == (case["session"], case["seq"], case["historical"])
    want = sorted((r[1], r[0], r[-1]) for r in case["readings"])
    assert sorted((r.ts_ms, r.point, r.quality) for r in d.readings) == want
    for r, src in zip(
        sorted(d.readings, key=lambda r: (r.ts_ms, r.point)), sorted(case["readings"], key=lambda r: (r[1], r[0]))
    ):
        v = gateway_value(src)
        if isinstance(v, float) and v != v:
            continue
        assert r.value == v or (isinstance(v, Decimal) and Decimal(str(r.value)) == v)


def test_birth_and_death_decode(node_bytes: dict[str, bytes]) -> None:
    b = wire.decode_birth(node_bytes["birth_sleeping"])
    assert (b.kind, b.site, b.gateway, b.back_at_ms, b.dropped) == ("node", "水库", "n-1", T + 600_000, 1234)
    assert b.catalogue == (PointInfo("crack", "opening", "mm", "uint16"),)
    d = wire.decode_death(node_bytes["death_sleeping"])
    assert (d.reason, d.back_at_ms, d.ts_ms) == ("sleeping", T + 600_000, T + 1234)
    assert wire.decode_death(node_bytes["death_will"]).ts_ms is None


def test_cddl_rejects_a_broken_node_message(node_bytes: dict[str, bytes]) -> None:
    """The schema check can fail: drop the data message's seq (key 2) and it must."""
    good = node_bytes["ints"]  # session 1, seq 1
    assert good[0] == 0xA5 and good[5:7] == bytes((0x02, 0x01))
    broken = bytes((0xA4,)) + good[1:5] + good[7:]
    with pytest.raises(pycddl.ValidationError):
        SCHEMA.validate_cbor(broken)


# ---------------------------------------------------------------- randomised, under CPython


def test_random_values_match_the_gateway_under_cpython() -> None:
    """The same firmware modules imported by CPython: thousands of floats and scaled registers."""
    import_firmware()
    from yujing_node import dec
    from yujing_node.cbor import Writer
    from yujing_node.records import DEC, FLOAT, INT, Batch
    from yujing_node.wire import encode_data

    rng = random.Random(4)
    w = Writer(8192)
    for _ in range(300):
        n = rng.randint(1, 40)
        b = Batch(n)
        readings = []
        for _ in range(n):
            point, ts, q = (
                rng.randint(0, 254),
                T + rng.choice([0, 1, 1000, 3_600_000]),
                rng.choice([0, 0, 0, 1, 4, 0x84]),
            )
            k = rng.random()
            if k < 0.3:
                raw = rng.randint(-(2**31), 2**32)
                scale = rng.choice(["0.1", "0.01", "0.001", "0.5", "0.25", "1", "10", "-0.02", "0.0015", "1e-3"])
                offset = rng.choice(["0", "-2.5", "1900", "0.125", "-45"])
                lin = dec.Linear(dec.parse(scale), dec.parse(offset))
                b.add(point, ts, DEC, lin.exp, lin.mantissa(raw), q)
                readings.append(Reading(point, ts, Decimal(raw) * Decimal(scale) + Decimal(offset), q))
            elif k < 0.7:
                x = rng.choice(
                    [
                        struct.unpack("<d", rng.randbytes(8))[0],
                        struct.unpack("<f", rng.randbytes(4))[0],
                        struct.unpack("<e", rng.randbytes(2))[0],
                        rng.randint(-999, 999) / 8,
                    ]
                )
                if x != x:
                    x = 0.5
                b.add(point, ts, FLOAT, 0, x, q)
                readings.append(Reading(point, ts, x, q))
            else:
                v = rng.randint(-(2**63), 2**63 - 1) if rng.random() < 0.3 else rng.randint(-300, 70000)
                b.add(point, ts, INT, 0, v, q)
                readings.append(Reading(point, ts, v, q))
        session, seq, hist = rng.randint(0, 2**32), rng.randint(0, 2**40), rng.random() < 0.5
        got = bytes(encode_data(w, session, seq, b, hist))
        assert got == wire.encode_data(session, seq, readings, historical=hist)


def test_readings_stamped_before_the_clock_was_set_carry_key_6_as_the_gateway_writes_it() -> None:
    """An ESP32 reads 2000 until NTP sets its clock: its stamps are before the floor, and the message says so
    (key 6) byte for byte as gateway.wire does; a flush never puts both sides of the set into one message."""
    import_firmware()
    from yujing_node.cbor import Writer
    from yujing_node.node import same_clock
    from yujing_node.records import INT, Batch
    from yujing_node.wire import CLOCK_FLOOR_MS, encode_data

    from gateway.clockcheck import CLOCK_FLOOR_MS as GATEWAY_FLOOR

    assert CLOCK_FLOOR_MS == GATEWAY_FLOOR
    y2000 = 946_684_800_000 + 12_000  # twelve seconds after boot on an unset ESP32 clock
    w = Writer(1024)
    for hist in (False, True):
        b = Batch(4)
        b.add(0, y2000, INT, 0, 7)
        b.add(1, y2000 + 1000, INT, 0, 8)
        got = bytes(encode_data(w, 3, 9, b, hist))
        readings = [Reading(0, y2000, 7, 0), Reading(1, y2000 + 1000, 8, 0)]
        assert got == wire.encode_data(3, 9, readings, historical=hist, clock_unset=True)
        assert wire.decode_data(got).clock_unset is True
    b = Batch(4)
    b.add(0, T, INT, 0, 7)
    assert wire.decode_data(bytes(encode_data(w, 3, 10, b))).clock_unset is False
    # a ring flush across the set: two readings before it, then two after; only the first two go together
    b = Batch(4)
    for i, ts in enumerate((y2000, y2000 + 1000, T, T + 1000)):
        b.add(i, ts, INT, 0, i)
    assert same_clock(b, 4) == 2 and b.n == 2
    b = Batch(4)
    for i, ts in enumerate((T, T + 1000)):
        b.add(i, ts, INT, 0, i)
    assert same_clock(b, 2) == 2 and b.n == 2


def test_alarm_events_stamped_before_the_clock_was_set_carry_key_6_as_the_gateway_writes_it() -> None:
    import_firmware()
    from yujing_node.cbor import Writer
    from yujing_node.records import INT, Batch
    from yujing_node.wire import encode_alarm, value_map

    from gateway.wire import Event

    y2000 = 946_684_800_000 + 30_000
    w = Writer(1024)
    b = Batch(1)
    b.add(0, y2000, INT, 0, 41)
    ev = [(0, "crack.opening", 0, 1, y2000, value_map(w, b, 0), "crack/opening = 41", "")]
    for hist in (False, True):
        got = bytes(encode_alarm(w, 2, 5, ev, hist))
        want = wire.encode_alarm(2, 5, [Event("raised", "crack.opening", 0, 1, y2000, {0: 41}, "crack/opening = 41")],
                                 historical=hist, clock_unset=True)
        assert got == want
        assert wire.decode_alarm(got).clock_unset is True
