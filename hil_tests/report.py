"""What a scenario tells the HIL report: its seed, the faults it applied (with times), its figures and
where its per-device logs are. A scenario takes the `hil_report` fixture (hil_tests/conftest.py) and fills
it in; the session plugin collects one ScenarioRecord per test into the JSON report.

This module is the contract between the scenarios and the report plugin; keep it small and stable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
