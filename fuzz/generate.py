"""Input generators for the fuzz targets: seeded, so a run replays exactly.

Three sources, mixed: valid messages built by the real encoders (with random contents), mutations of
those (bit flips, byte insertions and deletions, truncation, splices), and random CBOR items from a
generator that favours what breaks decoders (bignums, deep nesting, tags, huge lengths, floats, duplicate
keys, indefinite lengths).
"""

from __future__ import annotations

import random
import struct
from decimal import Decimal

import cbor2

from gateway import wire
from gateway.model import PointInfo, Reading

T0 = 1_780_000_000_000


def mutate(rng: random.Random, data: bytes, corpus: list[bytes] | None = None) -> bytes:
    """One to four random edits of `data`."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        if not b:
            b.extend(rng.randbytes(rng.randint(1, 8)))
            continue
        i = rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice((0x00, 0x17, 0x18, 0x1B, 0x1F, 0x3B, 0x5B, 0x7F, 0x9F, 0xBF, 0xC2, 0xC4, 0xD2, 0xFB, 0xFF))
        elif op == 2:
            del b[i : i + rng.randint(1, 8)]
        elif op == 3:
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 4:
            del b[rng.randrange(len(b)) :]
        elif op == 5 and corpus:
            other = rng.choice(corpus)
            j = rng.randrange(len(other)) if other else 0
            b[i:] = other[j:]
        elif op == 6:
            b[i : i + 1] = bytes([b[i]]) * rng.randint(2, 64)
        else:
            b[i] = rng.randrange(256)
    return bytes(b)


def random_item(rng: random.Random, depth: int = 0):  # type: ignore[no-untyped-def]
    kind = rng.randrange(14 if depth < 6 else 9)
    if kind == 0:
        return rng.choice((0, 1, 23, 24, 255, 256, 65535, 2**32, 2**63 - 1, 2**64 - 1, -1, -(2**63), -(2**64)))
    if kind == 1:
        return rng.choice((10**30, -(10**30), 2**64, 10 ** rng.randint(20, 400)))  # bignums
    if kind == 2:
        return rng.choice((0.0, -0.0, 1.5, 1e300, float("inf"), float("nan"), 5.960464477539063e-08))
    if kind == 3:
        return rng.choice(("", "a", "\u6c34\u5e93", "x" * rng.randint(0, 300), "\n\r\x00"))
    if kind == 4:
        return rng.randbytes(rng.randint(0, 80))
    if kind == 5:
        return rng.choice((None, True, False, cbor2.undefined))
    if kind == 6:
        return Decimal(rng.randint(-(10**6), 10**6)).scaleb(rng.randint(-40, 40))
    if kind == 7:
        return cbor2.CBORTag(4, [rng.choice((-2, 10**9, -(10**9), 2**64 - 1)), rng.choice((1, 10**40, -5))])
    if kind == 8:
        return cbor2.CBORSimpleValue(rng.choice((0, 19, 32, 255)))
    if kind in (9, 10):
        return [random_item(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    if kind == 11:
        keys = [rng.choice((0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 13, 14, 15, 16, 23, 26, 27, 29, -1, "k", 2**64 - 1)) for _ in range(rng.randint(0, 8))]
        return {k: random_item(rng, depth + 1) for k in keys}
    if kind == 12:
        return cbor2.CBORTag(rng.choice((0, 1, 2, 3, 4, 5, 18, 24, 55799, 2**32)), random_item(rng, depth + 1))
    return cbor2.CBORTag(18, [rng.randbytes(rng.randint(0, 20)), {}, cbor2.dumps(random_item(rng, depth + 2)), rng.randbytes(64)])


def random_cbor(rng: random.Random) -> bytes:
    try:
        data = cbor2.dumps(random_item(rng))
    except (ValueError, TypeError, OverflowError):
        data = b"\xa0"
    if rng.random() < 0.1:  # indefinite-length wrappers and raw heads
        data = rng.choice((b"\x9f", b"\xbf", b"\x5f", b"\x7f")) + data + b"\xff"
    return data


def _value(rng: random.Random):  # type: ignore[no-untyped-def]
    return rng.choice((
        None, True, False, rng.randint(-(2**63), 2**64 - 1), rng.random() * 1000, Decimal(rng.randint(-99999, 99999)).scaleb(-rng.randint(0, 4)),
        float(struct.unpack(">f", struct.pack(">f", rng.random()))[0]),
    ))


def valid_messages(rng: random.Random) -> list[tuple[str, bytes]]:
    """One of each message type, with random contents, as the gateway would publish them."""
    session, seq = rng.randint(1, 2**31), rng.randint(1, 2**31)
    readings = [Reading(rng.randint(0, 300), T0 + rng.randint(0, 10**6), _value(rng), rng.choice((0, 0, 0, 1, 4, 7, 0x82)))
                for _ in range(rng.randint(1, 30))]
    catalogue = [PointInfo(f"d{i}", f"p{i}", rng.choice(("m", "%LEL", "")), rng.choice(("uint16", "float32", "bool"))) for i in range(rng.randint(0, 20))]
    events = [wire.Event(rng.choice(wire.EVENT_KINDS), f"rule.{i}", rng.randint(0, 4), rng.randint(0, 4), T0 + i,
                         {rng.randint(0, 50): _value(rng)}, "m" * rng.randint(0, 40), rng.choice((None, "li"))) for i in range(rng.randint(1, 5))]
    states = [wire.AlarmStatus(f"r{i}", rng.randint(0, 4), rng.randint(0, 4), rng.random() < 0.5, False, rng.random() < 0.2,
                               rng.choice((None, T0)), rng.choice((None, "stale"))) for i in range(rng.randint(0, 5))]
    return [
        ("data", wire.encode_data(session, seq, readings, historical=rng.random() < 0.3)),
        ("birth", wire.encode_birth(session=session, ts_ms=T0, site="S", gateway="g", software="1", catalogue=catalogue,
                                    dropped=rng.randint(0, 10**9))),
        ("death", wire.encode_death(session=session, reason=rng.randint(0, 2), ts_ms=T0)),
        ("alarm", wire.encode_alarm(session, seq, events)),
        ("alarms", wire.encode_alarms(session, T0, states)),
        ("reply", wire.encode_reply(rng.choice((None, "r1")), rng.random() < 0.5, "x", rng.randbytes(8))),
    ]


def cbor_input(rng: random.Random, valid: bytes, corpus: list[bytes]) -> bytes:
    """A mix: a third valid-then-mutated, a third random CBOR, the rest mutated random CBOR or raw bytes."""
    r = rng.random()
    if r < 0.05:
        return valid
    if r < 0.45:
        return mutate(rng, valid, corpus)
    if r < 0.75:
        return random_cbor(rng)
    if r < 0.95:
        return mutate(rng, random_cbor(rng), corpus)
    return rng.randbytes(rng.randint(0, 64))


def mutate_text(rng: random.Random, text: str) -> str:
    """Line- and character-level edits of a TOML file."""
    lines = text.splitlines()
    for _ in range(rng.randint(1, 5)):
        if not lines:
            lines.append("x = 1")
        i = rng.randrange(len(lines))
        op = rng.randrange(9)
        line = lines[i]
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, rng.choice(lines))
        elif op == 2 and "=" in line:
            key, _, _ = line.partition("=")
            lines[i] = key + "= " + rng.choice(('"x"', "-1", "0", "1e999", "[]", "{}", "true", '"/dev/null"', "99999999999999999999",
                                              '"../../etc/shadow"', "nan", '"\\u0000"', "[[1]]", "{ a = 1 }", '"*"', "0.0"))
        elif op == 3 and line:
            j = rng.randrange(len(line))
            lines[i] = line[:j] + rng.choice("[]{}=\"'#.,\n\\\u6c34\x00 ") + line[j + 1 :]
        elif op == 4:
            lines.insert(i, rng.choice(("[[devices]]", "[[devices.points]]", "[[rules]]", "[[actions]]", "[site]", "[uplink]",
                                        "[[buses]]", "[rules.fault]", "fault = { codes = [1], flags = [\"nope\"] }")))
        elif op == 5 and "=" in line:
            lines[i] = "unknown_" + line
        elif op == 6:
            lines[i] = line + rng.choice((" # c", "", "x"))
        elif op == 7:
            key = rng.choice(("name", "id", "kind", "level", "point", "bus", "unit", "address", "scale"))
            lines[i:i] = [key + " = " + rng.choice(("1", '"a"', "[1]"))]
        else:
            del lines[i:]
    return "\n".join(lines)
