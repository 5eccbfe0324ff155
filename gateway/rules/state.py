"""Where the alarm engine keeps its latched/active state across restarts.

The state is a small JSON-able dict (`AlarmEngine.export_state()`), saved after every level change or
acknowledgement, so a latched red survives a power cut or `kill -9`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ..storefiles import read_json, write_json_atomic
from .errors import RuleStateError


class StateStore(Protocol):
    def load(self) -> dict[str, Any]:
        """The last state saved, or {} when none was ever saved. Raises RuleStateError if it is unreadable."""
        ...

    def save(self, state: Mapping[str, Any]) -> None:
        """Persist `state`; when this returns, a crash does not lose it. Raises OSError on failure."""
        ...


class MemoryStateStore:
    """Keeps the state in memory (tests, or a gateway that must not write to its flash)."""

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        self.state: dict[str, Any] = json.loads(json.dumps(state)) if state else {}
        self.saves = 0

    def load(self) -> dict[str, Any]:
        """A copy of the last saved state, or {}."""
        return json.loads(json.dumps(self.state))

    def save(self, state: Mapping[str, Any]) -> None:
        """Keep a copy (round-tripped through JSON, as a file would)."""
        self.state = json.loads(json.dumps(state))
        self.saves += 1


class FileStateStore:
    """A JSON file replaced atomically (0600): write a temporary file beside it, fsync, rename, fsync the folder.

    A reader therefore sees either the old state or the new one, never a torn write.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any]:
        """The saved state, or {} if the file does not exist. Raises RuleStateError naming the file when
        it cannot be read or is not a JSON object (the caller decides whether to start fresh)."""
        try:
            state = read_json(self.path)
        except OSError as e:
            raise RuleStateError(str(self.path), f"cannot read alarm state: {e}") from e
        except ValueError as e:
            raise RuleStateError(str(self.path), f"alarm state is not valid JSON: {e}") from e
        if state is None:
            return {}
        if not isinstance(state, dict):
            raise RuleStateError(str(self.path), f"alarm state must be a JSON object, got {type(state).__name__}")
        return state

    def save(self, state: Mapping[str, Any]) -> None:
        """Write `state` durably and atomically. Raises OSError (e.g. disk full); the old file then stays."""
        write_json_atomic(self.path, state)
