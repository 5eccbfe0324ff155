"""Errors raised by the alarm rule engine. Each one says where the problem is.

These should become subclasses of `gateway.errors.ConfigError` once that module exists (style anchor 7);
until then they derive from the built-in exception a caller would expect.
"""

from __future__ import annotations


class RuleConfigError(ValueError):
    """A rule configuration is invalid. `path` names the field, e.g. `rules[3].levels[1].clear`."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


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
