"""Firmware logic under real MicroPython (the WebAssembly port of MicroPython 1.27, pinned in
firmware/host/package.json), from the .py sources and from the mpy-cross output.

Each check script (firmware/host/checks/check_*.py) runs its test_* functions and exits with
the number of failures; the only fakes are the board's hardware (firmware/host/sim/simboard.py),
which has no real counterpart on a host.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.firmware_helpers import CHECKS, compile_firmware, run_micropython

CHECK_SCRIPTS = ["check_cbor.py", "check_ring.py", "check_rules.py", "check_config.py", "check_sensors.py", "check_mqtt_inbound.py"]


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mpy")
    compile_firmware(out)
    return out / "yujing_node"


@pytest.mark.parametrize("script", CHECK_SCRIPTS)
@pytest.mark.parametrize("form", ["py", "mpy"])
def test_check_script_passes_under_micropython(script: str, form: str, compiled: Path) -> None:
    kw = {"package": compiled} if form == "mpy" else {}
    proc = run_micropython(CHECKS / script, **kw)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"{script} ({form}) failed under MicroPython:\n{proc.stdout}\n{proc.stderr}"
    assert summary.endswith(" 0 failed") and not summary.startswith("0 passed"), summary


def test_mpy_tree_holds_only_compiled_modules(compiled: Path) -> None:
    files = sorted(p.name for p in compiled.rglob("*") if p.is_file())
    assert files and all(name.endswith(".mpy") for name in files), files


def test_the_harness_reports_failures(tmp_path: Path) -> None:
    """A failing check must fail the run (so a green run means something)."""
    script = tmp_path / "check_fails.py"
    script.write_text(
        "from check import eq, run\n"
        "from yujing_node.cbor import Writer\n"
        "def test_wrong_on_purpose():\n"
        "    w = Writer(8); w.int(24)\n"
        "    eq(bytes(w.view()), b'\\x18')\n"
        "def test_right():\n"
        "    pass\n"
        "run(globals())\n"
    )
    proc = run_micropython(script)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL test_wrong_on_purpose" in proc.stdout
    assert "1 passed, 1 failed" in proc.stdout


def test_it_really_is_micropython(tmp_path: Path) -> None:
    script = tmp_path / "impl.py"
    script.write_text("import sys\nprint(sys.implementation.name, sys.implementation.version[:2])\nimport machine\n")
    proc = run_micropython(script)
    assert proc.stdout.startswith("micropython (1, 27)"), proc.stdout
    assert proc.returncode == 1 and "ImportError" in proc.stderr, "no machine module on the host: hardware is simulated"
