"""Run the fuzz targets and print, per target: inputs, crashes, slowest input and peak memory.

    .venv/bin/python fuzz/run.py                       # every target, 100,000 inputs each, seed 1
    .venv/bin/python fuzz/run.py --inputs 5000 --seed 7 commands wire.decode_data

Each target runs in a process of its own, so its peak memory is its own (resident set size; for
node.mqtt, the most MicroPython heap one poll() allocated). Exit status 1 when any target crashed. The goal: 0 crashes, and no input
slower than 10 ms. "slowest" is, for the pure targets, the 50 slowest inputs timed again (median of 5):
the cost of the input, not a garbage-collection pause or a busy neighbour that happened during it ("worst
seen" is that raw maximum). For the transports it is the raw time of a read that got an answer; reads that
ended in the protocol's own timeout are counted apart.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzz.targets import TARGETS, Report  # noqa: E402


def run_one(name: str, inputs: int, seed: int) -> Report:
    proc = subprocess.run([sys.executable, "-m", "fuzz.targets", name, str(inputs), str(seed)], capture_output=True,
                          text=True, cwd=ROOT, timeout=4 * 3600)
    try:
        fields = json.loads(proc.stdout.strip().splitlines()[-1])
        fields.pop("_times", None)
        return Report(**fields)
    except (ValueError, IndexError, TypeError):
        return Report(name, crashes=1, examples=[f"the target process failed (exit {proc.returncode}): {proc.stderr[-500:]}"])


def _memory(mb: float) -> str:
    return f"{mb:.1f}MB" if mb >= 1 else f"{mb * 1024:.1f}KB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="*", help=f"default: all ({', '.join(TARGETS)})")
    p.add_argument("--inputs", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    print(f"{'target':<22} {'inputs':>9} {'crashes':>7} {'timeouts':>8} {'slowest':>10} {'p99.9':>9} {'worst seen':>10} {'peak mem':>9} {'time':>7}")
    failed = False
    for name in names:
        r = run_one(name, args.inputs, args.seed)
        failed |= r.crashes > 0
        print(f"{r.target:<22} {r.inputs:>9,} {r.crashes:>7} {r.timeouts:>8,} {r.slowest_ms:>8.2f}ms {r.p999_ms:>7.2f}ms {r.observed_max_ms:>8.2f}ms "
              f"{_memory(r.peak_rss_mb):>9} {r.seconds:>6.0f}s", flush=True)
        for example in r.examples:
            print(f"    crash: {example}")
        if r.slowest_ms > 10:
            print(f"    slowest input: {r.slowest_input}")
    print(f"seed {args.seed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
