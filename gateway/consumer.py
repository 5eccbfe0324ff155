"""The reference consumer: what the central platform does with Yujing messages.

`Decoder` is the importable part (no I/O): feed it (topic, payload) pairs in arrival order and it
returns reading records plus notices about gaps, duplicates and lifecycle events. `consume()` is
the MQTT loop behind `yujing consume`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import wire
from .model import PointInfo

log = logging.getLogger("yujing.consumer")

SCHEMA_PATH = Path(__file__).with_name("wire-format.cddl")


def load_schema() -> Any | None:
    """The CDDL validator, when pycddl is installed (`pip install yujing[consumer]`); else None."""
    try:
        import pycddl
    except ImportError:
        return None
    return pycddl.Schema(SCHEMA_PATH.read_text(encoding="utf-8"))


@dataclass
class SenderState:
    catalogues: OrderedDict[int, tuple[PointInfo, ...]] = field(default_factory=OrderedDict)
    highest: int | None = None
    missing: set[int] = field(default_factory=set)
    alive_session: int | None = None


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
                res.notices.append(f"{t.site}/{t.gateway}: death, session {d.session}, reason {d.reason}")
            else:
                self._data(t, state, wire.decode_data(payload), res)
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

    def _data(self, t: wire.Topic, state: SenderState, d: wire.Data, res: Result) -> None:
        who = f"{t.site}/{t.gateway}"
        duplicate = False
        if state.highest is None or d.seq == state.highest + 1:
            state.highest = d.seq
        elif d.seq > state.highest + 1:
            first, last = state.highest + 1, d.seq - 1
            self.gaps += 1
            res.notices.append(f"{who}: gap: seq {first}..{last} missing ({last - first + 1} messages)")
            if last - first < self.MAX_MISSING:
                state.missing.update(range(first, last + 1))
            while len(state.missing) > self.MAX_MISSING:
                state.missing.discard(min(state.missing))
            state.highest = d.seq
        elif d.seq in state.missing:
            state.missing.discard(d.seq)
            res.notices.append(f"{who}: late: seq {d.seq} arrived after later ones")
        else:
            duplicate = True
            self.duplicates += 1
            res.notices.append(f"{who}: duplicate: seq {d.seq} again")
        catalogue = state.catalogues.get(d.session)
        if catalogue is None:
            res.notices.append(f"{who}: no birth seen for session {d.session}; points shown by index")
        for rec in wire.reading_records(t, d, catalogue):
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
