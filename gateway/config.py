"""The site configuration: one TOML file, read and validated here and nowhere else.

Every problem is collected (not just the first) and reported as `file:line: key.path: what is wrong`,
so a technician fixes a broken file in one pass. Components receive typed, frozen config objects.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_drivers.base import Device
from device_drivers.fields import ID_HINT, ID_RE, NUMBER, Problem, Reader, non_negative, positive
from device_drivers.registry import kinds as driver_kinds

from .model import PointInfo
from .wire import DEFAULT_PREFIX

if TYPE_CHECKING:
    from .plugins import FieldError

log = logging.getLogger("yujing.config")

__all__ = ["BusConfig", "Config", "ConfigError", "DeviceConfig", "PollGroup", "Problem", "Season", "load", "parse"]


class ConfigError(Exception):
    """One or more problems in a configuration file; str() lists them all, one per line."""

    def __init__(self, file: str, problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [
            f"{self.file}:{p.line}: {p.path}: {p.message}" if p.line else f"{self.file}: {p.path}: {p.message}"
            for p in self.problems
        ]


# ---------------------------------------------------------------- typed configuration


@dataclass(frozen=True)
class SiteConfig:
    id: str
    gateway: str
    name: str = ""


@dataclass(frozen=True)
class UplinkConfig:
    host: str
    port: int
    protocol: str = "5"  # "5" or "3.1.1"
    topic_prefix: str = DEFAULT_PREFIX
    client_id: str = ""
    username: str | None = None
    password_file: Path | None = None
    tls: bool = True
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30
    batch_max: int = 500
    batch_delay_s: float = 0.005
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    drain_rate: float = 0.0  # backlog readings per second after an outage; 0: as fast as the broker takes
    # The platform's Ed25519 public keys (PEM) that may sign commands (several during a key rotation);
    # none: remote commands are refused. The private key never leaves the platform.
    command_public_key_files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class SpoolConfig:
    path: Path  # a directory: the segment log (gateway/spool.py)
    max_bytes: int = 256 * 1024 * 1024
    power_cut_window_s: float = 5.0


@dataclass(frozen=True)
class StatusConfig:
    """The local status page (gateway/web): where it listens, who may acknowledge from it."""

    host: str | None = "127.0.0.1"  # None: no status page
    port: int = 8780
    users_file: Path | None = None  # without it the page shows everything and acknowledges nothing
    trend_hours: float = 2.0
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None


@dataclass(frozen=True)
class BusConfig:
    name: str
    kind: str  # the bus `type`: which driver serves it ("tcp", "rtu", "serial_line", "sl651", …)
    settings: Any  # the driver's own bus settings
    pause_s: float = 0.0  # quiet time on the wire between two transactions
    index: int = 0  # position in the file, for messages


@dataclass(frozen=True)
class PollGroup:
    """Points of one device polled at their own interval (`[[devices.groups]]`)."""

    interval_s: float
    points: tuple[int, ...]  # indexes in the device's points


@dataclass(frozen=True)
class Season:
    """A yearly window (local time) in which a device is polled every `interval_s` (the flood season)."""

    window: Any  # gateway.rules.common.WindowConfig
    interval_s: float


@dataclass(frozen=True, kw_only=True)
class DeviceConfig(Device):
    interval_s: float
    retries: int = 1
    offline_after: int = 3  # consecutive failed polls before the device is offline
    backoff_max_s: float = 60.0  # longest wait between probes of an offline device
    groups: tuple[PollGroup, ...] = ()  # points with an interval of their own; the rest use interval_s
    alarm_interval_s: float | None = None  # poll this often while a rule on its points shows alarm_level or more
    alarm_level: int = 1
    season: Season | None = None
    index: int = 0  # position in the file, for messages

    @property
    def unit(self) -> int | None:
        """The device's bus address where its protocol has one (Modbus unit id)."""
        return getattr(self.spec, "unit", None)

    def poll_groups(self) -> tuple[PollGroup, ...]:
        """Every point once: the declared groups, then the rest at the device's interval."""
        grouped = {i for g in self.groups for i in g.points}
        rest = tuple(i for i in range(len(self.points)) if i not in grouped)
        return (*self.groups, *((PollGroup(self.interval_s, rest),) if rest else ()))


