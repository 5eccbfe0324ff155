"""A latency histogram a stage keeps for itself: counts by upper bound, their sum and their number.

Plain Python and no dependency, so a stage (a bus scheduler, the uplink) stays free of any metrics library:
`observe` is one bisect and three additions, and an exporter (gateway.metrics) reads the numbers when it is
scraped. Not thread-safe; a reader on another thread sees each number whole, if not all at the same instant.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

# Seconds. A Modbus TCP request on a LAN takes milliseconds, an RTU request at 9600 baud tens of
# milliseconds, a request that times out `timeout_s` (1 s by default) times its attempts.
TRANSACTION_BOUNDS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# Publish → PUBACK over a cellular link: tens to hundreds of milliseconds, seconds when it struggles.
PUBLISH_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(float(b) for b in bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last is above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # value <= bounds[i]: Prometheus's `le`
        self.sum += value
        self.count += 1

    def cumulative(self) -> tuple[list[tuple[float, int]], float]:
        """([(upper bound, observations at or below it) …, (inf, all)], sum), from one copy of the counts."""
        counts, total = list(self.counts), self.sum
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), counts):
            running += n
            out.append((bound, running))
        return out, total
