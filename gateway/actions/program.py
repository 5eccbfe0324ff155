"""Program action: run a command for each transition of the watched alarms — send an SMS through a modem
script, ring a PA system, write to a local panel. Event based, unlike the outputs: one run per transition,
in order, never retried (a notification sent twice is worse than a fault report).

The command is an argv list run without a shell. It gets the transition as one JSON object on stdin
(`Transition.as_dict()`: kind, rule, old_level, new_level as ints 0..4, ts_ms, values, message, by) and
YUJING_ACTION, YUJING_RULE, YUJING_TRANSITION and YUJING_LEVEL (the new level's name) in its environment.
It runs in its own process group; at `timeout_s` the whole group is killed. Its output (stdout and stderr,
first 4 KiB) is logged. A start failure, a non-zero exit or a timeout is an actuator fault.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar

from gateway.rules.levels import Transition, TransitionKind

from ._parse import Table
from .base import Context
from .common import ActionConfig, parse_common
from .errors import ActuatorError

KIND = "program"

SAMPLE = """\
[[actions]]
kind = "program"
name = "notify.sms"                 # unique; letters, digits and _ . -
description = "SMS the duty officer through the 4G modem"
# Every transition of a matching rule; `level` (optional) keeps only transitions whose old or new level
# is at least this one (so the clearing of an orange alarm is sent too).
when = { rules = ["*"], level = "III_YELLOW" }
command = ["/usr/local/bin/yujing-sms", "--to", "duty"]   # argv, no shell; the transition is JSON on stdin
# timeout_s = 10.0                  # the process group is killed after this long
# Transition kinds that run the program (default: all):
# kinds = ["raised", "escalated", "de_escalated", "cleared", "acknowledged", "fault", "fault_cleared"]
"""

OUTPUT_LIMIT = 4096  # bytes of a run's output kept for the log
_SHOWN = 400  # characters of output quoted in a fault message
_REAP_S = 2.0  # after the kill, how long to wait for the process and its output pipe

_log = logging.getLogger("yujing.actions")


@dataclass(frozen=True, kw_only=True)
class Config(ActionConfig):
    kind: ClassVar[str] = KIND
    command: tuple[str, ...]
    timeout_s: float = 10.0
    kinds: tuple[TransitionKind, ...] = tuple(TransitionKind)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: str) -> Config:
        """Build the typed config from one action table; raises ActionConfigError naming the bad field."""
        t = Table(raw, path)
        args = parse_common(t, KIND, output=False)
        command = t.strings("command", non_empty=True)
        timeout_s = t.number("timeout_s", 10.0, positive=True)
        names = t.strings("kinds", tuple(str(k) for k in TransitionKind), non_empty=True)
        known = [str(k) for k in TransitionKind]
        kinds = []
        for i, name in enumerate(names):
            if name not in known:
                raise t.error(f"kinds[{i}]", f"unknown transition kind {name!r}; known: {', '.join(known)}")
            kinds.append(TransitionKind(name))
        t.finish()
        return cls(**args, command=command, timeout_s=timeout_s, kinds=tuple(kinds))


class ProgramAction:
    def __init__(self, config: Config, ctx: Context) -> None:
        self.config = config
        self.target = f"program {shlex.join(config.command)}"
        self._clock = ctx.clock
        self._kinds = frozenset(config.kinds)
        self._level = config.when.level

    def wants(self, transition: Transition) -> bool:
        """Whether `transition` runs the program: a matching rule, a wanted kind, and (with when.level)
        an old or new level at least that high."""
        if transition.kind not in self._kinds or not self.config.when.matches(transition.rule):
            return False
        return self._level is None or max(transition.old_level, transition.new_level) >= self._level

    async def fire(self, transition: Transition) -> None:
        """Run the command once with `transition` as JSON on stdin; return when it exited 0. Raises
        ActuatorError when it cannot start, exits non-zero or outlives timeout_s (then its process group
        is killed). Cancelling the call kills the process group too."""
        c = self.config
        payload = json.dumps(transition.as_dict(), default=_json_default, ensure_ascii=False).encode()
        env = dict(os.environ, YUJING_ACTION=c.name, YUJING_RULE=transition.rule,
                   YUJING_TRANSITION=str(transition.kind), YUJING_LEVEL=transition.new_level.name)
        try:
            proc = await asyncio.create_subprocess_exec(
                *c.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, env=env,
            )
        except OSError as exc:
            raise ActuatorError(f"{self.target}: cannot start: {exc}") from exc
        started = self._clock.monotonic()
        output = bytearray()
        dropped = 0

        async def talk() -> int:
            nonlocal dropped
            stdin, stdout = proc.stdin, proc.stdout
            if stdin is not None:
                try:
                    stdin.write(payload)
                    await stdin.drain()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the program did not read its input: its business
                finally:
                    stdin.close()
            if stdout is not None:
                while chunk := await stdout.read(4096):
                    room = OUTPUT_LIMIT - len(output)
                    output.extend(chunk[:room])
                    dropped += max(0, len(chunk) - room)
            return await proc.wait()

        runner = asyncio.ensure_future(talk())
        sleeper = asyncio.ensure_future(self._clock.sleep(c.timeout_s))
        timed_out = False
        try:
            await asyncio.wait({runner, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            if not runner.done():
                timed_out = True
                _kill_group(proc)
                runner.cancel()
                await self._reap(proc, runner)
        took = self._clock.monotonic() - started
        text = output.decode("utf-8", errors="replace").strip()
        if dropped:
            text += f" … ({dropped} more bytes not shown)"
        shown = text if len(text) <= _SHOWN else "…" + text[-_SHOWN:]
        what = f"{transition.kind} {transition.rule} {transition.new_level.name}"
        if timed_out:
            raise ActuatorError(f"{self.target}: killed after timeout_s = {c.timeout_s:g} s ({what}); output: {shown or '(none)'}")
        error = runner.exception()
        if error is not None:
            raise ActuatorError(f"{self.target}: talking to the program failed: {error}") from error
        code = runner.result()
        if code != 0:
            raise ActuatorError(f"{self.target}: exited with status {code} after {took:.2f} s ({what}); output: {shown or '(none)'}")
        _log.info("action %s: %s exited 0 after %.2f s (%s)%s", c.name, self.target, took, what,
                  f"; output: {text}" if text else "")

    async def _reap(self, proc: asyncio.subprocess.Process, runner: asyncio.Future[int]) -> None:
        # asyncio's wait() also waits for the output pipe to close; a process that left the group (setsid)
        # and kept the pipe would hold us forever, so reaping gets a bounded grace.
        reap = asyncio.ensure_future(asyncio.gather(runner, proc.wait(), return_exceptions=True))
        grace = asyncio.ensure_future(self._clock.sleep(_REAP_S))
        try:
            await asyncio.wait({reap, grace}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            grace.cancel()
            if not reap.done():
                reap.cancel()
                _log.warning("action %s: %s was killed, but something it started still holds its output pipe "
                             "(pid %d); not waiting for it", self.config.name, self.target, proc.pid)

    def close(self) -> None:
        """Nothing held between runs."""


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the pid
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return str(value)
