"""The controller: alarm levels in, actuator states out, independent of the uplink.

    poll path ──update(levels, transitions)──▶ desired state of each output ──wake──▶ its worker
              (synchronous, cheap, never blocks)  transitions for each program ──queue─▶ its worker

    run(): one worker task per action, so a dead relay module never delays a pin or another bus.
      output worker:  write on change at once → on failure retry with backoff (0.2 s doubling to 10 s)
                      → when it holds, write the same state again every reassert_s (a rebooted
                        relay module gets its state back)
      program worker: run the command for each queued transition, in order, one at a time

Faults are reported as ActuatorEvents (`actuator_fault` when an output or program starts failing,
`actuator_ok` when it works again) through `on_event`, and are listed by `faults`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from gateway.clock import Clock
from gateway.rules.levels import Level, Transition

from .base import BusWriter, Context, EventAction, OutputAction
from .common import ActionConfig, OutputConfig
from .errors import ActionConfigError, ActuatorError
from .registry import build_action

_log = logging.getLogger("yujing.actions")

FAULT = "actuator_fault"
OK = "actuator_ok"


@dataclass(frozen=True, slots=True)
class ActuatorEvent:
    """An actuator started failing (`actuator_fault`) or works again (`actuator_ok`)."""

    action: str  # the action's name
    kind: str  # "actuator_fault" | "actuator_ok"
    ts_ms: int  # wall clock, epoch ms
    message: str  # what failed (bus, unit, address / pin / command, and the error), or what works again

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict for spooling and publishing."""
        return {"action": self.action, "kind": self.kind, "ts_ms": self.ts_ms, "message": self.message}


class _Slot:
    """Runtime state of one action."""

    def __init__(self, action: Any) -> None:
        self.action = action
        self.name: str = action.config.name
        self.wake = asyncio.Event()
        self.fault: str | None = None
        self.attempts = 0  # writes or runs started
        self.failures = 0  # consecutive failures
        self.failed = 0  # failed writes or runs, in all


class _Output(_Slot):
    def __init__(self, action: OutputAction) -> None:
        super().__init__(action)
        config: OutputConfig = action.config
        self.threshold: Level = config.when.level or Level.IV_BLUE
        self.desired: bool | None = None  # None until the first update()
        self.applied: bool | None = None  # what the actuator confirmed last (None: unknown)
        self.next_at = -math.inf  # monotonic time of the next write (retry or reassert)
        self.changed_at = -math.inf  # when `desired` last changed, for the latency log
        self.latency_s: float | None = None  # update() → confirmed write, for the last change


class _Program(_Slot):
    def __init__(self, action: EventAction) -> None:
        super().__init__(action)
        self.pending: deque[Transition] = deque()
        self.dropped = 0