@dataclass(frozen=True)
class Config:
    path: Path
    site: SiteConfig
    uplink: UplinkConfig
    spool: SpoolConfig
    buses: tuple[BusConfig, ...]
    devices: tuple[DeviceConfig, ...]
    catalogue: tuple[PointInfo, ...] = field(default=())
    rules: tuple[Any, ...] = field(default=())  # gateway.rules configs, validated against the catalogue
    actions: tuple[Any, ...] = field(default=())  # gateway.actions configs
    uplinks: tuple[Any, ...] = field(default=())  # gateway.uplink kinds beside the platform's ([[uplinks]])
    status: StatusConfig = field(default_factory=StatusConfig)

    def point_index(self) -> dict[tuple[str, str], int]:
        return {(p.device, p.name): i for i, p in enumerate(self.catalogue)}

    def resolve_point(self, name: str) -> int:
        """`device.point` → catalogue index; KeyError naming the known points otherwise."""
        return _resolve_point(self.point_index(), self.catalogue, name)

    @property
    def state_dir(self) -> Path:
        """Where the gateway keeps its state: the spool, the latched alarms, the control socket."""
        return self.spool.path.parent


# ---------------------------------------------------------------- line numbers


class Locator:
    """Maps key paths (`devices[1].points[0].scale`) to line numbers in the TOML text.

    tomllib gives no positions; this follows table headers and `key =` lines, which covers the
    files this project documents. Keys inside inline tables fall back to the enclosing line.
    """

    _header = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
    _key = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        counters: dict[str, int] = {}
        current = ""
        for n, line in enumerate(text.splitlines(), start=1):
            if m := self._header.match(line):
                names = [part.strip().strip("\"'") for part in m.group(2).split(".")]
                is_array = m.group(1) == "[["
                path = ""
                for depth, name in enumerate(names):
                    base = f"{path}.{name}" if path else name
                    if depth == len(names) - 1 and is_array:
                        counters[base] = counters.get(base, -1) + 1
                        # a new array element restarts the counters of tables nested in it
                        for k in [k for k in counters if k.startswith(base + "[")]:
                            del counters[k]
                        path = f"{base}[{counters[base]}]"
                    elif base in counters:
                        path = f"{base}[{counters[base]}]"
                    else:
                        path = base
                current = path
                self.lines.setdefault(current, n)
            elif m := self._key.match(line):
                key = m.group(1).strip('"')
                self.lines.setdefault(f"{current}.{key}" if current else key, n)

    def line(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            if cut <= 0:
                return self.lines.get(path)
            path = path[:cut]
        return None


# ---------------------------------------------------------------- sections


def _site(r: Reader) -> SiteConfig | None:
    sid = r.get("id", str, check=ID_RE.match, hint="letters, digits, '_', '.', '-' (no '/', '+', '#')")
    gw = r.get("gateway", str, check=ID_RE.match, hint="letters, digits, '_', '.', '-' (no '/', '+', '#')")
    name = r.get("name", str, "")
    r.finish()
    return SiteConfig(sid, gw, name) if sid and gw else None


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _uplink(r: Reader, base: Path, site: SiteConfig | None) -> UplinkConfig | None:
    host = r.get("host", str)
    tls = r.get("tls", bool, True)
    port = r.get("port", int, 8883 if tls else 1883, check=lambda p: 0 < p < 65536, hint="1..65535")
    protocol = r.get("protocol", str, "5", check=lambda v: v in ("5", "3.1.1"), hint='"5" or "3.1.1"')
    prefix = r.get("topic_prefix", str, DEFAULT_PREFIX, check=lambda v: v and not any(c in v for c in "+#") and not v.endswith("/"), hint="no '+', '#' or trailing '/'")
    client_id = r.get("client_id", str, "")
    username = r.get("username", str, None)
    password_file = _resolve(base, r.get("password_file", str, None))
    ca = _resolve(base, r.get("ca_file", str, None))
    cert = _resolve(base, r.get("cert_file", str, None))
    key = _resolve(base, r.get("key_file", str, None))
    insecure = r.get("allow_plaintext", bool, False)
    keepalive = r.get("keepalive_s", int, 30, check=lambda v: 5 <= v <= 3600, hint="5..3600")
    batch_max = r.get("batch_max", int, 500, check=lambda v: 1 <= v <= 10000, hint="1..10000")
    batch_delay = r.get("batch_delay_s", NUMBER, 0.005, check=lambda v: 0 <= v <= 10, hint="0..10 seconds")
    bmin = r.get("backoff_min_s", NUMBER, 1.0, check=positive, hint="> 0")
    bmax = r.get("backoff_max_s", NUMBER, 60.0, check=positive, hint="> 0")
    drain_rate = r.get("drain_rate", NUMBER, 0, check=non_negative, hint="readings per second, 0 = as fast as the broker accepts")
    raw_keys = r.get("command_public_key_file", (str, list), None,
                     check=lambda v: isinstance(v, str) or (bool(v) and all(isinstance(x, str) for x in v)),
                     hint="a PEM file, or an array of them (key rotation)")
    key_paths = tuple(p for p in (_resolve(base, x) for x in ([raw_keys] if isinstance(raw_keys, str) else raw_keys or [])) if p)
    if "command_key_file" in r.table:
        r.table.pop("command_key_file")
        r.error("command_key_file", "shared HMAC command keys are retired (a stolen gateway could sign for all the others): "
                "give the platform's Ed25519 public key in command_public_key_file (make a pair with: yujing command-key new FILE)")
    if "password" in r.table:
        r.table.pop("password")
        r.error("password", "secrets are not written inline: put the password in a file (mode 0600) and name it in password_file")
    r.finish()
    if password_file is not None:
        _check_secret(r, "password_file", password_file)
        if username is None:
            r.error("password_file", "a password without a username is never sent: set username too")
    if key is not None:
        _check_secret(r, "key_file", key)
    for i, key_path in enumerate(key_paths):
        _check_public_key(r, "command_public_key_file" + (f"[{i}]" if isinstance(raw_keys, list) else ""), key_path)
    for name, path in (("ca_file", ca), ("cert_file", cert)):
        if path is not None and not path.is_file():
            r.error(name, f"{path} does not exist")
    if (cert is None) != (key is None):
        r.error("cert_file" if cert is None else "key_file", "cert_file and key_file go together")
    if host and not tls and not insecure and not _is_loopback(host):
        r.error("tls", f"TLS is off for {host}; credentials and alarms would cross the network in clear. Turn tls on, or set allow_plaintext = true")
    if bmin is not None and bmax is not None and bmin > bmax:
        r.error("backoff_min_s", f"{bmin} is more than backoff_max_s {bmax}")
    if host is None:
        return None
    if not client_id and site:
        client_id = f"yujing-{site.id}-{site.gateway}"
    return UplinkConfig(
        host=host, port=port, protocol=protocol, topic_prefix=prefix, client_id=client_id, username=username,
        password_file=password_file, tls=tls, ca_file=ca, cert_file=cert, key_file=key, keepalive_s=keepalive,
        batch_max=batch_max, batch_delay_s=float(batch_delay), backoff_min_s=float(bmin or 1.0), backoff_max_s=float(bmax or 60.0),
        drain_rate=float(drain_rate or 0), command_public_key_files=key_paths,
    )


def _check_public_key(r: Reader, name: str, path: Path) -> None:
    """A verification key must be an Ed25519 public key, and nobody but its owner may change it (whoever
    can replace it can command the gateway). Being readable is fine: it is public."""
    from .commands import KeyFileError, load_public_key

    mode = _regular_file(r, name, path)
    if mode is None:
        return
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        r.error(name, f"{path} can be changed by others (mode {stat.S_IMODE(mode):04o}); run: chmod 644 {path}")
        return
    try:
        load_public_key(path)
    except KeyFileError as exc:
        r.errors.append(Problem(r.key(name), str(exc)))


def _regular_file(r: Reader, name: str, path: Path) -> int | None:
    """The file's mode, or None after reporting why it cannot be used."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        r.error(name, f"cannot read {path}: {exc.strerror}")
        return None
    if not stat.S_ISREG(mode):
        r.error(name, f"{path} is not a file")
        return None
    return mode


def _check_secret(r: Reader, name: str, path: Path) -> None:
    from .storefiles import secret_file_problem

    problem = secret_file_problem(path)
    if problem is not None:
        r.error(name, problem)


def _status(r: Reader, base: Path) -> StatusConfig:
    listen = r.get("listen", str, "127.0.0.1:8780")
    host: str | None = None
    port = 0
    if listen is not None and listen.strip().lower() not in ("", "off"):
        h, sep, p = listen.rpartition(":")
        h = h.strip("[]")
        try:
            port = int(p)
            if not sep or not 0 <= port <= 65535:
                raise ValueError
            if h not in ("localhost", "*"):
                ipaddress.ip_address(h)
        except ValueError:
            r.error("listen", f"{listen!r}: expected ADDRESS:PORT, e.g. \"127.0.0.1:8780\" (this machine only), "
                              "\"192.168.1.10:8780\" (one LAN address), \"0.0.0.0:8780\" (every address), or \"off\"")
        else:
            host = "0.0.0.0" if h == "*" else h
    users = _resolve(base, r.get("users_file", str, None))
    if users is not None:
        if not users.is_file():
            r.error("users_file", f"{users} does not exist (make it with: yujing status-user {users} NAME)")
        else:
            _check_secret(r, "users_file", users)
    hours = r.get("trend_hours", NUMBER, 2.0, check=lambda v: 0.1 <= v <= 48, hint="0.1 .. 48 hours")
    cert = _resolve(base, r.get("tls_cert_file", str, None))
    key = _resolve(base, r.get("tls_key_file", str, None))
    if (cert is None) != (key is None):
        r.error("tls_cert_file" if cert is None else "tls_key_file", "tls_cert_file and tls_key_file go together")
    for name, path in (("tls_cert_file", cert), ("tls_key_file", key)):
        if path is not None and not path.is_file():
            r.error(name, f"{path} does not exist")
    if key is not None and key.is_file():
        _check_secret(r, "tls_key_file", key)
    if host is not None and users is not None and cert is None and not _is_loopback(host):
        log.warning("status page on %s without TLS: passwords for acknowledging cross the LAN in clear "
                    "(set tls_cert_file and tls_key_file)", host)
    r.finish()
    return StatusConfig(host, port, users, float(hours or 2.0), cert, key)


def _spool(r: Reader, base: Path) -> SpoolConfig:
    path = _resolve(base, r.get("path", str, "state/spool"))
    max_bytes = r.get("max_bytes", int, 256 * 1024 * 1024, check=lambda v: v >= 1024 * 1024, hint="at least 1048576 (1 MiB)")
    window = r.get("power_cut_window_s", NUMBER, 5.0, check=lambda v: 0 <= v <= 60, hint="0 (sync every write) .. 60 seconds")
    r.finish()
    return SpoolConfig(path or base / "state/spool", max_bytes, float(window))


def state_dir_problem(spool: Path) -> str | None:
    """Why this user could not create or write the state directory (the spool's parent) and the spool in it,
    or None. The gateway creates both at start; `yujing check` and `yujing run` ask first, so that a site file
    naming /var/lib/yujing fails the check for a user who may not write there, not the start with a traceback."""
    import pwd

    try:
        user = pwd.getpwuid(os.geteuid()).pw_name  # who the permissions apply to ($USER may be someone else's)
    except KeyError:
        user = f"uid {os.geteuid()}"
    state = spool.parent
    fix = f"run it as the gateway's user, give this user the directory (sudo install -d -o {user} -m 0700 {state}), or set [spool] path"
    where = state
    while True:  # the nearest part of the path that exists: the rest is created under it
        try:
            mode = where.stat().st_mode
            break
        except (FileNotFoundError, NotADirectoryError):
            if where.parent == where:
                return None
            where = where.parent
        except OSError as exc:
            return f"state directory {state}: cannot look at {where}: {exc.strerror}; {fix}"
    if not stat.S_ISDIR(mode):
        return f"state directory {state} cannot be created: {where} is a file, not a directory"
    if not os.access(where, os.W_OK | os.X_OK):
        made = "is not writable" if where == state else f"cannot be created: {where} is not writable"
        return f"state directory {state} {made} by user {user}; {fix}"
    if where == state and spool.is_dir() and not os.access(spool, os.W_OK | os.X_OK):
        return f"spool directory {spool} is not writable by user {user}; {fix}"
    return None  # (a file at the spool's path is the SQLite spool of an older release: the gateway carries it over)


def _bus(r: Reader, index: int) -> BusConfig | None:
    name = r.get("name", str, check=ID_RE.match, hint=ID_HINT)
    known = driver_kinds()
    kind = r.get("type", str, check=lambda v: v in known, hint=" or ".join(f'"{k}"' for k in known))
    pause = r.get("pause_s", NUMBER, 0.0, check=non_negative, hint="≥ 0")
    settings = known[kind].parse_bus(r, kind) if kind is not None else None
    r.finish()
    if name is None or settings is None or kind is None:
        return None
    return BusConfig(name, kind, settings, float(pause), index)


def _device(r: Reader, index: int, buses: dict[str, BusConfig]) -> DeviceConfig | None:
    scheduling = [k for k in ("retries", "backoff_max_s", "alarm_interval_s", "alarm_level", "groups", "season") if k in r.table]
    name = r.get("name", str, check=ID_RE.match, hint=ID_HINT)
    bus_name = r.get("bus", str)
    interval = r.get("interval_s", NUMBER, check=positive, hint="must be more than 0 seconds")
    retries = r.get("retries", int, 1, check=lambda v: 0 <= v <= 10, hint="0..10")
    offline_after = r.get("offline_after", int, 3, check=lambda v: v >= 1, hint="≥ 1")
    backoff_max = r.get("backoff_max_s", NUMBER, 60.0, check=positive, hint="> 0")
    alarm_interval = r.get("alarm_interval_s", NUMBER, None, check=positive, hint="> 0")
    alarm_level = r.get("alarm_level", str, "IV_BLUE")
    raw_groups = r.take("groups")
    raw_season = r.take("season")
    bus = buses.get(bus_name) if bus_name is not None else None
    if bus is None:  # without its bus, the protocol's keys cannot be read; say only what is wrong
        if bus_name is not None:
            known = ", ".join(sorted(buses)) or "none defined"
            r.error("bus", f"no bus named {bus_name!r} (buses: {known})")
        return None
    kind = driver_kinds()[bus.kind]
    parsed = kind.parse_device(r, bus)
    r.finish()
    # The scheduling keys are checked whatever the protocol keys said, so one mistake does not hide another.
    level = _level(r, "alarm_level", alarm_level)
    season = _season(r, raw_season) if raw_season is not None else None
    if "alarm_level" in scheduling and alarm_interval is None:
        r.error("alarm_level", "is the level from which alarm_interval_s applies: give alarm_interval_s too")
    if interval is not None:
        if alarm_interval is not None and alarm_interval >= interval:
            r.error("alarm_interval_s", f"{alarm_interval} s is not shorter than interval_s ({interval} s): an alarm would not poll faster")
        if season is not None and season.interval_s >= interval:
            r.error("season.interval_s", f"{season.interval_s:g} s is not shorter than interval_s ({interval} s): the season would not poll faster")
    if parsed is None or None in (name, interval):
        return None
    spec, points = parsed
    groups = _groups(r, raw_groups, points) if raw_groups is not None else ()
    device = DeviceConfig(
        name=name, bus=bus_name, points=points, spec=spec, interval_s=float(interval), retries=retries,
        offline_after=offline_after, backoff_max_s=float(backoff_max), groups=groups,
        alarm_interval_s=float(alarm_interval) if alarm_interval is not None else None, alarm_level=level, season=season, index=index,
    )
    count = getattr(kind.module, "requests_per_poll", None)
    if count is not None and count(device) == 0 and scheduling:
        # A device that talks by itself (a streaming instrument, a station) is never polled: these keys would
        # silently do nothing.
        for key in scheduling:
            r.error(key, f"{name!r} is never polled (it sends by itself), so {key} has no effect: remove it")
        return None
    return device


def _level(r: Reader, key: str, text: str | None) -> int:
    from .rules.levels import Level

    try:
        level = Level.parse(text or "IV_BLUE")
    except ValueError as exc:
        r.error(key, str(exc))
        return 1
    if level == Level.NONE:
        r.error(key, "NONE is not an alarm level here; use IV_BLUE (blue) or higher")
        return 1
    return int(level)


def _groups(r: Reader, raw: Any, points: tuple[Any, ...]) -> tuple[PollGroup, ...]:
    """`[[devices.groups]]`: points = ["a", "b"], interval_s = 1."""
    if not isinstance(raw, list):
        r.error("groups", "expected an array of tables ([[devices.groups]])")
        return ()
    index = {p.name: i for i, p in enumerate(points)}
    used: dict[str, int] = {}
    groups = []
    for k, table in enumerate(raw):
        g = Reader(table, r.key(f"groups[{k}]"), r.errors)
        interval = g.get("interval_s", NUMBER, check=positive, hint="> 0")
        names = g.get("points", list, check=lambda v: bool(v) and all(isinstance(x, str) for x in v), hint="names of this device's points")
        g.finish()
        if interval is None or names is None:
            continue
        members = []
        for n, point in enumerate(names):
            if point not in index:
                g.error(f"points[{n}]", f"no point {point!r} on this device (its points: {', '.join(index)})")
            elif point in used:
                g.error(f"points[{n}]", f"{point!r} is already in groups[{used[point]}]")
            else:
                used[point] = k
                members.append(index[point])
        if members:
            groups.append(PollGroup(float(interval), tuple(members)))
    return tuple(groups)


def _season(r: Reader, raw: Any) -> Season | None:
    """`season = { start = "06-01", end = "10-31", utc_offset = "+08:00", interval_s = 10 }`."""
    from .plugins import FieldError
    from .plugins import Table as KindTable
    from .rules.common import parse_window

    if not isinstance(raw, dict):
        r.error("season", "expected a table { start, end, utc_offset, interval_s }")
        return None
    rest = dict(raw)
    interval = rest.pop("interval_s", None)
    good_interval = not isinstance(interval, bool) and isinstance(interval, (int, float)) and interval > 0
    if not good_interval:
        r.error("season.interval_s", "required: the interval in the season, > 0 seconds")
    try:
        window = parse_window(KindTable(rest, r.key("season")))
    except FieldError as exc:
        r.errors.append(Problem(exc.path, exc.reason))
        return None
    return Season(window, float(interval)) if good_interval else None


# ---------------------------------------------------------------- whole file


def load(path: str | os.PathLike[str], *, writable_state: bool = False) -> Config:
    """Read and validate a site file. Raises ConfigError listing every problem found. `writable_state`: see parse."""
    path = Path(path)
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(shown, [Problem("(file)", f"cannot read: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(shown, [Problem("(file)", f"not UTF-8 text: {exc}")]) from exc
    return parse(text, shown, base=path.resolve().parent, writable_state=writable_state)


def parse(text: str, shown: str = "<config>", *, base: Path | None = None, writable_state: bool = False) -> Config:
    """Read and check a site file's text. Every problem in it is reported (ConfigError), not just the first:
    a broken device does not hide the rules, nor a broken rule the actions.

    `writable_state`: also check that this user can create and write the state directory (state_dir_problem).
    `yujing check` and `yujing run` ask for it; the file is valid without it (it may be checked on another
    machine, or as another user than the gateway's)."""
    base = base or Path.cwd()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(shown, [Problem("(syntax)", str(exc), int(m.group(1)) if m else None)]) from exc
    errors: list[Problem] = []
    top = Reader(doc, "", errors)
    site_table = top.get("site", dict)
    site = _site(Reader(site_table, "site", errors)) if site_table is not None else None
    uplink_table = top.get("uplink", dict)
    uplink = _uplink(Reader(uplink_table, "uplink", errors), base, site) if uplink_table is not None else None
    spool = _spool(Reader(top.get("spool", dict, {}), "spool", errors), base)
    if writable_state and (problem := state_dir_problem(spool.path)) is not None:
        errors.append(Problem("spool.path", problem))
    status = _status(Reader(top.get("status", dict, {}), "status", errors), base)

    buses: dict[str, BusConfig] = {}
    for i, t in enumerate(top.get("buses", list, [])):
        br = Reader(t, f"buses[{i}]", errors)
        bus = _bus(br, i) if br.ok else None
        if bus is None:
            continue
        if bus.name in buses:
            errors.append(Problem(f"buses[{i}].name", f"bus {bus.name!r} is already defined at buses[{buses[bus.name].index}]"))
            continue
        buses[bus.name] = bus
    _check_ports(list(buses.values()), errors)

    devices: list[DeviceConfig] = []
    names: dict[str, int] = {}
    raw_devices = top.get("devices", list, [])
    for i, t in enumerate(raw_devices):
        dr = Reader(t, f"devices[{i}]", errors)
        device = _device(dr, i, buses) if dr.ok else None
        if device is None:
            continue
        if device.name in names:
            errors.append(Problem(f"devices[{i}].name", f"device {device.name!r} is already defined at devices[{names[device.name]}]"))
            continue
        names[device.name] = i
        devices.append(device)
    for kind in {id(k): k for k in (driver_kinds()[b.kind] for b in buses.values())}.values():  # the types in use
        mine = [b for b in buses.values() if b.kind in kind.kinds]
        kind.check(mine, [(d.index, d) for d in devices if buses[d.bus].kind in kind.kinds], errors)
    if not raw_devices and isinstance(doc.get("devices", []), list):
        errors.append(Problem("devices", "no [[devices]]: a site needs at least one device to poll"))
    raw_rules = top.get("rules", list, [])
    raw_actions = top.get("actions", list, [])
    raw_uplinks = top.get("uplinks", list, [])
    top.finish()

    # Rules and actions are checked against what did parse, so one bad device does not hide them.
    catalogue = tuple(PointInfo(d.name, p.name, p.unit, p.type) for d in devices for p in d.points)
    index = {(p.device, p.name): i for i, p in enumerate(catalogue)}
    rules, declared = _rules(raw_rules, lambda name: _resolve_point(index, catalogue, name), errors)
    actions = _actions(raw_actions, buses, declared, errors)
    uplinks = _uplinks(raw_uplinks, lambda name: _resolve_point(index, catalogue, name), base, errors)
    if errors or site is None or uplink is None:
        locator = Locator(text)
        located = [Problem(p.path, p.message, locator.line(p.path)) for p in errors]
        raise ConfigError(shown, sorted(located, key=lambda p: p.line or 0))  # top to bottom, like the file
    return Config(Path(shown), site, uplink, spool, tuple(buses.values()), tuple(devices), catalogue, rules, actions, uplinks,
                  status)


def _resolve_point(index: dict[tuple[str, str], int], catalogue: tuple[PointInfo, ...], name: str) -> int:
    device, _, point = name.partition(".")
    if (device, point) not in index:
        example = f" (points are named device.point, e.g. {catalogue[0].device}.{catalogue[0].name})" if catalogue else ""
        raise KeyError(f"no point {name!r}{example}")
    return index[(device, point)]


def _rules(raw: list[Any], resolve: Any, errors: list[Problem]) -> tuple[tuple[Any, ...], list[str]]:
    """(the rules that are valid, the ids every rule table declares). Each rule's problems are reported."""
    from .rules import AlarmEngine, PointConfig, RuleConfigError, order_rules, parse_rule
    from .rules.registry import kind_of

    declared = [item["id"] for item in raw if isinstance(item, dict) and isinstance(item.get("id"), str)]
    good = []
    for i, item in enumerate(raw):
        c, clean = _kind_table(parse_rule, item, f"rules[{i}]", RuleConfigError, errors)
        if c is None:
            continue
        if isinstance(c, PointConfig):
            unknown = _unknown_points(c, resolve)  # every one, also of a rule read without its keys at fault
            errors.extend(unknown)
            if unknown or not clean:
                continue
            try:
                kind_of(c).cls(c, resolve)  # resolves every point name now, not at run time
            except RuleConfigError as exc:
                errors.append(Problem(exc.path or f"rules[{i}]", exc.reason))
                continue
        if clean:
            good.append(c)
    failed = set(declared) - {c.id for c in good}
    while True:  # ids, references, cycles: drop what is wrong and look again, so each problem is said once
        try:
            order_rules(good)
            break
        except RuleConfigError as exc:
            culprit = next((c for c in good if exc.path and exc.path.startswith(c.path)), None)
            if not any(f"{x!r}" in exc.reason for x in failed):  # not an echo of a rule already reported
                errors.append(Problem(exc.path or "rules", exc.reason))
            if culprit is None:
                return (), declared
            good.remove(culprit)
            failed.add(culprit.id)
    if failed:
        return (), declared
    AlarmEngine(good, resolve)
    return tuple(good), declared


def _actions(raw: list[Any], buses: dict[str, BusConfig], rule_ids: list[str], errors: list[Problem]) -> tuple[Any, ...]:
    from .actions import ActionConfigError
    from .actions.registry import check_actions, parse_action
    from .health import FAULT_RULE

    configs = []
    clean = True
    for i, item in enumerate(raw):
        c, ok = _kind_table(parse_action, item, f"actions[{i}]", ActionConfigError, errors)
        clean = clean and ok
        if c is not None:  # (read without its keys at fault: still checked against the site, never run)
            configs.append(c)
    ids = [*rule_ids, FAULT_RULE]  # an output may follow the gateway's own fault (a fault lamp)
    bus_kinds = {name: b.kind for name, b in buses.items()}
    while configs:  # drop what is wrong and look again, so every action's problem is said
        try:
            check_actions(configs, buses=bus_kinds, rule_ids=ids)
            break
        except ActionConfigError as exc:
            errors.append(Problem(exc.path or "actions", exc.reason))
            culprit = next((c for c in configs if exc.path and exc.path.startswith(c.path)), None)
            if culprit is None:
                return ()
            configs.remove(culprit)
    return tuple(configs) if clean and len(configs) == len(raw) else ()


def _uplinks(raw: list[Any], resolve: Any, base: Path, errors: list[Problem]) -> tuple[Any, ...]:
    """`[[uplinks]]`: each table by its kind (gateway/uplink/<kind>.py), checked against the site's points.
    A kind whose config names files gets them resolved against the site file's directory (`with_base`)."""
    from .plugins import FieldError, parse_kind_table
    from .uplink.base import kinds

    configs = []
    names: dict[str, int] = {}
    clean = True
    for i, item in enumerate(raw):
        c, ok = _kind_table(lambda t, path: parse_kind_table(t, path, kinds(), "uplink", FieldError), item, f"uplinks[{i}]",
                            FieldError, errors)
        clean = clean and ok
        if c is None:
            continue
        if not ID_RE.match(c.name):
            errors.append(Problem(f"uplinks[{i}].name", f"{c.name!r}: {ID_HINT}"))
            continue
        if c.name in names:
            errors.append(Problem(f"uplinks[{i}].name", f"uplink {c.name!r} is already uplinks[{names[c.name]}]"))
            continue
        if hasattr(c, "with_base"):
            c = c.with_base(base)
        names[c.name] = i
        problems = c.check(resolve) if hasattr(c, "check") else []
        errors.extend(Problem(path, message) for path, message in problems)
        if not problems:
            configs.append(c)
    return tuple(configs) if clean and len(configs) == len(raw) else ()


def _kind_table(parse: Callable[[Any, str], Any], item: Any, path: str, error_type: type[FieldError],
                errors: list[Problem]) -> tuple[Any, bool]:
    """One rule, action or uplink table, with every problem it has reported, not just the first.

    Their kinds' readers stop at the first problem. So the key at fault is set aside and the table read
    again, until it reads or what is left is a problem no setting aside gets past (a missing key, an unknown
    kind). Returns (the config, or None; whether it read without setting anything aside). A config read
    without some of its keys is only for checking further (its points, its references), never for running."""
    table = dict(item) if isinstance(item, dict) else item
    aside: set[str] = set()
    while True:
        try:
            return parse(table, path), not aside
        except error_type as exc:
            rest = exc.path[len(path) + 1:] if exc.path and exc.path.startswith(path + ".") else ""
            key = re.split(r"[.\[]", rest, maxsplit=1)[0]
            if key in aside:  # the key set aside is required: what was wrong with it is said already
                return None, False
            errors.append(Problem(exc.path or path, exc.reason))
            if not key or key == "kind" or not isinstance(table, dict) or key not in table:
                return None, False
            del table[key]
            aside.add(key)


def _unknown_points(c: Any, resolve: Any) -> list[Problem]:
    """Every point name of a point rule (its point, its fault flags and valid points) that is not in the
    catalogue; building the rule stops at the first."""
    names = [("point", c.point), *((f"fault.{key}[{i}]", name) for key in ("flags", "valid")
                                   for i, name in enumerate(getattr(c.fault, key)))]
    unknown = []
    for key, name in names:
        try:
            resolve(name)
        except LookupError:
            unknown.append(Problem(c.where(key), f"unknown point {name!r}"))
    return unknown


def _check_ports(buses: list[BusConfig], errors: list[Problem]) -> None:
    """One serial port is one wire, so it is one bus: its devices must share one scheduler and one line setting."""
    by_port: dict[str, BusConfig] = {}
    for bus in buses:
        s = bus.settings
        port = getattr(s, "port", None)
        if not isinstance(port, str):
            continue
        other = by_port.setdefault(port, bus)
        if other is bus:
            continue
        o = other.settings
        if bus.kind != other.kind:
            errors.append(Problem(
                f"buses[{bus.index}].port",
                f"port {port} is already bus {other.name!r} of type {other.kind!r}; one wire speaks one protocol",
            ))
            continue
        differ = [a for a in ("baudrate", "bytesize", "parity", "stopbits") if getattr(s, a, None) != getattr(o, a, None)]
        if differ:
            a = differ[0]
            errors.append(Problem(
                f"buses[{bus.index}].{a}",
                f"port {port} is also bus {other.name!r} at {a} {getattr(o, a, None)}, here {getattr(s, a, None)}: one wire runs "
                "at one setting; give the device its own port or reconfigure it to match",
            ))
        else:
            errors.append(Problem(
                f"buses[{bus.index}].port",
                f"port {port} is already bus {other.name!r}: put every device of one wire on one bus, so requests never overlap",
            ))
