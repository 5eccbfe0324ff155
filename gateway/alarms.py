"""The alarm desk: runs the rule engine on every reading, drives local outputs, spools alarm events with
priority, keeps the retained alarm state current, and takes acknowledgements (local socket or signed
MQTT command). Link or no link, disk or no disk: outputs are driven before anything is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from . import wire
from .clock import Clock
from .model import Reading
from .rules import AlarmEngine, Transition, UnknownRuleError
from .spool import Spool, SpoolError

log = logging.getLogger("yujing.alarms")

MAX_UNSTORED_EVENTS = 10_000  # held in memory while the disk refuses them; the oldest go first past this


class Outputs(Protocol):
    def update(self, levels: Any, transitions: Sequence[Transition]) -> None:
        """Recompute the desired outputs; must not block."""


def to_wire_event(t: Transition) -> wire.Event:
    return wire.Event(str(t.kind), t.rule, int(t.old_level), int(t.new_level), t.ts_ms, dict(t.values), t.message, t.by)


class AlarmDesk:
    def __init__(
        self,
        engine: AlarmEngine,
        clock: Clock,
        *,
        session: int,
        spool: Spool,
        outputs: Outputs | None = None,
        publish_state: Callable[[bytes], None] | None = None,
        wake_uplink: Callable[[], None] | None = None,
        command_key: bytes | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.session = session
        self.spool = spool
        self.outputs = outputs
        self.publish_state = publish_state
        self.wake_uplink = wake_uplink
        self.command_key = command_key
        self._unstored: deque[wire.Event] = deque(maxlen=MAX_UNSTORED_EVENTS)
        self._seen_commands: deque[str] = deque(maxlen=1024)
        self.transitions = 0
        self._published_states: list[wire.AlarmStatus] = []
        if self.outputs is not None:
            self.outputs.update(self.levels(), [])  # restored latched alarms drive their outputs at once

    def levels(self) -> dict[str, Any]:
        return {rule: state.level for rule, state in self.engine.snapshot().items()}

    # ---------------------------------------------------------- inputs

    def on_readings(self, readings: Sequence[Reading]) -> None:
        out: list[Transition] = []
        evaluate = self.engine.evaluate
        for r in readings:
            out.extend(evaluate(r))
        if out:
            self._handle(out)

    def tick(self) -> None:
        out = self.engine.tick(self.clock.time_ms())
        if out:
            self._handle(out)
        elif self._unstored:
            self._store([])
        # A latch holding the level while the condition falls changes the state without a transition.
        if self.publish_state is not None and self._states() != self._published_states:
            self._publish_state()

    def acknowledge(self, rule: str, by: str) -> tuple[bool, str]:
        try:
            out = self.engine.acknowledge(rule, by, self.clock.time_ms())
        except UnknownRuleError as exc:
            return False, str(exc)
        except ValueError as exc:
            return False, str(exc)
        if out:
            self._handle(out)
        state = self.engine.snapshot()[rule]
        return True, f"{rule} acknowledged by {by}; level now {state.level.name}" + (" (still latched: the condition holds)" if state.latched else "")

    def handle_command(self, payload: bytes) -> bytes:
        """A signed MQTT command → the reply payload. A rejected command changes nothing."""
        try:
            cmd = wire.decode_command(payload, self.command_key, now_ms=self.clock.time_ms())
        except wire.WireError as exc:
            request_id = _request_id(payload)
            log.warning("command rejected: %s", exc)
            return wire.encode_reply(request_id, False, str(exc))
        if cmd.request_id in self._seen_commands:
            return wire.encode_reply(cmd.request_id, False, f"command {cmd.request_id!r}: replayed (this id was already used)")
        self._seen_commands.append(cmd.request_id)
        ok, message = self.acknowledge(cmd.rule, cmd.by)
        log.info("command %s (%s %s by %s): %s", cmd.request_id, cmd.command, cmd.rule, cmd.by, message)
        return wire.encode_reply(cmd.request_id, ok, message)

    def _states(self) -> list[wire.AlarmStatus]:
        return [
            wire.AlarmStatus(s.rule, int(s.level), int(s.condition), s.latched, s.acked, s.fault, s.since_ms, s.fault_reason)
            for s in self.engine.snapshot().values()
        ]

    def state_payload(self) -> bytes:
        return wire.encode_alarms(self.session, self.clock.time_ms(), self._states())

    def _publish_state(self) -> None:
        if self.publish_state is not None:
            self._published_states = self._states()
            self.publish_state(wire.encode_alarms(self.session, self.clock.time_ms(), self._published_states))

    def actuator_event(self, event: wire.Event) -> None:
        """An output failed or recovered: spooled and published like an alarm transition."""
        level = logging.WARNING if event.kind == "actuator_fault" else logging.INFO
        log.log(level, "%s: %s", event.rule, event.message)
        self._store([event])

    # ---------------------------------------------------------- outputs

    def _handle(self, transitions: list[Transition]) -> None:
        self.transitions += len(transitions)
        if self.outputs is not None:
            self.outputs.update(self.levels(), transitions)  # first: the siren does not wait for the disk
        for t in transitions:
            log.warning("alarm %s %s: %s -> %s: %s", t.rule, t.kind, t.old_level.name, t.new_level.name, t.message)
        self._store([to_wire_event(t) for t in transitions])
        self._publish_state()

    def _store(self, events: list[wire.Event]) -> None:
        pending = list(self._unstored) + events
        try:
            if pending:
                self.spool.append_events(self.session, pending)
        except SpoolError as exc:
            self._unstored.extend(events)
            log.error("%s: %d alarm events held in memory until the disk takes them; outputs keep running", exc, len(self._unstored))
            return
        self._unstored.clear()
        if self.wake_uplink is not None:
            self.wake_uplink()


def _request_id(payload: bytes) -> str | None:
    with contextlib.suppress(Exception):
        import cbor2

        msg = cbor2.loads(payload)
        if isinstance(msg, dict) and isinstance(msg.get(wire.K_ID), str):
            return msg[wire.K_ID][:64]
    return None


# ---------------------------------------------------------------- local control socket


class ControlServer:
    """A Unix socket (mode 0600) for `yujing ack` on the gateway itself: works with the uplink down.

    Protocol: one JSON object per line, {"ack": RULE, "by": NAME} or {"status": true}; one JSON reply line.
    """

    def __init__(self, path: Path, desk: AlarmDesk) -> None:
        self.path = path
        self.desk = desk
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            reply = self._answer(line)
        except (TimeoutError, ValueError) as exc:
            reply = {"ok": False, "message": f"bad request: {exc}"}
        writer.write(json.dumps(reply, ensure_ascii=False).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def _answer(self, line: bytes) -> dict[str, Any]:
        req = json.loads(line or b"null")
        if not isinstance(req, dict):
            raise ValueError("expected a JSON object")
        if req.get("status"):
            return {"ok": True, "alarms": [s.as_dict() for s in self.desk.engine.snapshot().values()]}
        rule, by = req.get("ack"), req.get("by")
        if not isinstance(rule, str) or not isinstance(by, str) or not by.strip():
            raise ValueError('expected {"ack": "<rule id>", "by": "<who>"}')
        ok, message = self.desk.acknowledge(rule, by)
        return {"ok": ok, "message": message}


async def control_request(path: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Client side of the control socket (used by `yujing ack` and `yujing alarms`)."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    writer.write(json.dumps(request).encode() + b"\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), timeout)
    writer.close()
    return json.loads(line)
