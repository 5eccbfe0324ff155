"""Errors raised by the alarm rule engine. Each one says where the problem is.

Configuration errors derive from `gateway.plugins.FieldError` (a ValueError carrying `path` and `reason`),
which `gateway.config` turns into `file:line: path: reason`.
"""

from __future__ import annotations

from ..plugins import FieldError


class RuleConfigError(FieldError):
    """A rule configuration is invalid. `path` names the field, e.g. `rules[3].levels[1].clear`."""


class RuleStateError(ValueError):
    """Saved alarm state cannot be read back (corrupt file, wrong shape). `where` names file and key."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


class UnknownRuleError(LookupError):
    """A command (e.g. an acknowledgement) names a rule the engine does not have."""

    def __init__(self, rule_id: str, known: list[str]) -> None:
        shown = ", ".join(known[:20]) + (", …" if len(known) > 20 else "")
        super().__init__(f"no alarm rule {rule_id!r}; known rules: {shown or '(none)'}")
        self.rule_id = rule_id
