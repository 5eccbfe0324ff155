"""The figures bench/firmware_bench.py reports, held to budgets: the heap must not grow from
cycle to cycle, one cycle's allocation stays small, and offline flash writes follow the ring's
block size (one write per full block, never one per reading), packed."""

from __future__ import annotations

import importlib.util
import math

from tests.firmware_helpers import ROOT

spec = importlib.util.spec_from_file_location("firmware_bench", ROOT / "bench" / "firmware_bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_heap_and_flash_figures() -> None:
    r = bench.measure(cycles=20)
    print(
        f"\n.mpy {r['mpy_total_bytes']} B; code heap {r['firmware_code_heap_bytes']} B; node objects "
        f"{r['node_objects_bytes']} B; per cycle {r['peak_cycle_alloc_bytes']} B; growth {r['resident_growth_bytes']} B; "
        f"offline flash/h {r['offline_hour_block_sync']['bytes']} B (sync=block), {r['offline_hour_cycle_sync']['bytes']} B (sync=cycle)"
    )
    assert r["resident_growth_bytes"] == 0, "the heap after collection grew from cycle to cycle"
    assert 0 < r["peak_cycle_alloc_bytes"] < 8 * 1024
    assert r["node_objects_bytes"] < 16 * 1024
    block = r["offline_hour_block_sync"]
    assert block["writes"] == block["readings"] // block["cap"], "one write per full block"
    assert block["writes"] <= r["formula_block_sync"]["writes"]
    assert block["bytes"] <= block["writes"] * block["block_bytes"]  # packed: never more than whole blocks
    assert block["bytes"] <= 20 * 1024, "an offline hour of the reference node programs at most 20 KB"
    cycle = r["offline_hour_cycle_sync"]
    assert block["writes"] < cycle["writes"] <= r["formula_cycle_sync"]["writes"]


def test_flash_formula() -> None:
    f = bench.flash_per_hour(points=6, period_s=10)
    assert f["writes"] == math.ceil(360 * 6 / 25) and f["bytes"] == f["writes"] * 512
    slow = bench.flash_per_hour(points=2, period_s=600)
    assert slow["writes"] == 1, "a slow node writes one block per hour at most"
