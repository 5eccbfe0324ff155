"""Yujing wire format v1: CBOR payloads and MQTT topics (docs/wire-format.md, docs/wire-format.cddl).

This module is the reference encoder and decoder. It does no I/O, so the platform's developers can
import it (`from gateway import wire`) without pulling in the gateway's runtime.

Encoding is deterministic (RFC 8949 §4.2.1). cbor2's canonical mode writes shortest arguments and
floats and sorts map keys length-first, which equals the bytewise order for the unsigned integer
keys that are the only keys this format uses (both checked in tests/test_wire.py). Values:

- bool → true/false, None → null, int → integer;
- float → the shortest of float16/32/64 that round-trips exactly;
- Decimal (a scaled integer register, computed exactly) → an integer when whole, the shortest float
  when the decimal has an exact binary value (32.5), else a decimal fraction, tag 4 [exp, mantissa],
  normalised (1953.38 → 4([-2, 195338])): no float32 holds 1953.38, and a float64 costs a byte more
  and still is not 1953.38.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import cbor2

from . import cborcheck
from .model import PointInfo, Reading, Value, quality_name

FORMAT_VERSION = 1
DEFAULT_PREFIX = "yujing/v1"

# Envelope keys. Small integers cost one byte each.
K_VERSION = 0
K_SESSION = 1
K_SEQ = 2
K_T0 = 3
K_GROUPS = 4
K_HISTORICAL = 5
K_CLOCK_UNSET = 6  # data, alarm: stamped while the gateway's wall clock was not set (gateway.clockcheck)
K_SITE = 7
K_GATEWAY = 8
K_SOFTWARE = 9
K_CATALOGUE = 10
K_DROPPED = 11
K_BACK_AT = 12
K_KIND = 13
K_REASON = 14

K_EVENTS = 15
K_ALARMS = 16
K_COMMAND = 20  # 20–24 and 28 are the fields of a command's signed payload (gateway.commands)
K_ID = 23
K_OK = 26
K_MESSAGE = 27
K_DIGEST = 29

# alarm event kinds, in wire order
EVENT_KINDS = ("raised", "escalated", "de_escalated", "cleared", "acknowledged", "fault", "fault_cleared",
               "actuator_fault", "actuator_ok", "gateway_fault", "gateway_ok")
# As a site file writes them and the gateway logs them (gateway.rules.levels.Level): one spelling everywhere.
LEVEL_NAMES = ("NONE", "IV_BLUE", "III_YELLOW", "II_ORANGE", "I_RED")

DEATH_CLEAN = 0
DEATH_LOST = 1
DEATH_SLEEPING = 2
DEATH_REASONS = {DEATH_CLEAN: "clean", DEATH_LOST: "lost", DEATH_SLEEPING: "sleeping"}

MESSAGE_TYPES = ("birth", "data", "death", "alarm", "alarms", "cmd", "reply")


class WireError(ValueError):
    """A payload or topic that does not follow the wire format; the message says which part."""


MAX_MESSAGE_BYTES = 1024 * 1024
# What a decoder accepts before cbor2 builds anything (gateway.cborcheck): the format's own shapes only.
# No bignums (so every integer fits 64 bits), decimal fractions with a bounded exponent, int map keys.
RECEIVE_POLICY = cborcheck.Policy(max_bytes=MAX_MESSAGE_BYTES, max_depth=8, max_items=600_000, max_string=4096,
                                  tags=frozenset({4}), floats=True)
INT64 = 1 << 63


# ---------------------------------------------------------------- topics


@dataclass(frozen=True, slots=True)
class Topic:
    prefix: str
    site: str
    gateway: str
    kind: str

    def __str__(self) -> str:
        return f"{self.prefix}/{self.site}/{self.gateway}/{self.kind}"


def topic(prefix: str, site: str, gateway: str, kind: str) -> str:
    return str(Topic(prefix, site, gateway, kind))


def parse_topic(name: str) -> Topic:
    """Split `<prefix…>/<site>/<gateway>/<type>`; the prefix may itself contain slashes."""
    parts = name.split("/")
    if len(parts) < 4 or parts[-1] not in MESSAGE_TYPES:
        raise WireError(f"topic {name!r}: expected <prefix>/<site>/<gateway>/<{'|'.join(MESSAGE_TYPES)}>")
    return Topic("/".join(parts[:-3]), parts[-3], parts[-2], parts[-1])


# ---------------------------------------------------------------- values


def _binary_exact(d: Decimal) -> bool:
    """True when the decimal equals a binary fraction (its reduced denominator is a power of two)."""
    sign, digits, exp = d.as_tuple()
    if not isinstance(exp, int) or exp >= 0:
        return True
    mantissa = int("".join(map(str, digits)) or "0")
    # d = m / 10^k = m / (2^k 5^k): binary-exact iff 5^k divides m.
    return mantissa % (5 ** (-exp)) == 0


def wire_value(v: Value) -> Any:
    """Map a reading value to what cbor2 should encode (see module docstring)."""
    if v is None or isinstance(v, (bool, float)):
        return v
    if isinstance(v, int):
        # 64-bit registers always fit; a larger integer (a huge scale) would be a bignum, which decoders refuse.
        return v if -(1 << 64) <= v < (1 << 64) else _decimal_or_float(Decimal(v))
    if isinstance(v, Decimal):
        if not v.is_finite():
            raise WireError(f"value {v}: not finite")
        if v == v.to_integral_value() and -(1 << 64) <= v < (1 << 64):
            return int(v)
        if _binary_exact(v):
            f = float(v)
            if math.isfinite(f) and Decimal(f) == v:
                return f
        return _decimal_or_float(v)
    raise WireError(f"value {v!r}: unsupported type {type(v).__name__}")


def _decimal_or_float(v: Decimal) -> Any:
    """Tag 4 [exponent, mantissa] when it fits the format's bounds (64-bit mantissa, exponent within ±30);
    otherwise the nearest float64 (only a scale far outside any instrument's range gets there)."""
    sign, digits, exp = v.normalize().as_tuple()
    mantissa = int("".join(map(str, digits)))
    if isinstance(exp, int) and abs(exp) <= RECEIVE_POLICY.decimal_exponent and mantissa < (1 << 64):
        return cbor2.CBORTag(4, [exp, -mantissa if sign else mantissa])
    return float(v)


def decode_value(v: Any) -> Value:
    if v is None or isinstance(v, (bool, int, float, Decimal)):
        return v
    if isinstance(v, cbor2.CBORTag) and v.tag == 4:  # cbor2 builds Decimals itself; older ones left the tag
        exp, mantissa = v.value
        return Decimal(mantissa).scaleb(exp)
    raise WireError(f"a value of type {type(v).__name__} (expected null, a bool, a number or a decimal fraction)")


# ---------------------------------------------------------------- encoding


def encode_data(session: int, seq: int, readings: Sequence[Reading], *, historical: bool = False,
                clock_unset: bool = False) -> bytes:
    """One data message. Readings are grouped by timestamp; inside a group, by point index (so the readings
    of one point must be in time order: the spool never puts two sides of a backwards clock step together).
    `clock_unset`: every reading was stamped while the wall clock was not set (docs/wire-format.md)."""
    if not readings:
        raise WireError("data message with no readings")
    t0 = min(r.ts_ms for r in readings)
    by_ts: dict[int, list[Reading]] = {}
    for r in readings:
        by_ts.setdefault(r.ts_ms, []).append(r)
    groups = []
    for ts in sorted(by_ts):
        rs = sorted(by_ts[ts], key=lambda r: r.point)
        points, values, qualities = [], [], {}
        prev = 0
        for i, r in enumerate(rs):
            points.append(r.point - prev)
            prev = r.point
            values.append(wire_value(r.value))
            if r.quality:
                qualities[i] = int(r.quality)
        groups.append([ts - t0, points, values, qualities])
    msg: dict[int, Any] = {K_VERSION: FORMAT_VERSION, K_SESSION: session, K_SEQ: seq, K_T0: t0, K_GROUPS: groups}
    if historical:
        msg[K_HISTORICAL] = True
    if clock_unset:
        msg[K_CLOCK_UNSET] = True
    return cbor2.dumps(msg, canonical=True)


def encode_birth(
    *,
    session: int,
    ts_ms: int,
    site: str,
    gateway: str,
    software: str,
    catalogue: Sequence[PointInfo],
    dropped: int = 0,
    kind: str = "gateway",
    back_at_ms: int | None = None,
) -> bytes:
    msg: dict[int, Any] = {
        K_VERSION: FORMAT_VERSION,
        K_SESSION: session,
        K_T0: ts_ms,
        K_SITE: site,
        K_GATEWAY: gateway,
        K_SOFTWARE: software,
        K_CATALOGUE: [[p.device, p.name, p.unit, p.type] for p in catalogue],
        K_DROPPED: dropped,
        K_KIND: kind,
    }
    if back_at_ms is not None:
        msg[K_BACK_AT] = back_at_ms
    return cbor2.dumps(msg, canonical=True)


def encode_death(*, session: int, reason: int, ts_ms: int | None = None, back_at_ms: int | None = None) -> bytes:
    msg: dict[int, Any] = {K_VERSION: FORMAT_VERSION, K_SESSION: session, K_REASON: reason}
    if ts_ms is not None:
        msg[K_T0] = ts_ms
    if back_at_ms is not None:
        msg[K_BACK_AT] = back_at_ms
    return cbor2.dumps(msg, canonical=True)


@dataclass(frozen=True, slots=True)
class Event:
    """One alarm state change (or actuator fault) as it travels on the wire."""

    kind: str  # one of EVENT_KINDS
    rule: str  # rule id, or the action name for actuator events
    old_level: int
    new_level: int
    ts_ms: int
    values: dict[int, Value]  # catalogue index → triggering value
    message: str
    by: str | None = None


@dataclass(frozen=True, slots=True)
class AlarmStatus:
    rule: str
    level: int
    condition: int
    latched: bool
    acked: bool
    fault: bool
    since_ms: int | None
    fault_reason: str | None


def encode_alarm(session: int, seq: int, events: Sequence[Event], *, historical: bool = False,
                 clock_unset: bool = False) -> bytes:
    """One alarm message: events in the order they happened (their own seq space, separate from data)."""
    if not events:
        raise WireError("alarm message with no events")
    t0 = min(e.ts_ms for e in events)
    body = [
        [EVENT_KINDS.index(e.kind), e.rule, e.old_level, e.new_level, e.ts_ms - t0,
         {k: wire_value(v) for k, v in e.values.items()}, e.message, e.by or ""]
        for e in events
    ]
    msg: dict[int, Any] = {K_VERSION: FORMAT_VERSION, K_SESSION: session, K_SEQ: seq, K_T0: t0, K_EVENTS: body}
    if historical:
        msg[K_HISTORICAL] = True
    if clock_unset:
        msg[K_CLOCK_UNSET] = True
    return cbor2.dumps(msg, canonical=True)


def encode_alarms(session: int, ts_ms: int, states: Sequence[AlarmStatus]) -> bytes:
    """The retained snapshot of every alarm's current state."""
    body = [[a.rule, a.level, a.condition, a.latched, a.acked, a.fault, a.since_ms or 0, a.fault_reason or ""] for a in states]
    return cbor2.dumps({K_VERSION: FORMAT_VERSION, K_SESSION: session, K_T0: ts_ms, K_ALARMS: body}, canonical=True)


def encode_reply(request_id: str | None, ok: bool, message: str, digest: bytes | None = None) -> bytes:
    """The gateway's answer to a command. `digest` (the first 8 bytes of SHA-256 of the command's raw bytes)
    lets the platform match a reply to what it sent, even when the gateway could not trust the id inside."""
    msg: dict[int, Any] = {K_VERSION: FORMAT_VERSION, K_ID: request_id, K_OK: ok, K_MESSAGE: message}
    if digest is not None:
        msg[K_DIGEST] = digest
    return cbor2.dumps(msg, canonical=True)


# ---------------------------------------------------------------- decoding


@dataclass(frozen=True, slots=True)
class Birth:
    session: int
    ts_ms: int
    site: str
    gateway: str
    software: str
    catalogue: tuple[PointInfo, ...]
    dropped: int
    kind: str
    back_at_ms: int | None


@dataclass(frozen=True, slots=True)
class Death:
    session: int
    reason: str
    ts_ms: int | None
    back_at_ms: int | None


@dataclass(frozen=True, slots=True)
class Data:
    session: int
    seq: int
    historical: bool
    readings: tuple[Reading, ...] = field(default=())
    clock_unset: bool = False  # key 6: stamped while the sender's wall clock was not set


def check_received(payload: bytes) -> None:
    """The strict walk every received message passes before anything decodes it; WireError if refused."""
    try:
        cborcheck.check(payload, RECEIVE_POLICY)
    except cborcheck.CborRejected as exc:
        raise WireError(f"refused before decoding: {exc}") from None


def _load_map(payload: bytes, what: str) -> dict[int, Any]:
    try:
        cborcheck.check(payload, RECEIVE_POLICY)
    except cborcheck.CborRejected as exc:
        raise WireError(f"{what}: refused before decoding: {exc}") from None
    try:
        msg = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types for truncated or invalid input
        raise WireError(f"{what}: not valid CBOR ({type(exc).__name__})") from None
    if not isinstance(msg, dict):
        raise WireError(f"{what}: expected a CBOR map, got {type(msg).__name__}")
    version = msg.get(K_VERSION)
    if version != FORMAT_VERSION:
        shown = version if isinstance(version, int) and not isinstance(version, bool) else type(version).__name__
        raise WireError(f"{what}: format version {shown}, this decoder reads {FORMAT_VERSION}")
    return msg


def _require(msg: dict[int, Any], key: int, typ: type | tuple[type, ...], what: str) -> Any:
    if key not in msg:
        raise WireError(f"{what}: missing key {key}")
    v = msg[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise WireError(f"{what}: key {key} has type {type(v).__name__}")
    return v


def _count(msg: dict[int, Any], key: int, what: str) -> int:
    """A session, seq or time: an integer in 0 … 2⁶³ − 1 (what every platform database can store)."""
    v = _require(msg, key, int, what)
    if not 0 <= v < INT64:
        raise WireError(f"{what}: key {key} is {'negative' if v < 0 else 'beyond 2^63'}")
    return v


def _optional_count(msg: dict[int, Any], key: int, what: str) -> int | None:
    return _count(msg, key, what) if msg.get(key) is not None else None


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise WireError(f"{what}: expected text, got {type(v).__name__}")
    return v


def decode_birth(payload: bytes) -> Birth:
    msg = _load_map(payload, "birth")
    catalogue = []
    for i, entry in enumerate(_require(msg, K_CATALOGUE, list, "birth")):
        if not (isinstance(entry, list) and len(entry) == 4 and all(isinstance(x, str) for x in entry)):
            raise WireError(f"birth: catalogue entry {i} is not [device, point, unit, type]")
        catalogue.append(PointInfo(*entry))
    kind = msg.get(K_KIND, "gateway")
    return Birth(
        session=_count(msg, K_SESSION, "birth"),
        ts_ms=_count(msg, K_T0, "birth"),
        site=_require(msg, K_SITE, str, "birth"),
        gateway=_require(msg, K_GATEWAY, str, "birth"),
        software=_require(msg, K_SOFTWARE, str, "birth"),
        catalogue=tuple(catalogue),
        dropped=_count(msg, K_DROPPED, "birth") if K_DROPPED in msg else 0,
        kind=_text(kind, "birth: kind"),
        back_at_ms=_optional_count(msg, K_BACK_AT, "birth"),
    )


def decode_death(payload: bytes) -> Death:
    msg = _load_map(payload, "death")
    reason = _count(msg, K_REASON, "death")
    return Death(
        session=_count(msg, K_SESSION, "death"),
        reason=DEATH_REASONS.get(reason, f"unknown_{reason}"),
        ts_ms=_optional_count(msg, K_T0, "death"),
        back_at_ms=_optional_count(msg, K_BACK_AT, "death"),
    )


MAX_POINT = 1 << 32  # catalogue indexes and group offsets beyond this are not a real gateway's


def decode_data(payload: bytes) -> Data:
    msg = _load_map(payload, "data")
    session = _count(msg, K_SESSION, "data")
    seq = _count(msg, K_SEQ, "data")
    t0 = _count(msg, K_T0, "data")
    readings: list[Reading] = []
    for gi, group in enumerate(_require(msg, K_GROUPS, list, "data")):
        where = f"data seq {seq} group {gi}"
        if not isinstance(group, list) or len(group) != 4:
            raise WireError(f"{where}: expected [dt, points, values, qualities]")
        dt, points, values, qualities = group
        if not (isinstance(dt, int) and not isinstance(dt, bool) and 0 <= dt < INT64 - t0):
            raise WireError(f"{where}: dt is not a small unsigned integer")
        if not (isinstance(points, list) and isinstance(values, list)):
            raise WireError(f"{where}: wrong element types")
        if len(points) != len(values):
            raise WireError(f"{where}: {len(points)} points but {len(values)} values")
        if not isinstance(qualities, dict):
            raise WireError(f"{where}: qualities is not a map")
        for i, q in qualities.items():  # keys are integers (the receive policy allows no other)
            if not (0 <= i < len(points) and isinstance(q, int) and not isinstance(q, bool) and 0 <= q <= 255):
                raise WireError(f"{where}: quality entry {i} is not [index of the group, code 0..255]")
        point = 0
        for i, (delta, value) in enumerate(zip(points, values)):
            if not (isinstance(delta, int) and not isinstance(delta, bool) and delta >= 0):
                raise WireError(f"{where}: point difference {i} is not an unsigned integer")
            point += delta
            if point >= MAX_POINT:
                raise WireError(f"{where}: point index beyond {MAX_POINT}")
            readings.append(Reading(point, t0 + dt, decode_value(value), qualities.get(i, 0)))
    return Data(session=session, seq=seq, historical=msg.get(K_HISTORICAL, False) is True, readings=tuple(readings),
                clock_unset=msg.get(K_CLOCK_UNSET, False) is True)


@dataclass(frozen=True, slots=True)
class Alarm:
    session: int
    seq: int
    historical: bool
    events: tuple[Event, ...]
    clock_unset: bool = False  # key 6


def _level(v: Any, where: str) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(LEVEL_NAMES)):
        raise WireError(f"{where}: level is not 0..{len(LEVEL_NAMES) - 1}")
    return v


def decode_alarm(payload: bytes) -> Alarm:
    msg = _load_map(payload, "alarm")
    session = _count(msg, K_SESSION, "alarm")
    seq = _count(msg, K_SEQ, "alarm")
    t0 = _count(msg, K_T0, "alarm")
    events = []
    for i, e in enumerate(_require(msg, K_EVENTS, list, "alarm")):
        where = f"alarm seq {seq} event {i}"
        if not isinstance(e, list) or len(e) != 8:
            raise WireError(f"{where}: expected [kind, rule, old, new, dt, values, message, by]")
        kind, rule, old, new, dt, values, message, by = e
        if not (isinstance(kind, int) and not isinstance(kind, bool) and 0 <= kind < len(EVENT_KINDS)):
            raise WireError(f"{where}: unknown event kind")
        if not (isinstance(rule, str) and isinstance(values, dict) and isinstance(message, str) and isinstance(by, str)):
            raise WireError(f"{where}: wrong element types")
        if not (isinstance(dt, int) and not isinstance(dt, bool) and 0 <= dt < INT64 - t0):
            raise WireError(f"{where}: dt is not a small unsigned integer")
        if any(not 0 <= k < MAX_POINT for k in values):
            raise WireError(f"{where}: a value's point index is out of range")
        events.append(Event(EVENT_KINDS[kind], rule, _level(old, where), _level(new, where), t0 + dt,
                            {k: decode_value(v) for k, v in values.items()}, message, by or None))
    return Alarm(session, seq, msg.get(K_HISTORICAL, False) is True, tuple(events),
                 clock_unset=msg.get(K_CLOCK_UNSET, False) is True)


def decode_alarms(payload: bytes) -> tuple[int, int, tuple[AlarmStatus, ...]]:
    """(session, ts_ms, states) of a retained snapshot."""
    msg = _load_map(payload, "alarms")
    states = []
    for i, a in enumerate(_require(msg, K_ALARMS, list, "alarms")):
        if not (isinstance(a, list) and len(a) == 8 and isinstance(a[0], str) and isinstance(a[7], str)
                and all(isinstance(x, bool) for x in a[3:6]) and isinstance(a[6], int) and not isinstance(a[6], bool)):
            raise WireError(f"alarms: entry {i} is not [rule, level, condition, latched, acked, fault, since, reason]")
        rule, level, condition, latched, acked, fault, since, reason = a
        where = f"alarms: entry {i}"
        states.append(AlarmStatus(rule, _level(level, where), _level(condition, where), latched, acked, fault, since or None, reason or None))
    return _count(msg, K_SESSION, "alarms"), _count(msg, K_T0, "alarms"), tuple(states)


@dataclass(frozen=True, slots=True)
class Reply:
    request_id: str | None  # the command's id, when the gateway got far enough to trust it
    ok: bool
    message: str
    digest: bytes | None  # first 8 bytes of SHA-256 of the command's raw bytes


def decode_reply(payload: bytes) -> Reply:
    msg = _load_map(payload, "reply")
    rid, digest = msg.get(K_ID), msg.get(K_DIGEST)
    return Reply(rid if isinstance(rid, str) else None, msg.get(K_OK) is True, _text(msg.get(K_MESSAGE, ""), "reply: message"),
                 digest if isinstance(digest, bytes) else None)


# ---------------------------------------------------------------- presentation


def json_value(v: Value, type_: str | None = None) -> Any:
    """A value as JSON would carry it: decimals become the shortest float that prints the same digits; a
    float32 point's value the shortest float that is the same float32 (`type_`: the point's catalogue type)."""
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if type_ == "float32" and isinstance(v, float):
        return float32_shortest(v)
    return v


_F32 = struct.Struct("<f")


def float32_shortest(v: float) -> float:
    """The float with the fewest significant digits that is the same float32 as `v`: 208.6994, not the
    208.69943237304688 a float32 reads as in float64. A float32 holds 6 to 9 significant digits; the other
    digits a float64 prints are noise of the conversion, not of the instrument."""
    try:
        target = _F32.unpack(_F32.pack(v))[0]
    except OverflowError:  # beyond float32's range: nothing to shorten
        return v
    for digits in range(1, 10):  # 9 significant digits always round-trip a float32
        shown = float(f"{v:.{digits}g}")
        try:
            if _F32.unpack(_F32.pack(shown))[0] == target:
                return shown
        except OverflowError:  # rounded up past float32's largest
            continue
    return v


def event_records(topic_: Topic, alarm: Alarm, catalogue: Sequence[PointInfo] | None) -> Iterable[dict[str, Any]]:
    """Flatten an alarm message into one dict per event (what `yujing consume` prints)."""
    for e in alarm.events:
        values = {}
        for idx, v in e.values.items():
            info = catalogue[idx] if catalogue is not None and 0 <= idx < len(catalogue) else None
            values[f"{info.device}.{info.name}" if info else str(idx)] = json_value(v, info.type if info else None)
        yield {
            "site": topic_.site, "gateway": topic_.gateway, "alarm": e.kind, "rule": e.rule,
            "level": LEVEL_NAMES[e.new_level] if 0 <= e.new_level < len(LEVEL_NAMES) else e.new_level,
            "old_level": LEVEL_NAMES[e.old_level] if 0 <= e.old_level < len(LEVEL_NAMES) else e.old_level,
            "ts": e.ts_ms, "values": values, "message": e.message, "by": e.by,
            "session": alarm.session, "seq": alarm.seq, **({"historical": True} if alarm.historical else {}),
            **({"clock_unset": True} if alarm.clock_unset else {}),
        }


def reading_records(
    topic_: Topic, data: Data, catalogue: Sequence[PointInfo] | None
) -> Iterable[dict[str, Any]]:
    """Flatten a data message into one dict per reading (what `yujing consume` prints)."""
    for r in data.readings:
        info = catalogue[r.point] if catalogue is not None and 0 <= r.point < len(catalogue) else None
        yield {
            "site": topic_.site,
            "gateway": topic_.gateway,
            "device": info.device if info else None,
            "point": info.name if info else r.point,
            "ts": r.ts_ms,
            "value": json_value(r.value, info.type if info else None),
            "unit": info.unit if info else None,
            "quality": quality_name(r.quality),
            "session": data.session,
            "seq": data.seq,
            **({"historical": True} if data.historical else {}),
            **({"clock_unset": True} if data.clock_unset else {}),
        }

