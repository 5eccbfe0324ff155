"""Reading one rule table: the shared reader (`gateway.plugins.Table`), raising RuleConfigError."""

from __future__ import annotations

from ..plugins import MISSING as _MISSING  # noqa: F401 (kind modules use it for required keys)
from ..plugins import Table as _Table
from .errors import RuleConfigError


class Table(_Table):
    error_type = RuleConfigError
