"""A short seeded run of the fuzz harness (fuzz/run.py runs the long one): every untrusted-input path, no
crash. The same seeds replay the same inputs, so a failure here is reproducible with fuzz/run.py."""

from __future__ import annotations

import pytest

from fuzz.targets import TARGETS

SHORT = {"modbus.tcp": 300, "modbus.rtu": 200, "node.mqtt": 3000}


@pytest.mark.parametrize("target", list(TARGETS))
def test_no_crash_on_generated_and_mutated_inputs(target: str) -> None:
    if target == "node.mqtt":
        from tests.firmware_helpers import require_micropython

        require_micropython()
    report = TARGETS[target](SHORT.get(target, 1500), 20261202)
    assert report.inputs >= SHORT.get(target, 1500)
    assert report.crashes == 0, report.examples


def test_the_harness_counts_a_crash() -> None:
    """A target that raises an undocumented exception must be reported (so 0 crashes means something)."""
    from fuzz import targets

    def boom(data: bytes) -> None:
        if data[:1] == b"\xa5":
            raise KeyError("undocumented")

    report = targets._pure("probe", 200, 1, lambda rng: rng.choice((b"\xa5", b"\x00")), boom, (ValueError,))
    assert report.crashes > 0 and "KeyError" in report.examples[0]
