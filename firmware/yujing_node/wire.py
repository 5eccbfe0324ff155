"""Yujing wire format v1 (docs/wire-format.md): birth, data and death payloads, and topics.

The node's output is byte-for-byte what gateway/wire.py encodes for the same readings. Maps are
written with their keys in ascending order, which is deterministic CBOR's order for small
unsigned keys.
"""

from .records import NULL, FALSE, TRUE, INT, FLOAT, DEC

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_VERSION = const(1)
_K_VERSION = const(0)
_K_SESSION = const(1)
_K_SEQ = const(2)
_K_T0 = const(3)
_K_GROUPS = const(4)
_K_HISTORICAL = const(5)
_K_CLOCK_UNSET = const(6)
# A stamp before 2025-01-01T00:00:00Z was taken on a clock that was not set (an ESP32 reads 2000 until NTP sets it):
# docs/wire-format.md "Time". The same floor as the gateway's (gateway/clockcheck.py).
CLOCK_FLOOR_MS = 1735689600000
_K_SITE = const(7)
_K_GATEWAY = const(8)
_K_SOFTWARE = const(9)
_K_CATALOGUE = const(10)
_K_DROPPED = const(11)
_K_BACK_AT = const(12)
_K_KIND = const(13)
_K_REASON = const(14)
_K_EVENTS = const(15)
_K_ALARMS = const(16)
_K_ID = const(23)
_K_OK = const(26)
_K_MESSAGE = const(27)
_K_DIGEST = const(29)

DEATH_CLEAN = const(0)
DEATH_LOST = const(1)
DEATH_SLEEPING = const(2)


def topic(prefix, site, node_id, kind):
    """`<prefix>/<site>/<node_id>/<kind>` as bytes (birth, data, death, alarm, alarms, cmd, reply)."""
    return ("%s/%s/%s/%s" % (prefix, site, node_id, kind)).encode()


def value_map(w, b, i):
    """{point: value} of reading i of Batch b, as an alarm event carries it; the CBOR bytes (kept with the
    event until it is sent, the batch being reused)."""
    w.reset()
    if i < 0:
        w.map(0)
    else:
        w.map(1)
        w.int(b.point(i))
        _value(w, b, i)
    return bytes(w.view())


def encode_alarm(w, session, seq, events, historical=False):
    """One alarm message (gateway/wire.py encode_alarm): events are
    (kind, rule, old, new, ts_ms, values as CBOR bytes (value_map), message, by), in the order they happened.
    Stamped before CLOCK_FLOOR_MS, the message says so (key 6); the caller never mixes the two sides."""
    t0 = min(e[4] for e in events)
    unset = t0 < CLOCK_FLOOR_MS
    w.reset()
    w.map(5 + (1 if historical else 0) + (1 if unset else 0))
    w.head(0, _K_VERSION)
    w.head(0, _VERSION)
    w.head(0, _K_SESSION)
    w.int(session)
    w.head(0, _K_SEQ)
    w.int(seq)
    w.head(0, _K_T0)
    w.int(t0)
    _flags(w, historical, unset)  # 5 and 6 sort before 15
    w.head(0, _K_EVENTS)
    w.array(len(events))
    for kind, rule, old, new, ts, values, message, by in events:
        w.array(8)
        w.int(kind)
        w.text(rule)
        w.int(old)
        w.int(new)
        w.int(ts - t0)
        w.raw(values)
        w.text(message)
        w.text(by or "")
    return w.view()


def encode_alarms(w, session, ts_ms, states):
    """The retained state of every alarm (gateway/wire.py encode_alarms): states are
    (rule, level, condition, latched, acked, fault, since_ms, fault_reason)."""
    w.reset()
    w.map(4)
    w.head(0, _K_VERSION)
    w.head(0, _VERSION)
    w.head(0, _K_SESSION)
    w.int(session)
    w.head(0, _K_T0)
    w.int(ts_ms)
    w.head(0, _K_ALARMS)
    w.array(len(states))
    for rule, level, cond, latched, acked, fault, since, reason in states:
        w.array(8)
        w.text(rule)
        w.int(level)
        w.int(cond)
        w.bool(latched)
        w.bool(acked)
        w.bool(fault)
        w.int(since or 0)
        w.text(reason or "")
    return w.view()


def encode_reply(w, request_id, ok, message, digest):
    """The answer to a command (gateway/wire.py encode_reply); request_id None until it was found authentic."""
    w.reset()
    w.map(5)
    w.head(0, _K_VERSION)
    w.head(0, _VERSION)
    w.head(0, _K_ID)
    if request_id is None:
        w.null()
    else:
        w.text(request_id)
    w.head(0, _K_OK)
    w.bool(ok)
    w.head(0, _K_MESSAGE)
    w.text(message)
    w.head(0, _K_DIGEST)
    w.bytes(digest)
    return w.view()


