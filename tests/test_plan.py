"""Coalescing: as few requests as the device's limits allow, and never across tables."""

from __future__ import annotations

from device_drivers.plan import plan_requests
from device_drivers.registers import PointSpec, Table


def p(address: int, type_: str = "uint16", table: Table = Table.HOLDING) -> PointSpec:
    return PointSpec(name=f"p{address}", table=table, address=address, type=type_)


def test_contiguous_points_share_one_request() -> None:
    reqs = plan_requests([p(0), p(1, "uint32"), p(3)])
    assert [(r.address, r.count) for r in reqs] == [(0, 4)]
    assert sorted(j for j, _ in reqs[0].members) == [0, 1, 2]


def test_gap_fill_limit() -> None:
    points = [p(0), p(5), p(20)]
    assert [(r.address, r.count) for r in plan_requests(points, max_gap=4)] == [(0, 6), (20, 1)]
    assert [(r.address, r.count) for r in plan_requests(points, max_gap=0)] == [(0, 1), (5, 1), (20, 1)]
    assert [(r.address, r.count) for r in plan_requests(points, max_gap=20)] == [(0, 21)]


def test_request_size_limits() -> None:
    points = [p(i) for i in range(300)]
    reqs = plan_requests(points)
    assert [r.count for r in reqs] == [125, 125, 50]
    assert [r.count for r in plan_requests(points, max_registers=16)][:2] == [16, 16]
    bits = [p(i, "bool", Table.COIL) for i in range(2500)]
    assert [r.count for r in plan_requests(bits)] == [2000, 500]


def test_tables_never_mix_and_coalesce_off_reads_one_by_one() -> None:
    points = [p(0), p(1, table=Table.INPUT), p(1)]
    assert len(plan_requests(points)) == 2
    assert len(plan_requests([p(0), p(1), p(2)], coalesce=False)) == 3


def test_overlapping_views_of_one_register_share_the_read() -> None:
    reqs = plan_requests([p(1), p(1), p(0, "uint32")])
    assert [(r.address, r.count) for r in reqs] == [(0, 2)]
