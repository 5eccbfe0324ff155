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
_K_SITE = const(7)
_K_GATEWAY = const(8)
_K_SOFTWARE = const(9)
_K_CATALOGUE = const(10)
_K_DROPPED = const(11)
_K_BACK_AT = const(12)
_K_KIND = const(13)
_K_REASON = const(14)

DEATH_CLEAN = const(0)
DEATH_LOST = const(1)
DEATH_SLEEPING = const(2)


def topic(prefix, site, node_id, kind):
    """`<prefix>/<site>/<node_id>/<kind>` as bytes (kind: "birth", "data" or "death")."""
    return ("%s/%s/%s/%s" % (prefix, site, node_id, kind)).encode()


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

    Readings are grouped by timestamp and sorted by point inside a group, as the gateway does.
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
    w.reset()
    w.map(6 if historical else 5)
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
    if historical:
        w.head(0, _K_HISTORICAL)
        w.bool(True)
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
