"""The state machine every rule shares: on/off delays, latching, acknowledgement and the fault flag.

A kind module computes a *condition level* from its input (with its own hysteresis) and feeds it here with
`observe`. This class turns condition levels into confirmed levels and transitions. It never reads a clock:
every method takes the time from its caller.

Per level k (1…4) it tracks since when, and for how many observations, the condition has been ≥ k
("up") or < k ("down"). A level is entered once its up-run has lasted `on_delay` (time and count), and left
once its down-run has lasted `off_delay`. Escalating through several levels at once is one transition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..model import Value
from .levels import LEVELS, Level, Transition, TransitionKind, level_change_kind

Describe = Callable[[Level], str]
_NO_VALUES: Mapping[int, Value] = {}


class AlarmCore:
    __slots__ = (
        "rule_id",
        "latch",
        "level",
        "active",
        "acked",
        "since_ms",
        "fault_reason",
        "fault_since_ms",
        "_on_ms",
        "_on_n",
        "_off_ms",
        "_off_n",
        "_up_since",
        "_up_n",
        "_down_since",
        "_down_n",
    )

    def __init__(
        self,
        rule_id: str,
        *,
        latch: bool = False,
        on_delay_s: float = 0.0,
        on_delay_count: int = 1,
        off_delay_s: float = 0.0,
        off_delay_count: int = 1,
    ) -> None:
        self.rule_id = rule_id
        self.latch = latch
        self.level: Level = Level.NONE  # what the alarm shows
        self.active: Level = Level.NONE  # the confirmed condition level
        self.acked = False
        self.since_ms: int | None = None
        self.fault_reason: str | None = None
        self.fault_since_ms: int | None = None
        self._on_ms = round(on_delay_s * 1000)
        self._on_n = on_delay_count
        self._off_ms = round(off_delay_s * 1000)
        self._off_n = off_delay_count
        self._up_since: list[int | None] = [None] * 5
        self._up_n = [0] * 5
        self._down_since: list[int | None] = [None] * 5
        self._down_n = [0] * 5

    @property
    def fault(self) -> bool:
        """Whether the input is currently untrustworthy."""
        return self.fault_reason is not None

    @property
    def latched(self) -> bool:
        """Whether the shown level is held above the condition, waiting for an acknowledgement."""
        return self.level > self.active

    # -- condition input ------------------------------------------------------------------------------

    def observe(self, cond: int, ts_ms: int, values: Mapping[int, Value], describe: Describe) -> list[Transition]:
        """Record one observation of the condition level and return the transitions it confirms."""
        up_since, up_n, down_since, down_n = self._up_since, self._up_n, self._down_since, self._down_n
        for k in (1, 2, 3, 4):
            if cond >= k:
                if up_since[k] is None:
                    up_since[k] = ts_ms
                    up_n[k] = 0
                up_n[k] += 1
                down_since[k] = None
            else:
                if down_since[k] is None:
                    down_since[k] = ts_ms
                    down_n[k] = 0
                down_n[k] += 1
                up_since[k] = None
        return self.settle(ts_ms, values, describe)

    def settle(self, now_ms: int, values: Mapping[int, Value], describe: Describe) -> list[Transition]:
        """Confirm any level whose on- or off-delay has run out by `now_ms` (no new observation)."""
        active = self.active
        target = active
        for k in range(4, active, -1):
            since = self._up_since[k]
            if since is not None and now_ms - since >= self._on_ms and self._up_n[k] >= self._on_n:
                target = k
                break
        if target == active:
            while target > 0:
                since = self._down_since[target]
                if since is not None and now_ms - since >= self._off_ms and self._down_n[target] >= self._off_n:
                    target -= 1
                else:
                    break
        if target == active:
            return []
        return self._confirm(LEVELS[target], now_ms, values, describe)

    def move_times(self, move: Callable[[int], int]) -> None:
        """The wall clock stepped: re-express every remembered instant on the new clock (`move`), so a running
        on- or off-delay lasts its real duration (AlarmEngine.shift_time)."""
        if self.since_ms is not None:
            self.since_ms = move(self.since_ms)
        if self.fault_since_ms is not None:
            self.fault_since_ms = move(self.fault_since_ms)
        for marks in (self._up_since, self._down_since):
            for k, since in enumerate(marks):
                if since is not None:
                    marks[k] = move(since)

    def reset_delays(self) -> None:
        """Forget partly elapsed delays (after a fault, or when the rule's window closes)."""
        for k in (1, 2, 3, 4):
            self._up_since[k] = None
            self._down_since[k] = None
            self._up_n[k] = 0
            self._down_n[k] = 0

    def force_clear(self, ts_ms: int, values: Mapping[int, Value], reason: str) -> list[Transition]:
        """Drop the condition to NONE now, without off-delay (the rule's time window closed).

        A latched, unacknowledged alarm still shows its level until acknowledged.
        """
        self.reset_delays()
        if self.active == Level.NONE:
            return []
        return self._confirm(Level.NONE, ts_ms, values, lambda _level: reason)

    def _confirm(self, new_active: Level, ts_ms: int, values: Mapping[int, Value], describe: Describe) -> list[Transition]:
        old = self.level
        self.active = new_active
        if new_active > old:
            new = new_active
            self.acked = False
        elif self.latch and not self.acked:
            new = old  # held until acknowledged
        else:
            new = new_active
        if new == old:
            return []
        return [self._change(old, new, ts_ms, values, describe(new))]

    def _change(
        self, old: Level, new: Level, ts_ms: int, values: Mapping[int, Value], detail: str, by: str | None = None
    ) -> Transition:
        self.level = new
        self.since_ms = ts_ms
        if new == Level.NONE:
            self.acked = False
        kind = level_change_kind(old, new)
        return Transition(kind, self.rule_id, old, new, ts_ms, values, f"{self.rule_id} {kind} {old.name} → {new.name}: {detail}", by)

    # -- faults ---------------------------------------------------------------------------------------

    def set_fault(self, reason: str, ts_ms: int, values: Mapping[int, Value]) -> list[Transition]:
        """Mark the input untrustworthy. The level stays as it is; partly elapsed delays are forgotten."""
        self.reset_delays()
        if self.fault_reason is not None:
            return []
        self.fault_reason = reason
        self.fault_since_ms = ts_ms
        level = self.level
        # A fault keeps an alarm's level; worth saying only when there is one (not "kept at NONE").
        kept = f" (level kept at {level.name})" if level != Level.NONE else ""
        return [
            Transition(
                TransitionKind.FAULT, self.rule_id, level, level, ts_ms, values,
                f"{self.rule_id} fault{kept}: {reason}",
            )
        ]

    def clear_fault(self, ts_ms: int, values: Mapping[int, Value]) -> list[Transition]:
        """The input is trustworthy again."""
        if self.fault_reason is None:
            return []
        reason = self.fault_reason
        self.fault_reason = None
        self.fault_since_ms = None
        level = self.level
        return [
            Transition(
                TransitionKind.FAULT_CLEARED, self.rule_id, level, level, ts_ms, values,
                f"{self.rule_id} fault cleared (was: {reason})",
            )
        ]

    # -- operator -------------------------------------------------------------------------------------

    def acknowledge(self, by: str, now_ms: int, values: Mapping[int, Value] = _NO_VALUES) -> list[Transition]:
        """Acknowledge the current level. Returns [] when there is nothing to acknowledge (NONE, or
        already acknowledged). A latched alarm whose condition has dropped is released to the condition's
        level at once; one whose condition still holds follows the condition down when it clears."""
        level = self.level
        if level == Level.NONE or self.acked:
            return []
        self.acked = True
        out = [
            Transition(
                TransitionKind.ACKNOWLEDGED, self.rule_id, level, level, now_ms, values,
                f"{self.rule_id} acknowledged at {level.name} by {by}", by,
            )
        ]
        if self.active < level:
            out.append(self._change(level, self.active, now_ms, values, f"released by {by}'s acknowledgement", by))
        return out

    # -- persistence ----------------------------------------------------------------------------------

    def export(self) -> dict[str, Any]:
        """The JSON-able state that must survive a restart (see restore)."""
        return {"level": int(self.level), "active": int(self.active), "acked": self.acked, "since_ms": self.since_ms}

    def restore(self, level: Level, active: Level, acked: bool, since_ms: int | None) -> None:
        """Take saved state. Without a latch the condition is assumed to hold at the saved level, so a
        condition that cleared while the gateway was down is reported as cleared by the next readings."""
        if not self.latch or active > level:
            active = level
        self.level = level
        self.active = active
        self.acked = acked and level != Level.NONE
        self.since_ms = since_ms
        self.reset_delays()
