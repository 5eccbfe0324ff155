"""The reference consumer: what the central platform does with Yujing messages.

`Decoder` is the importable part (no I/O): feed it (topic, payload) pairs in arrival order and it
returns reading records plus notices about gaps, duplicates and lifecycle events. `consume()` is
the MQTT loop behind `yujing consume`.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import wire
from .model import PointInfo

SCHEMA_PATH = Path(__file__).with_name("wire-format.cddl")


def load_schema() -> Any | None:
    """The CDDL validator, when pycddl is installed (`pip install yujing[consumer]`); else None."""
    try:
        import pycddl
    except ImportError:
        return None
    return pycddl.Schema(SCHEMA_PATH.read_text(encoding="utf-8"))


class Gaps:
    """Missing sequence numbers as sorted, disjoint ranges: a gap of a million messages is one entry, and a
    lookup is a binary search. Bounded: past `limit` ranges the oldest are forgotten (their seqs would then
    count as duplicates if they ever came, which is the safe reading for an idempotent store)."""

    def __init__(self, limit: int = 4096) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []  # inclusive
        self.limit = limit

    def add(self, first: int, last: int) -> None:
        """A new gap above every earlier one."""
        self.starts.append(first)
        self.ends.append(last)
        if len(self.starts) > self.limit:
            del self.starts[0], self.ends[0]

    def take(self, seq: int) -> bool:
        """Whether `seq` was missing; if so it is no longer."""
        i = bisect_right(self.starts, seq) - 1
        if i < 0 or seq > self.ends[i]:
            return False
        start, end = self.starts[i], self.ends[i]
        if start == end:
            del self.starts[i], self.ends[i]
        elif seq == start:
            self.starts[i] = seq + 1
        elif seq == end:
            self.ends[i] = seq - 1
        else:
            self.ends[i] = seq - 1
            self.starts.insert(i + 1, seq + 1)
            self.ends.insert(i + 1, end)
        return True

    def __len__(self) -> int:
        return sum(e - s + 1 for s, e in zip(self.starts, self.ends))


@dataclass
class SeqState:
    highest: int | None = None
    missing: Gaps = field(default_factory=Gaps)


@dataclass
class SenderState:
    catalogues: OrderedDict[int, tuple[PointInfo, ...]] = field(default_factory=OrderedDict)
    # per (session, message type): each session numbers its data and its alarm messages from 1
    seqs: OrderedDict[tuple[int, str], SeqState] = field(default_factory=OrderedDict)
    # per (session, historical): each point's latest timestamp, in seq order (to notice a clock stepped back)
    stamps: OrderedDict[tuple[int, bool], dict[int, int]] = field(default_factory=OrderedDict)


@dataclass
class Result:
    records: list[dict[str, Any]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


class Decoder:
    """Decodes a stream of Yujing messages from any number of gateways and nodes.

    Every message goes through one error boundary: whatever its bytes (and whatever the schema validator
    does with them, panics included), it becomes records or a "rejected" notice, and the next message is
    decoded as if it had not happened. Before any decoding, the bytes pass the format's strict walk
    (gateway.cborcheck via gateway.wire): no bignums, bounded decimals, definite lengths, no duplicate keys.

    Sequence accounting per (sender, session, message type): the first seq seen is the baseline; a seq
    above highest+1 opens a gap (reported once); a seq that fills a gap is reported as late; a seq seen
    before is a duplicate (reported, and its records are still returned with `"duplicate": true` so a
    consumer may store idempotently). A birth that changes a known session's catalogue is reported.

    Order is seq order, not time order: a reading whose timestamp is earlier than the one its point had in
    an earlier message of the same session and lane (the sender's clock stepped back) is no error; it is
    returned as sent and reported once per message as a notice (`clock_steps_back` counts them).
    """

    MAX_CATALOGUES = 16  # sessions remembered per sender
    MAX_SENDERS = 10_000

    def __init__(self, *, validate: Callable[[bytes], None] | None = None, max_bytes: int = wire.MAX_MESSAGE_BYTES) -> None:
        self.senders: OrderedDict[tuple[str, str, str], SenderState] = OrderedDict()
        self.validate = validate
        self.max_bytes = max_bytes
        self.gaps = 0
        self.duplicates = 0
        self.rejected = 0
        self.clock_steps_back = 0

    def feed(self, topic: str, payload: bytes) -> Result:
        res = Result()
        try:
            self._feed(topic, payload, res)
        except (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError):
            raise
        except wire.WireError as exc:
            self._reject(res, topic, str(exc))
        except BaseException as exc:  # pycddl's panics are BaseExceptions; nothing from one message may end the stream
            self._reject(res, topic, f"{type(exc).__name__} while decoding")
        return res

    def _reject(self, res: Result, topic: str, why: str) -> None:
        self.rejected += 1
        res.records.clear()
        res.notices.append(f"rejected message on {_short(topic)}: {why[:300]}")

    def _feed(self, topic: str, payload: bytes, res: Result) -> None:
        t = wire.parse_topic(topic)
        if len(payload) > self.max_bytes:
            raise wire.WireError(f"{len(payload)} bytes, more than {self.max_bytes}")
        if self.validate is not None and t.kind not in ("cmd",):
            try:
                wire.check_received(payload)  # the strict walk first: the validator never sees a bignum
                self.validate(payload)
            except wire.WireError:
                raise
            except Exception as exc:  # pycddl raises its own ValidationError
                raise wire.WireError(f"{t.kind}: does not match the CDDL schema: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
        key = (t.prefix, t.site, t.gateway)
        state = self.senders.get(key)
        if state is None:
            state = self.senders[key] = SenderState()
            if len(self.senders) > self.MAX_SENDERS:
                self.senders.popitem(last=False)
        if t.kind == "birth":
            self._birth(t, state, wire.decode_birth(payload), res)
        elif t.kind == "death":
            d = wire.decode_death(payload)
            res.notices.append(f"{t.site}/{t.gateway}: death, session {d.session}, reason {d.reason}"
                               + (f", back at {d.back_at_ms}" if d.back_at_ms else ""))
        elif t.kind == "data":
            data = wire.decode_data(payload)
            known = state.seqs.get((data.session, "data"))
            highest = known.highest if known is not None else None
            duplicate = self._sequence(t, state, data.session, "data", data.seq, res)
            if not duplicate and (highest is None or data.seq > highest):  # (a late one fills a gap: not in order)
                self._time_order(t, state, data, res)
            self._records(res, wire.reading_records(t, data, self._catalogue(t, state, data.session, res)), duplicate)
        elif t.kind == "alarm":
            alarm = wire.decode_alarm(payload)
            duplicate = self._sequence(t, state, alarm.session, "alarm", alarm.seq, res)
            self._records(res, wire.event_records(t, alarm, state.catalogues.get(alarm.session)), duplicate)
        elif t.kind == "alarms":
            _, _, states = wire.decode_alarms(payload)
            active = [f"{a.rule}={wire.LEVEL_NAMES[a.level]}" + ("(latched)" if a.latched else "") + ("(fault)" if a.fault else "")
                      for a in states if a.level or a.fault]
            res.notices.append(f"{t.site}/{t.gateway}: alarm state: {', '.join(active) or 'all clear'}")
        elif t.kind == "reply":
            reply = wire.decode_reply(payload)
            res.notices.append(f"{t.site}/{t.gateway}: reply to {reply.request_id or (reply.digest or b'').hex() or '?'}: "
                               f"{'ok' if reply.ok else 'REJECTED'}: {reply.message[:300]}")

    def _birth(self, t: wire.Topic, state: SenderState, b: wire.Birth, res: Result) -> None:
        known = state.catalogues.get(b.session)
        if known is not None and known != b.catalogue:
            res.notices.append(f"{t.site}/{t.gateway}: catalogue of session {b.session} changed ({len(known)} → "
                               f"{len(b.catalogue)} points): data of this session is read with the new one")
        state.catalogues[b.session] = b.catalogue
        state.catalogues.move_to_end(b.session)
        while len(state.catalogues) > self.MAX_CATALOGUES:
            state.catalogues.popitem(last=False)
        res.notices.append(
            f"{t.site}/{t.gateway}: birth, session {b.session}, {len(b.catalogue)} points, software {b.software}"
            + (f", {b.dropped} readings dropped by its spool" if b.dropped else "")
        )

    def _sequence(self, t: wire.Topic, state: SenderState, session: int, kind: str, seq: int, res: Result) -> bool:
        """Account for one seq; True when it is a duplicate."""
        who = f"{t.site}/{t.gateway} session {session}" + ("" if kind == "data" else f" {kind}")
        s = state.seqs.get((session, kind))
        if s is None:
            s = state.seqs[(session, kind)] = SeqState()
            while len(state.seqs) > 2 * self.MAX_CATALOGUES:
                state.seqs.popitem(last=False)
        if s.highest is None or seq == s.highest + 1:
            s.highest = seq
        elif seq > s.highest + 1:
            first, last = s.highest + 1, seq - 1
            self.gaps += 1
            res.notices.append(f"{who}: gap: seq {first}..{last} missing ({last - first + 1} messages)")
            s.missing.add(first, last)
            s.highest = seq
        elif s.missing.take(seq):
            res.notices.append(f"{who}: late: seq {seq} arrived after later ones")
        else:
            self.duplicates += 1
            res.notices.append(f"{who}: duplicate: seq {seq} again")
            return True
        return False

    def _time_order(self, t: wire.Topic, state: SenderState, data: wire.Data, res: Result) -> None:
        key = (data.session, data.historical)  # lanes: a live reading may come before older historical ones
        stamps = state.stamps.get(key)
        if stamps is None:
            stamps = state.stamps[key] = {}
            while len(state.stamps) > 2 * self.MAX_CATALOGUES:
                state.stamps.popitem(last=False)
        back = 0
        for r in data.readings:
            before = stamps.get(r.point)
            if before is not None and r.ts_ms < before:
                back = max(back, before - r.ts_ms)
            stamps[r.point] = r.ts_ms
        if back:
            self.clock_steps_back += 1
            res.notices.append(f"{t.site}/{t.gateway} session {data.session}: clock stepped back: seq {data.seq} has "
                               f"readings stamped up to {back} ms before their point's previous ones (kept as sent)")

    def _catalogue(self, t: wire.Topic, state: SenderState, session: int, res: Result) -> tuple[PointInfo, ...] | None:
        catalogue = state.catalogues.get(session)
        if catalogue is None:
            res.notices.append(f"{t.site}/{t.gateway}: no birth seen for session {session}; points shown by index")
        return catalogue

    @staticmethod
    def _records(res: Result, records: Iterable[dict[str, Any]], duplicate: bool) -> None:
        for rec in records:
            if duplicate:
                rec["duplicate"] = True
            res.records.append(rec)


def _short(topic: str) -> str:
    return topic if len(topic) <= 200 else topic[:200] + "…"


def parse_broker(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--broker {value!r}: expected HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


async def consume(
    client_factory: Callable[[], Any],
    topics: Iterable[str],
    decoder: Decoder,
    out: Callable[[dict[str, Any]], None],
    notice: Callable[[str], None],
    *,
    backoff_min_s: float = 1.0,
    backoff_max_s: float = 30.0,
) -> None:
    """Subscribe (QoS 1) and decode until cancelled, reconnecting with backoff. The same decoder carries
    on across reconnects, so duplicates re-sent after a broker restart are still recognised; with a
    persistent session (the factory's job: clean start off, a session expiry), nothing queued is missed."""
    import aiomqtt

    topics = list(topics)
    delay = backoff_min_s
    while True:
        try:
            async with client_factory() as client:
                for topic in topics:
                    await client.subscribe(topic, qos=1)
                notice("connected; subscribed to " + ", ".join(topics))
                delay = backoff_min_s
                async for message in client.messages:
                    res = decoder.feed(str(message.topic), bytes(message.payload))
                    for rec in res.records:
                        out(rec)
                    for n in res.notices:
                        notice(n)
        except aiomqtt.MqttError as exc:
            notice(f"broker connection lost or refused: {exc}; reconnecting in {delay:g} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, backoff_max_s)
