"""What each spool design writes to the card per reading, in real time, on the same workload: prints
figures, asserts nothing. The design comparison behind docs/design/spool.md.

Each design runs in a child process of its own for `--seconds` (the kernel counts `write_bytes` when a
page is first dirtied after it was last written back, so the clock matters: a faster-than-real loop
would fold many rewrites of one page into one). A poll round of `--registers` readings every
`--interval` s; the uplink seals the round and the broker acknowledges it at once (the connected case).
Every design survives `kill -9` of the writer (each round reaches the kernel before the next):

- log            the segment log (gateway/spool.py), fsync every 5 s and at once for events (the shipped defaults)
- log-window0    the segment log with power_cut_window_s = 0: fsync every write
- sqlite-full    the SQLite spool of the first releases: WAL, synchronous=FULL, a commit per round
- sqlite-normal  the same with synchronous=NORMAL (commits reach the WAL without fsync) and a
                 checkpoint every 5 s: SQLite with its flush grouped to the same power-cut window

    .venv/bin/python bench/spool_wear.py [--seconds 20] [--registers 100] [--interval 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DESIGNS = ("log", "log-window0", "sqlite-full", "sqlite-normal")
T0 = 1_764_390_000_000


def _write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def child(design: str, directory: Path, seconds: float, registers: int, interval: float) -> None:
    from gateway.model import PointInfo, Reading

    window = 0.0 if design == "log-window0" else 5.0
    catalogue = [PointInfo("dev", f"r{a}", "", "int16") for a in range(registers)]
    if design.startswith("log"):
        from gateway.spool import Spool

        spool = Spool(directory / "spool")
    else:
        from gateway.spool_sqlite import SqliteSpool

        spool = SqliteSpool(directory / "spool.db")
        if design == "sqlite-normal":
            spool.db.execute("PRAGMA synchronous=NORMAL")
    session = spool.start_session(catalogue, T0)
    start = _write_bytes()
    began = synced = time.monotonic()
    rounds = 0
    while (now := time.monotonic()) - began < seconds:
        ts = T0 + int((now - began) * 1000)
        spool.store([(session, [Reading(a, ts, (rounds + a) % 300) for a in range(registers)])], [])
        message = spool.seal(registers * 5, now_ms=ts, historical_after_ms=60_000, live=True)
        if message is not None:
            spool.delivered(message.id)
        rounds += 1
        if time.monotonic() - synced >= window:
            if design.startswith("log"):
                spool.sync()
            elif design == "sqlite-normal":
                spool.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            synced = time.monotonic()
        time.sleep(max(0.0, began + rounds * interval - time.monotonic()))
    spool.close()
    os.sync()
    print(f"{_write_bytes() - start} {rounds * registers}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--registers", type=int, default=100)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--workdir", type=Path, default=None, help="a directory on the real disk (default: under the repo)")
    ap.add_argument("--child", choices=DESIGNS, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.dir, args.seconds, args.registers, args.interval)
        return
    rate = args.registers / args.interval
    print(f"{rate:g} readings/s ({args.registers} per round every {args.interval:g} s), {args.seconds:g} s per design")
    print(f"{'design':<15} {'bytes written/reading':>22} {'readings':>9}")
    base = args.workdir or ROOT / "bench"
    for design in DESIGNS:
        with tempfile.TemporaryDirectory(prefix=".spool-wear-", dir=base) as d:
            out = subprocess.run([sys.executable, __file__, "--child", design, "--dir", d, "--seconds", str(args.seconds),
                                  "--registers", str(args.registers), "--interval", str(args.interval)],
                                 check=True, capture_output=True, text=True).stdout.split()
            written, readings = int(out[0]), int(out[1])
            print(f"{design:<15} {written / readings:>22.1f} {readings:>9}")


if __name__ == "__main__":
    main()
