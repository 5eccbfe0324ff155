"""The cost of the driver seam: CPU seconds per 1,000 readings of the real gateway (`yujing run`, its own
process) on bench/gateway_bench.py's ThingsBoard workload — 100 holding registers every 100 ms from a
pymodbus TCP server, QoS 1 to mosquitto — for this checkout and for an earlier one, run alternately
(A B A B …) so that a busy neighbour hurts both alike. Prints medians and their ratio; asserts nothing.

    git worktree add /tmp/pre-seam a767441       # the last commit before the seam (issue 8)
    .venv/bin/python bench/driver_seam.py --before /tmp/pre-seam [--repeats 5] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import run_gateway_scenario, start_mosquitto  # noqa: E402


def _commit(root: Path) -> str:
    return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "?"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the earlier commit")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    roots = {"before": args.before.resolve(), "after": ROOT}
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="yujing-seam-") as tmp:
        broker, port = start_mosquitto(Path(tmp))
        try:
            for i in range(args.repeats):
                for name in (("before", "after") if i % 2 == 0 else ("after", "before")):
                    own = Path(tmp) / name  # each checkout its own spool and state: their schemas differ
                    own.mkdir(exist_ok=True)
                    r = await run_gateway_scenario(own, port, 100, 0.1, 3, args.seconds, root=roots[name])
                    results[name].append(r)
                    print(f"  run {i + 1} {name:>6}: {r['cpu_s_per_1000']:.4f} CPU-s/1000, {r['readings_per_s']:.0f} readings/s, "
                          f"RSS {r['rss_mb']:.1f} MB", flush=True)
        finally:
            broker.terminate()
            broker.wait(5)
    med = {k: statistics.median(r["cpu_s_per_1000"] for r in v) for k, v in results.items()}
    rate = {k: statistics.median(r["readings_per_s"] for r in v) for k, v in results.items()}
    rss = {k: statistics.median(r["rss_mb"] for r in v) for k, v in results.items()}
    print(f"before ({_commit(roots['before'])}): median {med['before']:.4f} CPU-s per 1,000 readings, {rate['before']:.0f} readings/s, "
          f"RSS {rss['before']:.1f} MB")
    print(f"after  ({_commit(roots['after'])}): median {med['after']:.4f} CPU-s per 1,000 readings, {rate['after']:.0f} readings/s, "
          f"RSS {rss['after']:.1f} MB")
    print(f"ratio after/before: {med['after'] / med['before']:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
