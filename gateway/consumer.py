"""The reference consumer: what the central platform does with Yujing messages.

`Decoder` is the importable part (no I/O): feed it (topic, payload) pairs in arrival order and it
returns reading records plus notices about gaps, duplicates and lifecycle events. `consume()` is
the MQTT loop behind `yujing consume`.
"""

from __future__ import annotations

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


@dataclass
class SeqState:
    highest: int | None = None
    missing: set[int] = field(default_factory=set)


@dataclass
class SenderState:
    catalogues: OrderedDict[int, tuple[PointInfo, ...]] = field(default_factory=OrderedDict)
    seqs: dict[str, SeqState] = field(default_factory=dict)  # per message type: data and alarm count separately


@dataclass
class Result:
    records: list[dict[str, Any]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


class Decoder:
    """Decodes a stream of Yujing messages from any number of gateways and nodes.

    Sequence accounting per sender: a seq above highest+1 opens a gap (reported once); a seq that
    fills a gap is reported as late; a seq seen before is a duplicate (reported, and its readings are
    still returned with `"duplicate": true` so a consumer may store idempotently).
    """

    MAX_MISSING = 100_000  # bounded memory: older holes are forgotten
    MAX_CATALOGUES = 16

    def __init__(self, *, validate: Callable[[bytes], None] | None = None) -> None:
        self.senders: dict[tuple[str, str, str], SenderState] = {}
        self.validate = validate
        self.gaps = 0
        self.duplicates = 0

    def feed(self, topic: str, payload: bytes) -> Result:
        res = Result()
        try:
            t = wire.parse_topic(topic)
            if self.validate is not None:
                try:
                    self.validate(payload)
                except Exception as exc:  # pycddl raises its own ValidationError
                    raise wire.WireError(f"{t.kind}: does not match the CDDL schema: {str(exc).splitlines()[0]}") from exc
            state = self.senders.setdefault((t.prefix, t.site, t.gateway), SenderState())
            if t.kind == "birth":
                self._birth(t, state, wire.decode_birth(payload), res)
            elif t.kind == "death":
                d = wire.decode_death(payload)
                res.notices.append(f"{t.site}/{t.gateway}: death, session {d.session}, reason {d.reason}"
                                   + (f", back at {d.back_at_ms}" if d.back_at_ms else ""))
            elif t.kind == "data":
                data = wire.decode_data(payload)
                duplicate = self._sequence(t, state, "data", data.seq, res)
                self._records(res, wire.reading_records(t, data, self._catalogue(t, state, data.session, res)), duplicate)
            elif t.kind == "alarm":
                alarm = wire.decode_alarm(payload)
                duplicate = self._sequence(t, state, "alarm", alarm.seq, res)
                self._records(res, wire.event_records(t, alarm, state.catalogues.get(alarm.session)), duplicate)
            elif t.kind == "alarms":
                _, _, states = wire.decode_alarms(payload)
                active = [f"{a.rule}={wire.LEVEL_NAMES[a.level]}" + ("(latched)" if a.latched else "") + ("(fault)" if a.fault else "")
                          for a in states if a.level or a.fault]
                res.notices.append(f"{t.site}/{t.gateway}: alarm state: {', '.join(active) or 'all clear'}")
            elif t.kind == "reply":
                request_id, ok, message = wire.decode_reply(payload)
                res.notices.append(f"{t.site}/{t.gateway}: reply to {request_id}: {'ok' if ok else 'REJECTED'}: {message}")
        except wire.WireError as exc:
            res.notices.append(f"rejected message on {topic}: {exc}")
        return res

    def _birth(self, t: wire.Topic, state: SenderState, b: wire.Birth, res: Result) -> None:
        state.catalogues[b.session] = b.catalogue
        state.catalogues.move_to_end(b.session)
        while len(state.catalogues) > self.MAX_CATALOGUES:
            state.catalogues.popitem(last=False)
        res.notices.append(
            f"{t.site}/{t.gateway}: birth, session {b.session}, {len(b.catalogue)} points, software {b.software}"
            + (f", {b.dropped} readings dropped by its spool" if b.dropped else "")
        )

    def _sequence(self, t: wire.Topic, state: SenderState, kind: str, seq: int, res: Result) -> bool:
        """Account for one seq; True when it is a duplicate."""
        who = f"{t.site}/{t.gateway}" + ("" if kind == "data" else f" {kind}")
        s = state.seqs.setdefault(kind, SeqState())
        if s.highest is None or seq == s.highest + 1:
            s.highest = seq
        elif seq > s.highest + 1:
            first, last = s.highest + 1, seq - 1
            self.gaps += 1
            res.notices.append(f"{who}: gap: seq {first}..{last} missing ({last - first + 1} messages)")
            if last - first < self.MAX_MISSING:
                s.missing.update(range(first, last + 1))
            while len(s.missing) > self.MAX_MISSING:
                s.missing.discard(min(s.missing))
            s.highest = seq
        elif seq in s.missing:
            s.missing.discard(seq)
            res.notices.append(f"{who}: late: seq {seq} arrived after later ones")
        else:
            self.duplicates += 1
            res.notices.append(f"{who}: duplicate: seq {seq} again")
            return True
        return False

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
) -> None:
    """Subscribe (QoS 1) and decode until cancelled."""
    async with client_factory() as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        async for message in client.messages:
            res = decoder.feed(str(message.topic), bytes(message.payload))
            for rec in res.records:
                out(rec)
            for n in res.notices:
                notice(n)
