"""The alarm desk: runs the rule engine on every poll, drives local outputs, hands alarm events to storage
with priority, keeps the retained alarm state current, and takes acknowledgements (local socket or signed
MQTT command). Link or no link, disk or no disk: outputs are driven before anything is stored, and nothing
here waits for a disk (storage takes events on its own thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from . import wire
from .clock import Clock
from .clockcheck import CLOCK_FLOOR_MS, Step
from .commands import Command, quote
from .health import FAULT_RULE, Health
from .model import Reading
from .rules import AlarmEngine, Level, Transition, UnknownRuleError

log = logging.getLogger("yujing.alarms")

MAX_BY = 64  # characters in who acknowledges


class Outputs(Protocol):
    def update(self, levels: Any, transitions: Sequence[Transition]) -> None:
        """Recompute the desired outputs; must not block."""


class EventSink(Protocol):
    def append_events(self, events: Sequence[wire.Event]) -> None:
        """Accept alarm events for storing and publishing; must not block or raise."""


def to_wire_event(t: Transition) -> wire.Event:
    return wire.Event(str(t.kind), t.rule, int(t.old_level), int(t.new_level), t.ts_ms, dict(t.values), t.message, t.by)


class AlarmDesk:
    def __init__(
        self,
        engine: AlarmEngine,
        clock: Clock,
        *,
        session: int,
        events: EventSink,
        health: Health | None = None,
        outputs: Outputs | None = None,
        publish_state: Callable[[bytes], None] | None = None,
        device_points: dict[str, range] | None = None,
        clock_steps: Callable[[], Sequence[Step]] | None = None,
        on_clock_step: Callable[[Step], None] | None = None,
    ) -> None:
        self.engine = engine
        # The wall clock's steps (gateway.clockcheck), taken before every poll and tick is evaluated, so the
        # engine has moved its remembered times before it sees a time on the new clock.
        self.clock_steps = clock_steps
        self.on_clock_step = on_clock_step
        # device → the rules on its points: a device may be polled faster while one of them shows a level
        self._device_rules = {name: engine.rules_reading(points) for name, points in (device_points or {}).items()}
        self.clock = clock
        self.session = session
        self.events = events
        self.health = health
        self.outputs = outputs
        self.publish_state = publish_state
        self.transitions = 0
        self.last_tick: float | None = None  # real monotonic time of the last tick, for the watchdog
        self._published_states: list[wire.AlarmStatus] = []
        if health is not None:
            health.attach(self.gateway_event)
            health.on_change(self._outputs_changed)
        if self.outputs is not None:
            self.outputs.update(self.levels(), [])  # restored latched alarms drive their outputs at once

    def device_level(self, device: str) -> int:
        """The highest level any rule reading this device's points shows now (0 when none)."""
        level = self.engine.level
        return max((int(level(r)) for r in self._device_rules.get(device, ())), default=0)

    def levels(self) -> dict[str, Any]:
        levels: dict[str, Any] = {rule: state.level for rule, state in self.engine.snapshot().items()}
        levels[FAULT_RULE] = Level.IV_BLUE if self.health is not None and self.health.faulted else Level.NONE
        return levels

    # ---------------------------------------------------------- inputs

    def on_readings(self, readings: Sequence[Reading]) -> None:
        """One poll's readings, evaluated together (order-independent within the poll)."""
        if self.clock_steps is not None:
            self._clock_stepped()
        out = self.engine.evaluate_poll(readings)
        if out:
            self._handle(out)

    def tick(self) -> None:
        self.last_tick = time.monotonic()
        now = self.clock.time_ms()  # (first: it is what notices a step when no poll is due)
        if self.clock_steps is not None:
            self._clock_stepped()
        out = self.engine.tick(now)
        if out:
            self._handle(out)
        # A latch holding the level while the condition falls changes the state without a transition.
        if self.publish_state is not None and self._states() != self._published_states:
            self._publish_state()

    def _clock_stepped(self) -> None:
        assert self.clock_steps is not None
        for step in self.clock_steps():
            # Setting the clock moves what was stamped since boot, not the state restored from before it.
            self.engine.shift_time(step.delta_ms, before_ms=CLOCK_FLOOR_MS if step.sets else None)
            if self.on_clock_step is not None:
                self.on_clock_step(step)

    def acknowledge(self, rule: str, by: str) -> tuple[bool, str]:
        """Acknowledge `rule` for `by` (1–64 printable characters: it goes into logs and events)."""
        if not isinstance(by, str) or not by.strip() or len(by) > MAX_BY or not by.isprintable():
            return False, f"'by' must name who acknowledges in 1–{MAX_BY} printable characters, got {quote(by)}"
        if not isinstance(rule, str) or len(rule) > 64 or not rule.isprintable():
            return False, f"no alarm rule {quote(rule)}"
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

    def execute(self, cmd: Command) -> tuple[bool, str]:
        """An authentic, fresh, non-replayed command (gateway.command_inbox) → (done, message)."""
        if cmd.command == "ack":
            return self.acknowledge(cmd.rule, cmd.by)
        return False, f"unknown command {quote(cmd.command)}"

    def _states(self) -> list[wire.AlarmStatus]:
        states = [
            wire.AlarmStatus(s.rule, int(s.level), int(s.condition), s.latched, s.acked, s.fault, s.since_ms, s.fault_reason)
            for s in self.engine.snapshot().values()
        ]
        if self.health is not None and self.health.faulted:
            reason = "; ".join(f"{k}: {v}" for k, v in self.health.faults.items())[:500]
            states.append(wire.AlarmStatus(FAULT_RULE, 1, 1, False, False, True, self.health.since_ms, reason))
        return states

    def state_payload(self) -> bytes:
        return wire.encode_alarms(self.session, self.clock.time_ms(), self._states())

    def _publish_state(self) -> None:
        if self.publish_state is not None:
            self._published_states = self._states()
            self.publish_state(wire.encode_alarms(self.session, self.clock.time_ms(), self._published_states))

    def actuator_event(self, event: wire.Event) -> None:
        """An output failed or recovered: stored and published like an alarm transition."""
        level = logging.WARNING if event.kind == "actuator_fault" else logging.INFO
        log.log(level, "%s: %s", event.rule, event.message)
        self.events.append_events([event])

    def gateway_event(self, event: wire.Event) -> None:
        """A gateway fault raised or cleared (gateway.health): stored and published like an alarm event."""
        self.events.append_events([event])

    def _outputs_changed(self) -> None:
        if self.outputs is not None:
            self.outputs.update(self.levels(), [])
        self._publish_state()

    # ---------------------------------------------------------- outputs

    def _handle(self, transitions: list[Transition]) -> None:
        self.transitions += len(transitions)
        if self.outputs is not None:
            self.outputs.update(self.levels(), transitions)  # first: the siren does not wait for anything
        for t in transitions:
            # The message already names the rule, the kind and the levels (gateway.rules.core): said once.
            log.warning("alarm %s", t.message)
        self.events.append_events([to_wire_event(t) for t in transitions])
        self._publish_state()


