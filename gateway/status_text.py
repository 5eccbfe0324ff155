"""`yujing status` in a terminal: the overview (gateway.status) as a few aligned blocks, colours on a tty."""

from __future__ import annotations

import time
from typing import Any

_COLOURS = {"blue": "34", "yellow": "33", "orange": "38;5;208", "red": "31", "online": "32", "degraded": "33", "offline": "31"}


def _ago(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "never"
    s = max(0, (now_ms - ms) / 1000)
    return f"{s:.0f} s ago" if s < 90 else f"{s / 60:.0f} min ago" if s < 5400 else f"{s / 3600:.1f} h ago"


def _bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def render(o: dict[str, Any], *, colour: bool = False) -> str:
    def paint(text: str, key: str) -> str:
        code = _COLOURS.get(key)
        return f"\033[{code}m{text}\033[0m" if colour and code else text

    now = o.get("now_ms") or int(time.time() * 1000)
    up, sp = o["uplink"], o["spool"]
    lines = [f"{o['site']} / {o['gateway']}  Yujing {o['software']}, session {o['session']}, up {(o.get('uptime_s') or 0) / 60:.0f} min",
             "uplink   " + (paint("connected", "online") if up.get("connected") else paint("down", "offline"))
             + f" {up.get('broker', '')}, last delivery {_ago(up.get('last_delivery_ms'), now)}",
             "spool    " + (f"{sp['backlog_readings']} readings and {sp['unsent_messages']} messages waiting, {_bytes(sp['bytes'])}; "
                            f"disk free {_bytes(sp['disk_free_bytes'])}" if sp.get("known") else f"unknown ({sp.get('reason', 'disk busy')})")]
    for name, why in (o.get("gateway_faults") or {}).items():
        lines.append(paint(f"FAULT    {name}: {why}", "red"))
    lines.append("")
    lines.append("alarms")
    if not o["alarms"]:
        lines.append("  (no alarm rules)")
    for a in o["alarms"]:
        level = a.get("level_name") or str(a["level"])  # as the site file and the log spell it
        flags = [f for f, on in (("latched", a["latched"]), ("acknowledged", a["acked"] and a["level"] > 0)) if on]
        if a["fault"]:
            flags.append(f"FAULT {a['fault_reason'] or ''}".strip())
        inputs = ", ".join(f"{i['point']}={i['value'] if i['value'] is not None else '—'}{(' ' + i['unit']) if i['unit'] else ''}"
                           for i in a["inputs"])
        since = f" since {_ago(a['since_ms'], now)}" if a["level"] and a["since_ms"] else ""
        lines.append(f"  {a['rule']:<28} {paint(f'{level:<10}', a['colour'])}{since} {' '.join(flags)}  {inputs}".rstrip())
    lines.append("")
    lines.append("devices")
    for d in o["devices"]:
        lines.append(f"  {d['name']} on {d['bus']}: {paint(d['state'], d['state'])}, last poll {_ago(d['last_poll_ms'], now)}")
        for p in d["points"]:
            bad = p["quality"] not in (None, "good")
            value = "—" if p["value"] is None else str(p["value"])
            quality = paint(p["quality"], "red") if bad else (p["quality"] or "—")
            lines.append(f"    {p['name']:<24} {value:>14} {p['unit'] or '':<8} {quality}")
    return "\n".join(lines)
