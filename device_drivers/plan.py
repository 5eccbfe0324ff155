"""Request planning: coalesce a device's points into as few Modbus reads as its limits allow.

Points of one table that are contiguous, or separated by a gap of at most `max_gap` registers/bits,
share one read, up to `max_registers` (≤125) or `max_bits` (≤2000) per request. A device that
rejects coalesced reads is configured with `coalesce = false` and gets one read per point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .registers import PointSpec, Table

MODBUS_MAX_REGISTERS = 125
MODBUS_MAX_BITS = 2000


@dataclass(frozen=True, slots=True)
class Request:
    table: Table
    address: int
    count: int
    # (index of the point in the device's point list, offset of its first register in this request)
    members: tuple[tuple[int, int], ...]


def plan_requests(
    points: Sequence[PointSpec],
    *,
    coalesce: bool = True,
    max_gap: int = 0,
    max_registers: int = MODBUS_MAX_REGISTERS,
    max_bits: int = MODBUS_MAX_BITS,
) -> list[Request]:
    """Group points into requests. Deterministic: sorted by table, then address."""
    requests: list[Request] = []
    order = sorted(range(len(points)), key=lambda i: (points[i].table.value, points[i].address, i))
    start = end = 0
    table: Table | None = None
    members: list[int] = []

    def flush() -> None:
        if table is not None and members:
            requests.append(Request(table, start, end - start, tuple((i, points[i].address - start) for i in members)))

    for i in order:
        p = points[i]
        limit = max_bits if p.table.is_bits else max_registers
        joins = (
            coalesce
            and table is p.table
            and p.address - end <= max_gap
            and max(end, p.end) - start <= limit
        )
        if joins:
            end = max(end, p.end)
            members.append(i)
        else:
            flush()
            table, start, end, members = p.table, p.address, p.end, [i]
    flush()
    return requests
