"""The local alarm engine: every rule of a site, indexed by point, with restart-safe state.

    poll    ──► evaluate_poll() ─► per rule: its status points, then its value ─► combinations ──► [Transition]
    reading ──► evaluate() ──► (a poll of one reading)
    now_ms  ──► tick()     ──► every rule (windows, staleness, time delays)       ──► [Transition]
    operator ─► acknowledge()                                                     ──► [Transition]
                  └── after any level change or acknowledgement: store.save(export_state())

Synchronous and pure apart from the injected store. It never reads a clock: time comes from the reading
or from the caller. It runs on every reading whatever the state of the uplink.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from ..model import Reading, Value
from .combination import CombinationRule
from .combination import Config as CombinationConfig
from .common import CommonConfig, PointConfig
from .errors import RuleConfigError, RuleStateError, UnknownRuleError
from .levels import LEVEL_KINDS, LEVELS, AlarmState, Level, Transition, TransitionKind
from .registry import kind_of, order_rules
from .state import StateStore

_log = logging.getLogger(__name__)

STATE_VERSION = 1
WINDOW_SAVE_MS = 60_000  # rate and accumulation history reaches the state file at most once a minute
_PERSISTED = LEVEL_KINDS | {TransitionKind.ACKNOWLEDGED}


class Rule(Protocol):
    """What the engine needs from a rule object (PointRule and CombinationRule provide it)."""

    id: str
    points: tuple[int, ...]  # the catalogue points it reads (empty for a combination)

    def evaluate(self, reading: Reading) -> list[Transition]: ...

    @property
    def level(self) -> Level: ...

    @property
    def last_values(self) -> Mapping[int, Value]: ...

    def tick(self, now_ms: int) -> list[Transition]: ...

    def acknowledge(self, by: str, now_ms: int) -> list[Transition]: ...

    def state(self) -> AlarmState: ...

    def export(self) -> dict[str, Any]: ...


class AlarmEngine:
    """Evaluates a site's alarm rules. Not thread-safe: call it from one task."""

    def __init__(
        self,
        rules: Iterable[CommonConfig],
        resolve: Callable[[str], int],
        *,
        store: StateStore | None = None,
    ) -> None:
        """Build every rule. `resolve` maps a point name to its catalogue index (a dict's `__getitem__`
        will do) and raises KeyError for an unknown name. With a `store`, saved state is restored now.

        Raises RuleConfigError (naming the rule's field) for an unknown point, a duplicate id, a reference
        to a missing rule or a dependency cycle; RuleStateError when the saved state is unreadable.
        """
        configs = tuple(rules)
        self._rules: dict[str, Any] = {}
        by_point: dict[int, list[Any]] = {}
        combos: list[CombinationRule] = []
        for config in order_rules(configs):
            if isinstance(config, CombinationConfig):
                members = [self._rules[m] for m in config.rules]
                lift = self._rules[config.raise_rule] if config.raise_rule is not None else None
                rule: Any = CombinationRule(config, members, lift)
                combos.append(rule)
            elif isinstance(config, PointConfig):
                rule = kind_of(config).cls(config, resolve)
                for index in rule.points:
                    by_point.setdefault(index, []).append(rule)
            else:
                raise RuleConfigError(config.where(), f"{type(config).__name__} is not a rule config")
            self._rules[config.id] = rule
        # keep the configuration's order for snapshots and tick output
        self._rules = {c.id: self._rules[c.id] for c in configs}
        self._by_point: dict[int, tuple[Any, ...]] = {p: tuple(rs) for p, rs in by_point.items()}
        self._order = {rule_id: i for i, rule_id in enumerate(self._rules)}
        self._window_saved_ms: int | None = None
        self._window_changed = False
        self._combos: tuple[CombinationRule, ...] = tuple(combos)  # evaluation (dependency) order
        self._dependents = self._transitive_dependents()
        self._store = store
        self._dirty = False
        self.store_error: Exception | None = None  # the last failed save, until a save succeeds
        if store is not None:
            state = store.load()
            if state:
                self.restore_state(state)

    # -- inputs ---------------------------------------------------------------------------------------

    def evaluate(self, reading: Reading) -> list[Transition]:
        """Evaluate one reading (a poll of one); see evaluate_poll."""
        return self.evaluate_poll((reading,))

    def evaluate_poll(self, readings: Iterable[Reading]) -> list[Transition]:
        """Evaluate the readings of one poll together: every rule they touch sees its status points first
        and its own value after, whatever order the points (or devices) have in the site file, so a
        detector that reports 0 together with its fault bit is a fault, never a cleared alarm. Rules run
        in configuration order; then the combinations that read them.

        Returns the transitions in the order they happened; [] when no rule reads any of the points.
        """
        by_point = self._by_point
        touched: dict[str, tuple[Any, list[Reading], list[Reading]]] = {}
        newest = None
        for r in readings:
            rules = by_point.get(r.point)
            if rules is None:
                continue
            newest = r.ts_ms if newest is None or r.ts_ms > newest else newest
            for rule in rules:
                entry = touched.get(rule.id)
                if entry is None:
                    entry = touched[rule.id] = (rule, [], [])
                (entry[2] if r.point == rule.point else entry[1]).append(r)
        if not touched:
            return []
        out: list[Transition] = []
        entries = touched.values() if len(touched) == 1 else sorted(touched.values(), key=lambda e: self._order[e[0].id])
        for rule, statuses, own in entries:
            if own and rule.has_window:
                self._window_changed = True
            for r in statuses:
                produced = rule.evaluate(r)
                if produced:
                    out.extend(produced)
            for r in own:
                produced = rule.evaluate(r)
                if produced:
                    out.extend(produced)
        if out:
            self._propagate(out, newest)  # type: ignore[arg-type]
        return out

    def tick(self, now_ms: int) -> list[Transition]:
        """Advance time to `now_ms`: close or open time windows, flag stale inputs, run out on/off delays,
        and retry a failed state save. Call it regularly (e.g. every second)."""
        out: list[Transition] = []
        for rule in self._rules.values():
            if rule.points:
                out.extend(rule.tick(now_ms))
        for combo in self._combos:
            out.extend(combo.tick(now_ms))
        if self._window_changed and (self._window_saved_ms is None or now_ms - self._window_saved_ms >= WINDOW_SAVE_MS):
            self._window_saved_ms = now_ms
            self._window_changed = False
            self._dirty = True  # rate and accumulation history: saved once a minute, not on every reading
        self._persist(out)
        return out

    def shift_time(self, delta_ms: int, *, before_ms: int | None = None) -> None:
        """The wall clock stepped by `delta_ms` (gateway.clockcheck): every rule re-expresses the instants it
        remembers on the new clock, so delays, staleness, rates and rain windows measure real durations
        across the step, and readings stamped after a step back are not mistaken for old ones.

        `before_ms`: move only the instants earlier than this. When NTP first sets the clock of a gateway
        that booted at 1970, the instants stamped since boot move, while those restored from the state
        file (stamped before the reboot, on a set clock) stay where they are."""
        def move(ts: int) -> int:
            return ts + delta_ms if before_ms is None or ts < before_ms else ts

        for rule in self._rules.values():
            shift = getattr(rule, "move_times", None)  # a plugin's rule kind may predate clock steps
            if shift is not None:
                shift(move)
        if self._window_saved_ms is not None:
            self._window_saved_ms = move(self._window_saved_ms)

    def newest_time(self) -> int | None:
        """The latest instant any rule remembers (restored state included), or None."""
        seen: list[int] = []

        def note(ts: int) -> int:
            seen.append(ts)
            return ts

        for rule in self._rules.values():
            look = getattr(rule, "move_times", None)
            if look is not None:
                look(note)
        return max(seen, default=None)

    def save(self) -> None:
        """Save the state now (at a clean stop, so nothing since the last periodic save is lost)."""
        self._dirty = True
        self._persist([])

    def acknowledge(self, rule_id: str, by: str, now_ms: int) -> list[Transition]:
        """An operator acknowledges `rule_id`. Returns `acknowledged` (and the release of a latched level
        whose condition has cleared), or [] when there is nothing to acknowledge. Raises UnknownRuleError
        for an unknown rule and ValueError for an empty `by`."""
        rule = self._rules.get(rule_id)
        if rule is None:
            raise UnknownRuleError(rule_id, list(self._rules))
        if not isinstance(by, str) or not by.strip():
            raise ValueError(f"acknowledging {rule_id!r}: `by` must name who acknowledges, got {by!r}")
        out = rule.acknowledge(by, now_ms)
        if out:
            self._propagate(out, now_ms)
        return out

    # -- outputs --------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, AlarmState]:
        """The current state of every alarm, by rule id, in configuration order."""
        return {rule_id: rule.state() for rule_id, rule in self._rules.items()}

    def level(self, rule_id: str) -> Level:
        """The level `rule_id` shows now. Raises UnknownRuleError."""
        rule = self._rules.get(rule_id)
        if rule is None:
            raise UnknownRuleError(rule_id, list(self._rules))
        return rule.level

    @property
    def rule_ids(self) -> tuple[str, ...]:
        """Every rule id, in configuration order."""
        return tuple(self._rules)

    def rules_reading(self, points: Iterable[int]) -> tuple[str, ...]:
        """The rules that read any of these catalogue points, and the combinations built on them."""
        ids: dict[str, None] = {}
        for point in points:
            for rule in self._by_point.get(point, ()):
                ids[rule.id] = None
                for combo in self._dependents.get(rule.id, ()):
                    ids[combo] = None
        return tuple(ids)

    @property
    def points(self) -> frozenset[int]:
        """The catalogue indexes some rule reads."""
        return frozenset(self._by_point)

    def points_of(self, rule_id: str) -> tuple[int, ...]:
        """The catalogue indexes `rule_id` reads itself (a combination reads none: its rules do)."""
        return tuple(point for point, rules in self._by_point.items() if any(r.id == rule_id for r in rules))

    # -- restart-safe state ---------------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """A small JSON-able dict of what must survive a restart: per rule the shown level, the confirmed
        condition level, the acknowledgement and since when. Faults and partial delays are not kept."""
        rules = {}
        for rule_id, rule in self._rules.items():
            entry = rule.export()
            if entry["level"] or entry["active"] or entry.get("window"):
                rules[rule_id] = entry
        return {"version": STATE_VERSION, "rules": rules}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Take a dict from export_state(). Rules that no longer exist are skipped (with a log line);
        rules missing from it start at NONE. Raises RuleStateError naming the bad key."""
        if state.get("version") != STATE_VERSION:
            raise RuleStateError("state.version", f"expected {STATE_VERSION}, got {state.get('version')!r}")
        entries = state.get("rules")
        if not isinstance(entries, Mapping):
            raise RuleStateError("state.rules", "expected an object of rule id → state")
        parsed = {}
        for rule_id, entry in entries.items():
            where = f"state.rules[{rule_id!r}]"
            if not isinstance(entry, Mapping):
                raise RuleStateError(where, "expected an object")
            level = _level(entry.get("level"), f"{where}.level")
            active = _level(entry.get("active", entry.get("level")), f"{where}.active")
            acked = entry.get("acked", False)
            since = entry.get("since_ms")
            if not isinstance(acked, bool):
                raise RuleStateError(f"{where}.acked", f"expected true or false, got {acked!r}")
            if since is not None and (isinstance(since, bool) or not isinstance(since, int)):
                raise RuleStateError(f"{where}.since_ms", f"expected epoch ms or null, got {since!r}")
            window = entry.get("window")
            if window is not None and not isinstance(window, Mapping):
                raise RuleStateError(f"{where}.window", "expected an object")
            parsed[rule_id] = (level, active, acked, since, window)
        for rule_id, (level, active, acked, since, window) in parsed.items():
            rule = self._rules.get(rule_id)
            if rule is None:
                _log.warning("saved alarm state for rule %r ignored: no such rule in the configuration", rule_id)
                continue
            if window is not None and getattr(rule, "has_window", False):
                rule.restore_window(window, f"state.rules[{rule_id!r}].window")  # before the level: it may read it
            rule.core.restore(level, active, acked, since)

    # -- internals ------------------------------------------------------------------------------------

    def _propagate(self, out: list[Transition], now_ms: int) -> None:
        if self._combos:
            changed = {t.rule for t in out if t.kind in LEVEL_KINDS}
            if changed:
                due: set[str] = set()
                for rule_id in changed:
                    due.update(self._dependents.get(rule_id, ()))
                if due:
                    for combo in self._combos:
                        if combo.id in due:
                            out.extend(combo.update(now_ms))
        self._persist(out)

    def _persist(self, out: list[Transition]) -> None:
        if self._store is None:
            return
        if not self._dirty:
            for t in out:
                if t.kind in _PERSISTED:
                    self._dirty = True
                    break
        if not self._dirty:
            return
        try:
            self._store.save(self.export_state())
        except (OSError, RuleStateError) as e:
            # Never lose the transitions over a failed save: report, keep them, retry on the next tick.
            if self.store_error is None:
                _log.error("saving alarm state failed (will retry): %s", e)
            self.store_error = e
            return
        self._dirty = False
        self.store_error = None

    def _transitive_dependents(self) -> dict[str, frozenset[str]]:
        direct: dict[str, set[str]] = {}
        for combo in self._combos:
            for dep in combo.depends:
                direct.setdefault(dep, set()).add(combo.id)
        closure: dict[str, frozenset[str]] = {}
        for rule_id in self._rules:
            seen: set[str] = set()
            stack = list(direct.get(rule_id, ()))
            while stack:
                c = stack.pop()
                if c not in seen:
                    seen.add(c)
                    stack.extend(direct.get(c, ()))
            if seen:
                closure[rule_id] = frozenset(seen)
        return closure


def _level(value: object, where: str) -> Level:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 4:
        raise RuleStateError(where, f"expected a level 0–4, got {value!r}")
    return LEVELS[value]
