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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import cbor2

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
K_COMMAND = 20
K_RULE = 21
K_BY = 22
K_ID = 23
K_TS = 24
K_MAC = 25
K_OK = 26
K_MESSAGE = 27

# alarm event kinds, in wire order
EVENT_KINDS = ("raised", "escalated", "de_escalated", "cleared", "acknowledged", "fault", "fault_cleared",
               "actuator_fault", "actuator_ok")
LEVEL_NAMES = ("none", "IV_blue", "III_yellow", "II_orange", "I_red")

DEATH_CLEAN = 0
DEATH_LOST = 1
DEATH_SLEEPING = 2
DEATH_REASONS = {DEATH_CLEAN: "clean", DEATH_LOST: "lost", DEATH_SLEEPING: "sleeping"}

MESSAGE_TYPES = ("birth", "data", "death", "alarm", "alarms", "cmd", "reply")


class WireError(ValueError):
    """A payload or topic that does not follow the wire format; the message says which part."""


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
    if v is None or isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, Decimal):
        if not v.is_finite():
            raise WireError(f"value {v}: not finite")
        if v == v.to_integral_value():
            return int(v)
        if _binary_exact(v):
            f = float(v)
            if math.isfinite(f) and Decimal(f) == v:
                return f
        sign, digits, exp = v.normalize().as_tuple()
        mantissa = int("".join(map(str, digits)))
        return cbor2.CBORTag(4, [exp, -mantissa if sign else mantissa])
    raise WireError(f"value {v!r}: unsupported type {type(v).__name__}")


def decode_value(v: Any) -> Value:
    if isinstance(v, cbor2.CBORTag) and v.tag == 4:
        exp, mantissa = v.value
        return Decimal(mantissa).scaleb(exp)
    return v


# ---------------------------------------------------------------- encoding


def encode_data(session: int, seq: int, readings: Sequence[Reading], *, historical: bool = False) -> bytes:
    """One data message. Readings are grouped by timestamp; inside a group, by point index."""
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


def encode_alarm(session: int, seq: int, events: Sequence[Event], *, historical: bool = False) -> bytes:
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
    return cbor2.dumps(msg, canonical=True)


def encode_alarms(session: int, ts_ms: int, states: Sequence[AlarmStatus]) -> bytes:
    """The retained snapshot of every alarm's current state."""
    body = [[a.rule, a.level, a.condition, a.latched, a.acked, a.fault, a.since_ms or 0, a.fault_reason or ""] for a in states]
    return cbor2.dumps({K_VERSION: FORMAT_VERSION, K_SESSION: session, K_T0: ts_ms, K_ALARMS: body}, canonical=True)


def command_body(command: str, rule: str, by: str, request_id: str, ts_ms: int) -> dict[int, Any]:
    return {K_VERSION: FORMAT_VERSION, K_COMMAND: command, K_RULE: rule, K_BY: by, K_ID: request_id, K_TS: ts_ms}


def sign_command(body: dict[int, Any], key: bytes) -> bytes:
    """A command with its HMAC-SHA256 (key 25) over the deterministic encoding of everything else."""
    import hashlib
    import hmac

    unsigned = cbor2.dumps(body, canonical=True)
    return cbor2.dumps({**body, K_MAC: hmac.new(key, unsigned, hashlib.sha256).digest()}, canonical=True)


def encode_reply(request_id: str | None, ok: bool, message: str) -> bytes:
    return cbor2.dumps({K_VERSION: FORMAT_VERSION, K_ID: request_id, K_OK: ok, K_MESSAGE: message}, canonical=True)


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


def _load_map(payload: bytes, what: str) -> dict[int, Any]:
    try:
        msg = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types for truncated or invalid input
        raise WireError(f"{what}: not valid CBOR ({exc})") from exc
    if not isinstance(msg, dict):
        raise WireError(f"{what}: expected a CBOR map, got {type(msg).__name__}")
    version = msg.get(K_VERSION)
    if version != FORMAT_VERSION:
        raise WireError(f"{what}: format version {version!r}, this decoder reads {FORMAT_VERSION}")
    return msg


