"""Reading one action table: the shared reader (`gateway.plugins.Table`), raising ActionConfigError."""

from __future__ import annotations

from gateway.plugins import MISSING as _MISSING  # noqa: F401 (kind modules use it for required keys)
from gateway.plugins import Table as _Table
from .errors import ActionConfigError


class Table(_Table):
    error_type = ActionConfigError
