"""What a scenario tells the HIL report: its seed, the faults it applied (with times), its figures and
where its per-device logs are. A scenario takes the `hil_report` fixture (hil_tests/plugin.py) and fills
it in; the session plugin (hil_tests/plugin.py) collects one ScenarioRecord per test into the JSON report.

This module is the contract between the scenarios and the report plugin; keep it small and stable.

Figures are free-form (JSON-able), but the summary table of `python -m hil_tests` shows these when present:
`lost`, `duplicates`, `latency_p50_s`, `latency_p99_s`, `recovery_s` (the worst, if there were several faults).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts" / "hil"
DEFAULT_SEED = 20261202


def seed() -> int:
    """The scenario's seed: YUJING_HIL_SEED (`python -m hil_tests --seed`), else the default."""
    return int(os.environ.get("YUJING_HIL_SEED", DEFAULT_SEED))


class InfraError(RuntimeError):
    """The rig could not be built (a pty, a broker, a port): the scenario did not run, it did not fail. Raise it
    (or let `ScenarioRecord.infrastructure()` turn an exception into it) and the report says "infra"."""


@dataclass
class FaultRecord:
    kind: str  # the fault class, e.g. "rs485.flip", "net.half_open", "power.kill9", "clock.step"
    t: float  # seconds since the scenario began
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScenarioRecord:
    nodeid: str
    seed: int | None = None
    faults: list[FaultRecord] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)  # device name -> log file path
    started: float = field(default_factory=time.monotonic)

    def fault(self, kind: str, t: float | None = None, **detail: Any) -> None:
        """Record a fault as applied; `t` defaults to now (seconds since the scenario began)."""
        self.faults.append(FaultRecord(kind, time.monotonic() - self.started if t is None else t, detail))

    def log(self, device: str, path: Path | str) -> None:
        self.logs[device] = str(path)

    def log_path(self, device: str) -> Path:
        """A file for this device's log under test-artifacts/hil/logs/<scenario>/ (kept after the run), recorded."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.nodeid.split("/")[-1]).strip("_")
        path = ARTIFACTS / "logs" / safe / f"{device}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.log(device, path)
        return path

    @contextlib.contextmanager
    def infrastructure(self) -> Iterator[None]:
        """`with hil_report.infrastructure(): …build the rig…`: an exception in it is an InfraError."""
        try:
            yield
        except (InfraError, AssertionError):
            raise
        except Exception as exc:
            raise InfraError(f"{type(exc).__name__}: {exc}") from exc


RECORD_KEY = pytest.StashKey[ScenarioRecord]()  # where the hil_report fixture leaves the record on the test item