class ActionController:
    """Drives a site's alarm outputs and programs. Call update() and run() from one event loop."""

    def __init__(
        self,
        configs: Iterable[ActionConfig],
        writers: Mapping[str, BusWriter],
        clock: Clock,
        *,
        pin_factory: Any = None,
        on_event: Callable[[ActuatorEvent], None] | None = None,
        reassert_s: float = 30.0,
        backoff_min_s: float = 0.2,
        backoff_max_s: float = 10.0,
        write_timeout_s: float = 5.0,
        max_pending: int = 100,
    ) -> None:
        """Build every action (no I/O: pins open and writes start in run()). `writers` maps bus name →
        BusWriter (the BusSchedulers), `pin_factory` goes to gpiozero (None: its default). `on_event` is
        called for each ActuatorEvent, from the event loop; it must not block.

        Raises ActionConfigError when an action cannot be built (e.g. no writer for its bus) and ValueError
        for a timing option that is not > 0.
        """
        for key, value in (("reassert_s", reassert_s), ("backoff_min_s", backoff_min_s), ("backoff_max_s", backoff_max_s),
                           ("write_timeout_s", write_timeout_s), ("max_pending", max_pending)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ActionController: {key} must be > 0, got {value!r}")
        if backoff_max_s < backoff_min_s:
            raise ValueError(f"ActionController: backoff_max_s ({backoff_max_s}) is below backoff_min_s ({backoff_min_s})")
        self.clock = clock
        self.on_event = on_event
        self.reassert_s = float(reassert_s)
        self.backoff_min_s = float(backoff_min_s)
        self.backoff_max_s = float(backoff_max_s)
        self.write_timeout_s = float(write_timeout_s)
        self.max_pending = int(max_pending)
        ctx = Context(writers, clock, pin_factory)
        self._outputs: list[_Output] = []
        self._programs: list[_Program] = []
        names: set[str] = set()
        for config in configs:
            if config.name in names:
                raise ActionConfigError(config.where("name"), f"duplicate action name {config.name!r}")
            names.add(config.name)
            action = build_action(config, ctx)
            if isinstance(config, OutputConfig):
                self._outputs.append(_Output(action))
            else:
                self._programs.append(_Program(action))
        self._watchers: dict[str, tuple[_Output, ...]] = {}  # rule id → outputs whose when.rules match it
        self._running = False

    # -- input (poll path) ----------------------------------------------------------------------------

    def update(self, levels: Mapping[str, Level], transitions: Sequence[Transition] = ()) -> None:
        """Take the alarm picture after a batch of readings (or a tick, or an acknowledgement).

        `levels` maps every rule id to the level it shows now (AlarmState.level: latched levels included);
        a rule missing from it counts as NONE. `transitions` are the ones just produced, for programs.
        Synchronous and cheap (a dict walk; nothing is awaited or written here): outputs whose desired state
        changed, and programs with new work, are woken. Never raises; a bug is logged.
        """
        try:
            self._update(levels, transitions)
        except Exception:
            _log.exception("actions: update failed; outputs keep their last state")

    def _update(self, levels: Mapping[str, Level], transitions: Sequence[Transition]) -> None:
        causes: dict[_Output, tuple[str, Level]] = {}
        for rule, level in levels.items():
            if level:
                watchers = self._watchers.get(rule)
                if watchers is None:
                    watchers = self._watchers[rule] = tuple(o for o in self._outputs if o.action.config.when.matches(rule))
                for out in watchers:
                    if level >= out.threshold and out not in causes:
                        causes[out] = (rule, level)
        for out in self._outputs:
            cause = causes.get(out)
            on = cause is not None
            if on != out.desired:
                out.desired = on
                out.next_at = -math.inf
                out.changed_at = self.clock.monotonic()
                out.wake.set()
                why = f"{cause[0]} shows {cause[1].name}" if cause else f"no matching rule at {out.threshold.name} or above"
                _log.info("action %s: %s → %s (%s)", out.name, out.action.target, "ON" if on else "OFF", why)
        if transitions and self._programs:
            for t in transitions:
                for p in self._programs:
                    if p.action.wants(t):
                        self._offer(p, t)

    def _offer(self, p: _Program, t: Transition) -> None:
        if len(p.pending) >= self.max_pending:
            p.dropped += 1
            message = (f"{p.action.target}: {p.dropped} transition(s) not run, {len(p.pending)} waiting "
                       f"(max_pending {self.max_pending}); dropped {t.kind} {t.rule} {t.new_level.name}")
            if p.dropped == 1 or p.dropped % 100 == 0:
                _log.error("action %s: %s", p.name, message)
            self._raise(p, message)
            return
        p.pending.append(t)
        p.wake.set()

    # -- observable state -----------------------------------------------------------------------------

    @property
    def faults(self) -> Mapping[str, str]:
        """The actions whose actuator is failing now: name → the latest error (read-only snapshot)."""
        return MappingProxyType({s.name: s.fault for s in (*self._outputs, *self._programs) if s.fault is not None})

    def status(self) -> dict[str, dict[str, Any]]:
        """Per action, for a local panel or a status message: target, desired/applied state (outputs),
        pending runs (programs), attempts, the current fault."""
        out: dict[str, dict[str, Any]] = {}
        for o in self._outputs:
            out[o.name] = {"target": o.action.target, "desired": o.desired, "applied": o.applied, "attempts": o.attempts,
                           "failures": o.failures, "failed": o.failed, "latency_s": o.latency_s, "fault": o.fault}
        for p in self._programs:
            out[p.name] = {"target": p.action.target, "pending": len(p.pending), "dropped": p.dropped, "attempts": p.attempts,
                           "failures": p.failures, "failed": p.failed, "fault": p.fault}
        return out

    # -- workers --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Drive every action until cancelled: one task per action. An output is first written after the
        first update() (so a restart does not blip a latched siren off before the restored levels arrive):
        call update() once at start. Never returns or raises on actuator errors; cancelling it stops the
        workers (and kills a running program). Outputs keep their state."""
        if self._running:
            raise RuntimeError("ActionController.run() is already running")
        self._running = True
        try:
            async with asyncio.TaskGroup() as tg:
                for o in self._outputs:
                    tg.create_task(self._guard(self._drive, o), name=f"action-{o.name}")
                for p in self._programs:
                    tg.create_task(self._guard(self._serve, p), name=f"action-{p.name}")
                await asyncio.Event().wait()  # until cancelled, even with no actions
        finally:
            self._running = False

    def close(self) -> None:
        """Release what actions hold (GPIO pins). Call after run() has stopped. Safe to call twice."""
        for s in (*self._outputs, *self._programs):
            try:
                s.action.close()
            except Exception:
                _log.exception("action %s: close failed", s.name)

    async def _guard(self, worker: Callable[[Any], Awaitable[None]], slot: _Slot) -> None:
        # A bug in one worker must not stop the others (a TaskGroup cancels siblings when one fails).
        while True:
            try:
                await worker(slot)
            except Exception:
                _log.exception("action %s: worker failed; restarting it in %.1f s", slot.name, self.backoff_max_s)
                await self.clock.sleep(self.backoff_max_s)

    async def _drive(self, out: _Output) -> None:
        while True:
            out.wake.clear()
            if out.desired is None:
                await out.wake.wait()
                continue
            now = self.clock.monotonic()
            if now >= out.next_at:
                await self._write(out)
                continue
            await self._sleep_or_wake(out.wake, out.next_at - now)

    async def _write(self, out: _Output) -> None:
        want = bool(out.desired)
        reassert = out.applied == want and out.next_at != -math.inf
        out.attempts += 1
        try:
            await self._bounded(out.action.apply(want), out.action.target)
        except ActuatorError as exc:
            error = str(exc)
        except Exception as exc:  # an action bug; report it like a failure, with the traceback in the log
            _log.exception("action %s: %s: unexpected error", out.name, out.action.target)
            error = f"{out.action.target}: {type(exc).__name__}: {exc}"
        else:
            now = self.clock.monotonic()
            out.applied = want
            out.failures = 0
            out.next_at = now + self.reassert_s if out.desired == want else -math.inf
            state = "ON" if want else "OFF"
            if reassert:
                _log.debug("action %s: %s reasserted %s", out.name, out.action.target, state)
            else:
                out.latency_s = now - out.changed_at
                _log.info("action %s: %s is %s (%.0f ms after the change)", out.name, out.action.target, state, out.latency_s * 1000)
            self._clear(out, f"{out.action.target} is {state} again")
            return
        now = self.clock.monotonic()
        out.applied = None
        out.failures += 1
        out.failed += 1
        delay = min(self.backoff_min_s * 2 ** min(out.failures - 1, 30), self.backoff_max_s)
        out.next_at = now + delay if out.desired == want else now
        self._raise(out, error, retry_s=delay)

    async def _serve(self, p: _Program) -> None:
        while True:
            p.wake.clear()
            if not p.pending:
                await p.wake.wait()
                continue
            t = p.pending.popleft()
            p.attempts += 1
            try:
                await p.action.fire(t)
            except ActuatorError as exc:
                p.failures += 1
                p.failed += 1
                self._raise(p, str(exc))
            except Exception as exc:
                _log.exception("action %s: %s: unexpected error", p.name, p.action.target)
                p.failures += 1
                p.failed += 1
                self._raise(p, f"{p.action.target}: {type(exc).__name__}: {exc}")
            else:
                p.failures = 0
                self._clear(p, f"{p.action.target} ran successfully again")

    async def _bounded(self, call: Awaitable[None], target: str) -> None:
        """Await `call`, but no longer than write_timeout_s (a bus stuck behind a reconnect, a writer that
        is not running): then cancel it and raise ActuatorError."""
        task = asyncio.ensure_future(call)
        sleeper = asyncio.ensure_future(self.clock.sleep(self.write_timeout_s))
        try:
            await asyncio.wait({task, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # we are cancelled: so is the write (a bus write skips a cancelled request)
            task.cancel()
            raise
        finally:
            sleeper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ActuatorError(f"{target}: not confirmed within {self.write_timeout_s:g} s "
                                "(bus busy or reconnecting, or its scheduler is not running)")
        task.result()

    async def _sleep_or_wake(self, wake: asyncio.Event, delay: float) -> None:
        sleeper = asyncio.ensure_future(self.clock.sleep(delay))
        waker = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    # -- fault reporting ------------------------------------------------------------------------------

    def _raise(self, slot: _Slot, message: str, *, retry_s: float | None = None) -> None:
        retry = "" if retry_s is None else f"; retrying in {retry_s:.1f} s"
        if slot.fault is None:
            slot.fault = message
            _log.error("action %s: actuator fault: %s%s", slot.name, message, retry)
            self._emit(slot, FAULT, message)
            return
        slot.fault = message
        n = slot.failures
        if n and n & (n - 1) == 0:  # 2, 4, 8, …: keep the log readable during a long outage
            _log.warning("action %s: still failing (%d attempts in a row): %s%s", slot.name, n, message, retry)

    def _clear(self, slot: _Slot, message: str) -> None:
        if slot.fault is None:
            return
        slot.fault = None
        _log.info("action %s: actuator ok: %s", slot.name, message)
        self._emit(slot, OK, message)

    def _emit(self, slot: _Slot, kind: str, message: str) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(ActuatorEvent(slot.name, kind, self.clock.time_ms(), message))
        except Exception:
            _log.exception("action %s: on_event callback failed for %s", slot.name, kind)
