"""Run the whole suite as a few pytest sessions at once, then show each session's output in full.

The suite mostly waits — on brokers, timeouts, simulated links and boards: a serial run took 12 min 50 s of wall
time for 2 min 52 s of CPU — so on a 2-core CI machine three sessions side by side take about a third of the time
with little contention. Each session is an ordinary pytest run (its own broker, its own fixtures); the HIL
scenarios are one of them, so their report (test-artifacts/hil/) is whole. Exit status: the first non-zero one
(pytest's 5, "no tests collected", included), else 0.

    .venv/bin/python scripts/parallel_pytest.py            # what scripts/test.sh runs without arguments
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def groups(argv: list[str]) -> list[tuple[str, list[str]]]:
    """The HIL scenarios through their own command (JUnit XML, the JSON report and the summary table in
    test-artifacts/hil/), and tests/ split in two by file name (every test file in exactly one group)."""
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_*.py"))
    first = [f for f in files if Path(f).name < "test_p"]
    second = [f for f in files if Path(f).name >= "test_p"]
    pytest = [sys.executable, "-m", "pytest", *argv]
    return [("hil_tests", [sys.executable, "-m", "hil_tests", *argv]), ("tests a-o", pytest + first),
            ("tests p-z", pytest + second)]


def main(argv: list[str]) -> int:
    logs = ROOT / "test-artifacts" / "ci"
    logs.mkdir(parents=True, exist_ok=True)
    running = []
    began = time.monotonic()
    for name, cmd in groups(argv):
        log = logs / (name.replace(" ", "-") + ".log")
        out = log.open("w")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        running.append((name, proc, log, out, time.monotonic()))
        print(f"started: {name} -> {log.relative_to(ROOT)}", flush=True)
    finished: dict[str, tuple[int, float]] = {}
    while len(finished) < len(running):
        for name, proc, _, out, t0 in running:
            if name not in finished and (code := proc.poll()) is not None:
                out.close()
                finished[name] = (code, time.monotonic() - t0)
                print(f"finished: {name}: exit {code} after {finished[name][1]:.0f} s", flush=True)
        time.sleep(0.5)
    results = [(name, *finished[name], log) for name, _, log, _, _ in running]
    status = 0
    for name, code, took, log in results:
        print(f"\n{'=' * 30} {name}: exit {code}, {took:.0f} s {'=' * 30}", flush=True)
        sys.stdout.write(log.read_text(errors="replace"))
        if code and not status:
            status = code
    print(f"\n{'=' * 30} summary ({time.monotonic() - began:.0f} s in all) {'=' * 30}")
    for name, code, took, log in results:
        last = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-1:] or ["(no output)"]
        print(f"{name:<10} exit {code}  {took:5.0f} s  {last[0]}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