def _require(msg: dict[int, Any], key: int, typ: type | tuple[type, ...], what: str) -> Any:
    if key not in msg:
        raise WireError(f"{what}: missing key {key}")
    v = msg[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise WireError(f"{what}: key {key} has type {type(v).__name__}")
    return v


def decode_birth(payload: bytes) -> Birth:
    msg = _load_map(payload, "birth")
    catalogue = []
    for i, entry in enumerate(_require(msg, K_CATALOGUE, list, "birth")):
        if not (isinstance(entry, list) and len(entry) == 4 and all(isinstance(x, str) for x in entry)):
            raise WireError(f"birth: catalogue entry {i} is not [device, point, unit, type]")
        catalogue.append(PointInfo(*entry))
    return Birth(
        session=_require(msg, K_SESSION, int, "birth"),
        ts_ms=_require(msg, K_T0, int, "birth"),
        site=_require(msg, K_SITE, str, "birth"),
        gateway=_require(msg, K_GATEWAY, str, "birth"),
        software=_require(msg, K_SOFTWARE, str, "birth"),
        catalogue=tuple(catalogue),
        dropped=msg.get(K_DROPPED, 0),
        kind=msg.get(K_KIND, "gateway"),
        back_at_ms=msg.get(K_BACK_AT),
    )


def decode_death(payload: bytes) -> Death:
    msg = _load_map(payload, "death")
    reason = _require(msg, K_REASON, int, "death")
    return Death(
        session=_require(msg, K_SESSION, int, "death"),
        reason=DEATH_REASONS.get(reason, f"unknown_{reason}"),
        ts_ms=msg.get(K_T0),
        back_at_ms=msg.get(K_BACK_AT),
    )


def decode_data(payload: bytes) -> Data:
    msg = _load_map(payload, "data")
    session = _require(msg, K_SESSION, int, "data")
    seq = _require(msg, K_SEQ, int, "data")
    t0 = _require(msg, K_T0, int, "data")
    readings: list[Reading] = []
    for gi, group in enumerate(_require(msg, K_GROUPS, list, "data")):
        where = f"data seq {seq} group {gi}"
        if not isinstance(group, list) or len(group) != 4:
            raise WireError(f"{where}: expected [dt, points, values, qualities]")
        dt, points, values, qualities = group
        if not (isinstance(dt, int) and isinstance(points, list) and isinstance(values, list)):
            raise WireError(f"{where}: wrong element types")
        if len(points) != len(values):
            raise WireError(f"{where}: {len(points)} points but {len(values)} values")
        if not isinstance(qualities, dict):
            raise WireError(f"{where}: qualities is not a map")
        point = 0
        for i, (delta, value) in enumerate(zip(points, values)):
            point += delta
            readings.append(Reading(point, t0 + dt, decode_value(value), qualities.get(i, 0)))
    return Data(session=session, seq=seq, historical=bool(msg.get(K_HISTORICAL, False)), readings=tuple(readings))


@dataclass(frozen=True, slots=True)
class Alarm:
    session: int
    seq: int
    historical: bool
    events: tuple[Event, ...]


def decode_alarm(payload: bytes) -> Alarm:
    msg = _load_map(payload, "alarm")
    seq = _require(msg, K_SEQ, int, "alarm")
    t0 = _require(msg, K_T0, int, "alarm")
    events = []
    for i, e in enumerate(_require(msg, K_EVENTS, list, "alarm")):
        where = f"alarm seq {seq} event {i}"
        if not isinstance(e, list) or len(e) != 8:
            raise WireError(f"{where}: expected [kind, rule, old, new, dt, values, message, by]")
        kind, rule, old, new, dt, values, message, by = e
        if not (isinstance(kind, int) and 0 <= kind < len(EVENT_KINDS)):
            raise WireError(f"{where}: unknown event kind {kind!r}")
        if not (isinstance(rule, str) and isinstance(values, dict) and isinstance(message, str)):
            raise WireError(f"{where}: wrong element types")
        events.append(Event(EVENT_KINDS[kind], rule, old, new, t0 + dt, {k: decode_value(v) for k, v in values.items()}, message, by or None))
    return Alarm(_require(msg, K_SESSION, int, "alarm"), seq, bool(msg.get(K_HISTORICAL, False)), tuple(events))


def decode_alarms(payload: bytes) -> tuple[int, int, tuple[AlarmStatus, ...]]:
    """(session, ts_ms, states) of a retained snapshot."""
    msg = _load_map(payload, "alarms")
    states = []
    for i, a in enumerate(_require(msg, K_ALARMS, list, "alarms")):
        if not isinstance(a, list) or len(a) != 8 or not isinstance(a[0], str):
            raise WireError(f"alarms: entry {i} is not [rule, level, condition, latched, acked, fault, since, reason]")
        rule, level, condition, latched, acked, fault, since, reason = a
        states.append(AlarmStatus(rule, level, condition, latched, acked, fault, since or None, reason or None))
    return _require(msg, K_SESSION, int, "alarms"), _require(msg, K_T0, int, "alarms"), tuple(states)


@dataclass(frozen=True, slots=True)
class Command:
    command: str
    rule: str
    by: str
    request_id: str
    ts_ms: int


def decode_command(payload: bytes, key: bytes | None, *, now_ms: int, max_skew_ms: int = 300_000) -> Command:
    """Validate a command: structure, signature, freshness. Raises WireError saying what is wrong."""
    import hashlib
    import hmac

    msg = _load_map(payload, "command")
    request_id = msg.get(K_ID)
    body = {k: v for k, v in msg.items() if k != K_MAC}
    for key_, typ, name in ((K_COMMAND, str, "command"), (K_RULE, str, "rule"), (K_BY, str, "by"), (K_ID, str, "id"), (K_TS, int, "ts")):
        if not isinstance(msg.get(key_), typ) or isinstance(msg.get(key_), bool):
            raise WireError(f"command {request_id!r}: field {name} (key {key_}) missing or not a {typ.__name__}")
    unknown = set(msg) - {K_VERSION, K_COMMAND, K_RULE, K_BY, K_ID, K_TS, K_MAC}
    if unknown:
        raise WireError(f"command {request_id!r}: unknown keys {sorted(unknown)}")
    if msg[K_COMMAND] != "ack":
        raise WireError(f"command {request_id!r}: unknown command {msg[K_COMMAND]!r} (known: ack)")
    if not msg[K_BY].strip() or len(msg[K_BY]) > 64 or len(request_id) > 64:
        raise WireError(f"command {request_id!r}: 'by' must name who acknowledges (1..64 characters), id at most 64")
    if key is None:
        raise WireError(f"command {request_id!r}: unauthorised: this gateway accepts no remote commands (no uplink.command_key_file)")
    mac = msg.get(K_MAC)
    expected = hmac.new(key, cbor2.dumps(body, canonical=True), hashlib.sha256).digest()
    if not isinstance(mac, bytes) or not hmac.compare_digest(mac, expected):
        raise WireError(f"command {request_id!r}: unauthorised: bad or missing signature")
    if abs(msg[K_TS] - now_ms) > max_skew_ms:
        raise WireError(f"command {request_id!r}: stale or future timestamp ({(msg[K_TS] - now_ms) / 1000:+.0f} s from the gateway's clock)")
    return Command(msg[K_COMMAND], msg[K_RULE], msg[K_BY], request_id, msg[K_TS])


def decode_reply(payload: bytes) -> tuple[str | None, bool, str]:
    msg = _load_map(payload, "reply")
    return msg.get(K_ID), bool(msg.get(K_OK)), str(msg.get(K_MESSAGE, ""))


# ---------------------------------------------------------------- presentation


def json_value(v: Value) -> Any:
    """A value as JSON would carry it: decimals become the shortest float that prints the same digits."""
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def event_records(topic_: Topic, alarm: Alarm, catalogue: Sequence[PointInfo] | None) -> Iterable[dict[str, Any]]:
    """Flatten an alarm message into one dict per event (what `yujing consume` prints)."""
    for e in alarm.events:
        values = {}
        for idx, v in e.values.items():
            info = catalogue[idx] if catalogue is not None and 0 <= idx < len(catalogue) else None
            values[f"{info.device}.{info.name}" if info else str(idx)] = json_value(v)
        yield {
            "site": topic_.site, "gateway": topic_.gateway, "alarm": e.kind, "rule": e.rule,
            "level": LEVEL_NAMES[e.new_level] if 0 <= e.new_level < len(LEVEL_NAMES) else e.new_level,
            "old_level": LEVEL_NAMES[e.old_level] if 0 <= e.old_level < len(LEVEL_NAMES) else e.old_level,
            "ts": e.ts_ms, "values": values, "message": e.message, "by": e.by,
            "session": alarm.session, "seq": alarm.seq, **({"historical": True} if alarm.historical else {}),
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
            "value": json_value(r.value),
            "unit": info.unit if info else None,
            "quality": quality_name(r.quality),
            "session": data.session,
            "seq": data.seq,
            **({"historical": True} if data.historical else {}),
        }