# ---------------------------------------------------------------- local control socket


MAX_REQUEST = 4096  # bytes in one control request line


class ControlServer:
    """A Unix socket (mode 0600) for `yujing ack` on the gateway itself: works with the uplink down.

    Protocol: one JSON object per line, {"ack": RULE, "by": NAME}, {"status": true} (the alarms) or
    {"overview": true} (the site at a glance, gateway.status); one JSON reply line.
    """

    def __init__(self, path: Path, desk: AlarmDesk, *, overview: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> None:
        self.path = path
        self.desk = desk
        self.overview = overview
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_REQUEST)
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
        # Whatever a client sends, it gets one bounded answer and the socket server goes on.
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 5)
                req = json.loads(line or b"null")
                if isinstance(req, dict) and req.get("overview") and self.overview is not None:
                    reply = {"ok": True, "overview": await asyncio.wait_for(self.overview(), 5)}
                else:
                    reply = self._answer(line)
            except (TimeoutError, ValueError) as exc:  # ValueError: bad JSON, or a line over MAX_REQUEST
                reply = {"ok": False, "message": f"bad request: {str(exc)[:200]}"}
            except Exception as exc:
                log.exception("control socket: request failed")
                reply = {"ok": False, "message": f"internal error: {type(exc).__name__}"}
            writer.write(json.dumps(reply, ensure_ascii=False, default=str).encode() + b"\n")
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.drain(), 5)
        finally:
            writer.close()

    def _answer(self, line: bytes) -> dict[str, Any]:
        req = json.loads(line or b"null")
        if not isinstance(req, dict):
            raise ValueError("expected a JSON object")
        if req.get("status"):
            faults = dict(self.desk.health.faults) if self.desk.health is not None else {}
            return {"ok": True, "alarms": [s.as_dict() for s in self.desk.engine.snapshot().values()], "gateway_faults": faults}
        rule, by = req.get("ack"), req.get("by")
        if not isinstance(rule, str) or not isinstance(by, str) or not by.strip():
            raise ValueError('expected {"ack": "<rule id>", "by": "<who>"}')
        ok, message = self.desk.acknowledge(rule, by)
        return {"ok": ok, "message": message}


async def control_request(path: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Client side of the control socket (used by `yujing ack` and `yujing alarms`)."""
    # The overview of a large site is one long line (about 200 bytes a point).
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=16 * 1024 * 1024), timeout)
    writer.write(json.dumps(request).encode() + b"\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), timeout)
    writer.close()
    return json.loads(line)
