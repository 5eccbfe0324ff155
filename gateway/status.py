"""The site at a glance: one JSON-able overview of a running gateway, for `yujing status` (through the
control socket), the local status page and its live updates.

Everything here reads what the stages already keep in memory on the event loop (device states, the newest
reading of each point, the alarm engine's states, the uplink's flags); the spool's figures come from the
storage thread with a deadline, so a stalled SD card shows as "unknown", never as a stalled event loop
(the pollers and the rules share that loop).

The trend of each numeric point is a bounded ring in memory (`Trends`): one sample per point per
`step_s` (the newest reading of that step), `samples` deep, in two flat arrays per point — a few KB a point,
fixed at start, whatever the site's rate.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from array import array
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from . import __version__
from .model import PointInfo, Reading, quality_name

SPOOL_DEADLINE_S = 0.5


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float, Decimal)):
        f = float(value)
        return f if math.isfinite(f) else None
    return None


def json_value(value: Any) -> Any:
    """A reading's value as JSON can carry it: Decimals as their exact text (a float would add noise)."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


class Trends:
    """Per point, the last `samples` steps of `step_s`: the step's time and the lowest and highest value read
    in it (a spike that crossed a threshold stays visible however short), numeric readings of good quality."""

    def __init__(self, points: int, *, samples: int = 240, step_s: float = 30.0) -> None:
        self.samples, self.step_s = samples, step_s
        self._t = [array("d", bytes(8 * samples)) for _ in range(points)]
        self._lo = [array("d", bytes(8 * samples)) for _ in range(points)]
        self._hi = [array("d", bytes(8 * samples)) for _ in range(points)]
        self._n = [0] * points  # steps written so far (the ring index is n % samples)
        self._step = [-1] * points  # the newest step

    def update(self, readings: Sequence[Reading]) -> None:
        step_s, samples = self.step_s, self.samples
        for r in readings:
            v = _number(r.value) if r.quality == 0 else None
            if v is None:
                continue
            p = r.point
            t = r.ts_ms / 1000.0
            step = int(t // step_s)
            n = self._n[p]
            if step == self._step[p] and n:
                i = (n - 1) % samples
                lo, hi = self._lo[p], self._hi[p]
                if v < lo[i]:
                    lo[i] = v
                if v > hi[i]:
                    hi[i] = v
            else:
                i = n % samples
                self._n[p] = n + 1
                self._step[p] = step
                self._lo[p][i] = self._hi[p][i] = v
            self._t[p][i] = t

    def series(self, point: int) -> list[tuple[float, float, float]]:
        """Oldest first: (time of the step's newest reading, lowest, highest)."""
        n = self._n[point]
        count = min(n, self.samples)
        t, lo, hi = self._t[point], self._lo[point], self._hi[point]
        return [(t[i % self.samples], lo[i % self.samples], hi[i % self.samples]) for i in range(n - count, n)]


def devices(gw: Any) -> list[dict[str, Any]]:
    latest = gw.latest.readings if gw.latest is not None else None
    catalogue: Sequence[PointInfo] = gw.config.catalogue
    out = []
    for scheduler in gw.schedulers:
        for poller in scheduler.pollers:
            d = poller.config
            points = []
            for i in range(poller.base, poller.base + len(d.points)):
                info = catalogue[i]
                r = latest[i] if latest is not None else None
                points.append({
                    "index": i, "name": info.name, "unit": info.unit, "type": info.type,
                    "value": json_value(r.value) if r is not None else None,
                    "quality": quality_name(r.quality) if r is not None else None,
                    "ts_ms": r.ts_ms if r is not None else None,
                })
            out.append({"name": d.name, "bus": scheduler.bus.name, "state": poller.state.value, "polls": poller.polls,
                        "last_poll_ms": poller.last_poll_ms, "points": points})
    return out


def alarms(gw: Any) -> list[dict[str, Any]]:
    if gw.desk is None:
        return []
    engine = gw.desk.engine
    latest = gw.latest.readings if gw.latest is not None else None
    catalogue = gw.config.catalogue
    out = []
    for state in engine.snapshot().values():
        entry = state.as_dict()
        entry["level_name"] = state.level.name
        entry["inputs"] = [
            {"point": f"{catalogue[i].device}.{catalogue[i].name}", "unit": catalogue[i].unit,
             "value": json_value(latest[i].value) if latest is not None and latest[i] is not None else None}
            for i in engine.points_of(state.rule)]
        out.append(entry)
    return out


async def spool(gw: Any) -> dict[str, Any]:
    storage = gw.storage
    if storage is None:
        return {"known": False}

    def figures(s: Any) -> dict[str, Any]:
        try:
            fs = os.statvfs(s.path)
            free = fs.f_bavail * fs.f_frsize
        except OSError:
            free = None
        waiting = s.summary()
        return {"known": True, "backlog_readings": waiting["readings"], "unsent_messages": waiting["messages"],
                "events_waiting": waiting["events"], "oldest_unsent_ms": waiting["oldest_ms"], "bytes": waiting["bytes"],
                "max_bytes": s.max_bytes, "dropped": s.dropped, "disk_free_bytes": free}

    try:  # query, not call: a probe never replaces a spool it finds damaged (the uplink's calls do that)
        return await asyncio.wait_for(asyncio.wrap_future(storage.query(figures)), SPOOL_DEADLINE_S)
    except Exception as exc:  # a busy or failing disk: say so, never wait for it
        return {"known": False, "reason": f"{type(exc).__name__}: {exc}"[:200] if str(exc) else "the disk is busy"}


def uplink(gw: Any) -> dict[str, Any]:
    u = gw.uplink
    if u is None:
        return {"connected": False}
    return {"connected": bool(u.connected), "broker": f"{u.cfg.host}:{u.cfg.port}", "down_since_ms": u.down_since_ms,
            "last_delivery_ms": u.last_acked_ms, "delivered": u.acked, "refused": getattr(u, "rejected", 0)}


async def overview(gw: Any) -> dict[str, Any]:
    """Everything the status page and `yujing status` show, as one JSON-able dict."""
    cfg = gw.config
    return {
        "site": cfg.site.id, "gateway": cfg.site.gateway, "software": __version__, "session": gw.session,
        "uptime_s": round(time.monotonic() - gw.started_monotonic, 1),
        "now_ms": gw.clock.time_ms(), "readings": gw.readings,
        "devices": devices(gw), "alarms": alarms(gw),
        "gateway_faults": dict(gw.health.faults) if gw.health is not None else {},
        "uplink": uplink(gw), "spool": await spool(gw),
    }
