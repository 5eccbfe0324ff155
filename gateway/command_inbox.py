"""Commands arriving over MQTT: verified, checked for replay and freshness, carried out, answered.

Runs in the uplink (a supervised stage). What it costs an attacker's message is bounded: the size cap and
the strict envelope walk come first, a signature check next, and only an authentic payload is decoded.
Rejections are answered at most `reject_burst` times per `reject_window_s`; past that they are counted and
dropped silently, with one log line per window, so a flood of garbage cannot fill the log or the broker.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from . import wire
from .clock import Clock
from .commands import Command, CommandRejected, Keyring, ReplayStore, digest, parse_payload, quote, verify

log = logging.getLogger("yujing.commands")

Execute = Callable[[Command], tuple[bool, str]]  # an authentic, fresh command → (done, message)
SaveCounters = Callable[[Mapping[str, int]], Awaitable[None]]  # durably, off the event loop; raises OSError


@dataclass
class CommandStats:
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # by reason
    unanswered: int = 0  # rejections over the rate limit


class CommandInbox:
    def __init__(
        self,
        keys: Keyring,
        replay: ReplayStore,
        *,
        site: str,
        gateway: str,
        clock: Clock,
        execute: Execute,
        save_counters: SaveCounters,
        max_skew_ms: int = 300_000,
        reject_burst: int = 10,
        reject_window_s: float = 60.0,
    ) -> None:
        self.keys = keys
        self.replay = replay
        self.site, self.gateway = site, gateway
        self.clock = clock
        self.execute = execute
        self.save_counters = save_counters
        self.max_skew_ms = max_skew_ms
        self.reject_burst = reject_burst
        self.reject_window_s = reject_window_s
        self.stats = CommandStats()
        self._window_start = clock.monotonic()
        self._window_rejects = 0

    async def handle(self, payload: bytes, *, retained: bool = False) -> bytes | None:
        """One command message → the reply payload, or None when a rejection is over the rate limit."""
        tag = digest(payload)
        request_id: str | None = None  # echoed only once it is authentic and checked
        try:
            if retained:
                raise CommandRejected("retained", "retained commands are refused (a command acts once, when it is sent)")
            kid, signed = verify(payload, self.keys)
            cmd = parse_payload(signed, kid, site=self.site, gateway=self.gateway)
            request_id = cmd.request_id
            now = self.clock.time_ms()
            if abs(cmd.ts_ms - now) > self.max_skew_ms:
                raise CommandRejected("stale", f"command {quote(cmd.request_id)}: stale or future timestamp "
                                               f"({(cmd.ts_ms - now) / 1000:+.0f} s from the gateway's clock)")
            if cmd.counter <= self.replay.floor(kid, now):
                raise CommandRejected("replay", f"command {quote(cmd.request_id)}: replayed "
                                                f"(counter {cmd.counter} is not above {self.replay.floor(kid, now)})")
            try:
                await self.save_counters(self.replay.accept(kid, cmd.counter))
            except OSError as exc:
                raise CommandRejected("storage", f"command {quote(cmd.request_id)}: refused: cannot record its counter "
                                                 f"against replay ({exc.strerror or exc})") from None
        except CommandRejected as exc:
            return self._reject(exc, tag, request_id)
        ok, message = self.execute(cmd)
        self.stats.accepted += 1
        log.info("command %s %s %s by %s (key %s): %s", quote(cmd.request_id), cmd.command, quote(cmd.rule), quote(cmd.by),
                 kid.hex(), message)
        return wire.encode_reply(cmd.request_id, ok, message, tag)

    def _reject(self, exc: CommandRejected, tag: bytes, request_id: str | None) -> bytes | None:
        self.stats.rejected[exc.reason] = self.stats.rejected.get(exc.reason, 0) + 1
        now = self.clock.monotonic()
        if now - self._window_start >= self.reject_window_s:
            if self._window_rejects > self.reject_burst:
                log.warning("%d more commands rejected without a reply in the last %.0f s (rate limit)",
                            self._window_rejects - self.reject_burst, now - self._window_start)
            self._window_start, self._window_rejects = now, 0
        self._window_rejects += 1
        if self._window_rejects > self.reject_burst:
            self.stats.unanswered += 1
            return None
        log.warning("command %s rejected (%s): %s", tag.hex(), exc.reason, exc)
        return wire.encode_reply(request_id, False, f"rejected ({exc.reason}): {exc}", tag)
