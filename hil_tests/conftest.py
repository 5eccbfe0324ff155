"""The HIL scenarios use the same real broker fixtures as the test suite, and the HIL plugin (hil_tests/plugin.py):
--target, @pytest.mark.needs(...), the bench lock, one rerun of a failed scenario and the report."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import mosquitto, private_mosquitto  # noqa: F401 (fixtures)

from .rig import Rig, rig
from .targets import Target

# An initial conftest (pytest's testpaths name hil_tests/, and so does any path under it), so this may load a plugin.
# The plugin brings the fixtures `hil_report` (the scenario's record for the report) and `hil_target`.
pytest_plugins = ["hil_tests.plugin"]


@pytest.fixture
async def hil_rig(hil_target: Target, mosquitto, tmp_path: Path,  # noqa: F811
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    """The devices under test: the simulated rig, or the bench's site file with its uplink on the test broker.
    Built in a fixture so that a rig that cannot be built (no pty, a port taken) is an infra error, not a failure."""
    site = hil_target.bench.site if hil_target.bench is not None else None
    if site is None:
        monkeypatch.delenv("YUJING_HIL_SITE", raising=False)  # --target sim wins over the environment
    async with rig(mosquitto.port, tmp_path, site) as r:
        yield r
