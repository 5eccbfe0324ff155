"""The gateway's own faults: a stage that failed, a disk that refuses writes, a file that had to be set aside.

Each fault source is raised once (a `gateway_fault` alarm event, spooled and published like any alarm
event) and cleared once (`gateway_ok`). While any source is in fault, the pseudo-rule `gateway.fault`
shows IV_BLUE to the alarm outputs, so a site can wire a fault lamp to it
(`when = { rules = ["gateway.fault"], level = "IV_BLUE" }`); it is matched only by its exact name, never
by a glob, so a gateway fault cannot sound an evacuation siren.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from . import wire
from .clock import Clock

log = logging.getLogger("yujing.health")

FAULT_RULE = "gateway.fault"
RESERVED_PREFIX = "gateway."


class Health:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.faults: dict[str, str] = {}  # source → what is wrong
        self.since_ms: int | None = None
        self.raised = 0
        self._emit: Callable[[wire.Event], None] | None = None
        self._held: list[wire.Event] = []  # events from before the alarm desk was attached
        self._listeners: list[Callable[[], None]] = []

    def attach(self, emit: Callable[[wire.Event], None]) -> None:
        """Where events go (the alarm desk); events raised before this are delivered now."""
        self._emit = emit
        held, self._held = self._held, []
        for e in held:
            emit(e)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Called after a source enters or leaves fault (the desk recomputes the outputs)."""
        self._listeners.append(listener)

    @property
    def faulted(self) -> bool:
        return bool(self.faults)

    def fault(self, source: str, message: str) -> None:
        if source in self.faults:
            self.faults[source] = message
            return
        self.faults[source] = message
        self.raised += 1
        if len(self.faults) == 1:
            self.since_ms = self.clock.time_ms()
        log.error("gateway fault (%s): %s", source, message)
        self._send(wire.Event("gateway_fault", f"{RESERVED_PREFIX}{source}", 0, 0, self.clock.time_ms(), {}, message))

    def note(self, source: str, message: str) -> None:
        """A one-off fault (a file set aside at start): raised and reported, nothing to clear later."""
        log.error("gateway fault (%s): %s", source, message)
        self.raised += 1
        self._send(wire.Event("gateway_fault", f"{RESERVED_PREFIX}{source}", 0, 0, self.clock.time_ms(), {}, message))

    def ok(self, source: str, message: str) -> None:
        if self.faults.pop(source, None) is None:
            return
        if not self.faults:
            self.since_ms = None
        log.warning("gateway fault cleared (%s): %s", source, message)
        self._send(wire.Event("gateway_ok", f"{RESERVED_PREFIX}{source}", 0, 0, self.clock.time_ms(), {}, message))

    def _send(self, event: wire.Event) -> None:
        if self._emit is None:
            self._held.append(event)
        else:
            try:
                self._emit(event)
            except Exception:  # reporting a fault must never become one
                log.exception("could not record a gateway fault event")
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("gateway fault listener failed")