def _flags(w, historical, unset):
    """Keys 5 (historical) and 6 (stamped before the clock was set), each only when true."""
    if historical:
        w.head(0, _K_HISTORICAL)
        w.bool(True)
    if unset:
        w.head(0, _K_CLOCK_UNSET)
        w.bool(True)


def _value(w, b, i):
    kind = b.kind(i)
    if kind == NULL:
        w.null()
    elif kind == FALSE or kind == TRUE:
        w.bool(kind == TRUE)
    elif kind == INT:
        w.int(b.ival(i))
    elif kind == FLOAT:
        w.float(b.fval(i))
    elif kind == DEC:
        w.decimal(b.ival(i), b.exp(i))
    else:
        raise ValueError("record %d: unknown value kind %d" % (i, kind))


def encode_data(w, session, seq, b, historical=False):
    """Write one data message for the readings in Batch `b` (n >= 1) into Writer `w`.

    Readings are grouped by timestamp and sorted by point inside a group, as the gateway does. Stamped before
    CLOCK_FLOOR_MS, the message says so (key 6); the caller never mixes the two sides (node.same_clock).
    Returns the payload as a memoryview of the writer's buffer.
    """
    n = b.n
    if n == 0:
        raise ValueError("data message with no readings")
    b.sort()
    order = b.order
    t0 = b.ts(order[0])
    ngroups = 1
    for j in range(1, n):
        if b.cmp_ts(order[j], order[j - 1]):
            ngroups += 1
    unset = t0 < CLOCK_FLOOR_MS
    w.reset()
    w.map(5 + (1 if historical else 0) + (1 if unset else 0))
    w.head(0, _K_VERSION)
    w.head(0, _VERSION)
    w.head(0, _K_SESSION)
    w.int(session)
    w.head(0, _K_SEQ)
    w.int(seq)
    w.head(0, _K_T0)
    w.int(t0)
    w.head(0, _K_GROUPS)
    w.array(ngroups)
    start = 0
    while start < n:
        end = start + 1
        while end < n and not b.cmp_ts(order[end], order[start]):
            end += 1
        w.array(4)
        w.int(b.ts(order[start]) - t0 if start else 0)
        w.array(end - start)
        prev = 0
        for j in range(start, end):
            p = b.point(order[j])
            w.int(p - prev)
            prev = p
        w.array(end - start)
        bad = 0
        for j in range(start, end):
            _value(w, b, order[j])
            if b.quality(order[j]):
                bad += 1
        w.map(bad)
        for j in range(start, end):
            q = b.quality(order[j])
            if q:
                w.int(j - start)
                w.int(q)
        start = end
    _flags(w, historical, unset)
    return w.view()


def encode_birth(w, session, ts_ms, site, node_id, software, catalogue, dropped, back_at_ms=None):
    """catalogue: a sequence of (device, point, unit, type) string tuples, in point-index order."""
    w.reset()
    w.map(9 if back_at_ms is None else 10)
    w.head(0, _K_VERSION)
    w.head(0, _VERSION)
    w.head(0, _K_SESSION)
    w.int(session)
    w.head(0, _K_T0)
    w.int(ts_ms)
    w.head(0, _K_SITE)
    w.text(site)
    w.head(0, _K_GATEWAY)
    w.text(node_id)
    w.head(0, _K_SOFTWARE)
    w.text(software)
    w.head(0, _K_CATALOGUE)
    w.array(len(catalogue))
    for entry in catalogue:
        w.array(4)
        for s in entry:
            w.text(s)
    w.head(0, _K_DROPPED)
    w.int(dropped)
    if back_at_ms is not None:
        w.head(0, _K_BACK_AT)
        w.int(back_at_ms)
    w.head(0, _K_KIND)
    w.text("node")
    return w.view()


def encode_death(w, session, reason, ts_ms=None, back_at_ms=None):
    w.reset()
    w.map(3 + (ts_ms is not None) + (back_at_ms is not None))
    w.head(0, _K_VERSION)
    w.head(0, _VERSION)
    w.head(0, _K_SESSION)
    w.int(session)
    if ts_ms is not None:
        w.head(0, _K_T0)
        w.int(ts_ms)
    if back_at_ms is not None:
        w.head(0, _K_BACK_AT)
        w.int(back_at_ms)
    w.head(0, _K_REASON)
    w.int(reason)
    return w.view()
