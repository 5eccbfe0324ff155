"""The HIL scenarios use the same real broker fixtures as the test suite."""

from __future__ import annotations

import pytest

from tests.conftest import mosquitto, private_mosquitto  # noqa: F401 (fixtures)

from .report import ScenarioRecord


@pytest.fixture
def hil_report(request: pytest.FixtureRequest) -> ScenarioRecord:
    """The scenario's record for the HIL report: set `.seed`, call `.fault(kind, t, **detail)`, fill `.figures`."""
    record = ScenarioRecord(request.node.nodeid)
    request.node.stash[RECORD_KEY] = record
    return record


RECORD_KEY = pytest.StashKey[ScenarioRecord]()
