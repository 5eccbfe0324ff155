"""The site configuration: one TOML file, read and validated here and nowhere else.

Every problem is collected (not just the first) and reported as `file:line: key.path: what is wrong`,
so a technician fixes a broken file in one pass. Components receive typed, frozen config objects.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from device_drivers.modbus import SerialSettings, TcpSettings
from device_drivers.plan import MODBUS_MAX_BITS, MODBUS_MAX_REGISTERS
from device_drivers.registers import (
    BIT_TYPES,
    DATA_TYPES,
    ORDERS,
    REGISTER_BIT_TYPE,
    WORD_TYPES,
    PointSpec,
    PointValidity,
    Table,
)

from .model import PointInfo
from .wire import DEFAULT_PREFIX

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # no MQTT wildcards or separators


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    line: int | None = None


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
    batch_delay_s: float = 1.0
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    drain_rate: float = 0.0  # backlog readings per second after an outage; 0: as fast as the broker takes
    # The platform's Ed25519 public keys (PEM) that may sign commands (several during a key rotation);
    # none: remote commands are refused. The private key never leaves the platform.
    command_public_key_files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class SpoolConfig:
    path: Path
    max_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class BusConfig:
    name: str
    settings: TcpSettings | SerialSettings
    pause_s: float = 0.0  # quiet time on the wire between two transactions

    @property
    def kind(self) -> str:
        return "tcp" if isinstance(self.settings, TcpSettings) else "rtu"


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    bus: str
    unit: int
    interval_s: float
    points: tuple[PointSpec, ...]
    retries: int = 1
    offline_after: int = 3  # consecutive failed polls before the device is offline
    backoff_max_s: float = 60.0  # longest wait between probes of an offline device
    coalesce: bool = True
    max_gap: int = 8
    max_registers: int = MODBUS_MAX_REGISTERS
    max_bits: int = MODBUS_MAX_BITS


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

    def point_index(self) -> dict[tuple[str, str], int]:
        return {(p.device, p.name): i for i, p in enumerate(self.catalogue)}

    def resolve_point(self, name: str) -> int:
        """`device.point` → catalogue index; KeyError naming the known points otherwise."""
        device, _, point = name.partition(".")
        index = self.point_index()
        if (device, point) not in index:
            raise KeyError(f"no point {name!r} (points are named device.point, e.g. {next(iter(self.catalogue)).device}."
                           f"{next(iter(self.catalogue)).name})" if self.catalogue else f"no point {name!r}")
        return index[(device, point)]

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


# ---------------------------------------------------------------- field reader


class Reader:
    """Takes typed fields out of one TOML table; whatever is left at the end is an unknown key."""

    def __init__(self, table: Any, path: str, errors: list[Problem]) -> None:
        self.path = path
        self.errors = errors
        self.ok = isinstance(table, dict)
        self.table: dict[str, Any] = dict(table) if self.ok else {}
        if not self.ok:
            self.error("", f"expected a table, got {_type_name(table)}")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> None:
        self.errors.append(Problem(self.key(name) if name else self.path, message))

    def get(self, name: str, types: type | tuple[type, ...], default: Any = ..., *, check=None, hint: str = "") -> Any:
        if name not in self.table:
            if default is ...:
                if self.ok:
                    self.error(name, "missing (required)")
                return None
            return default
        value = self.table.pop(name)
        types_ = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in types_:
            good = False
        else:
            good = isinstance(value, types_)
        if not good:
            want = " or ".join(_type_name_of(t) for t in types_)
            self.error(name, f"expected {want}, got {_type_name(value)} {value!r}")
            return None if default is ... else default
        if check is not None and not check(value):
            self.error(name, f"invalid value {value!r}{': ' + hint if hint else ''}")
            return None if default is ... else default
        return value

    def finish(self) -> None:
        for name in self.table:
            self.error(name, "unknown key")


def _type_name_of(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "an array", dict: "a table"}.get(t, t.__name__)


def _type_name(v: Any) -> str:
    return {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "table"}.get(type(v), type(v).__name__)


NUMBER = (int, float)


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


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
    batch_delay = r.get("batch_delay_s", NUMBER, 1.0, check=_non_negative, hint="≥ 0")
    bmin = r.get("backoff_min_s", NUMBER, 1.0, check=_positive, hint="> 0")
    bmax = r.get("backoff_max_s", NUMBER, 60.0, check=_positive, hint="> 0")
    drain_rate = r.get("drain_rate", NUMBER, 0, check=_non_negative, hint="readings per second, 0 = as fast as the broker accepts")
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
    mode = _regular_file(r, name, path)
    if mode is None:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        r.error(name, f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}")


def _spool(r: Reader, base: Path) -> SpoolConfig:
    path = _resolve(base, r.get("path", str, "state/spool.db"))
    max_bytes = r.get("max_bytes", int, 256 * 1024 * 1024, check=lambda v: v >= 1024 * 1024, hint="at least 1048576 (1 MiB)")
    r.finish()
    return SpoolConfig(path or base / "state/spool.db", max_bytes)


PARITIES = {"N": "N", "E": "E", "O": "O", "none": "N", "even": "E", "odd": "O"}


def _bus(r: Reader) -> BusConfig | None:
    name = r.get("name", str, check=ID_RE.match, hint="letters, digits, '_', '.', '-'")
    kind = r.get("type", str, check=lambda v: v in ("tcp", "rtu"), hint='"tcp" or "rtu"')
    pause = r.get("pause_s", NUMBER, 0.0, check=_non_negative, hint="≥ 0")
    timeout = r.get("timeout_s", NUMBER, 1.0 if kind == "tcp" else 0.3, check=_positive, hint="> 0")
    settings: TcpSettings | SerialSettings | None = None
    if kind == "tcp":
        host = r.get("host", str)
        port = r.get("port", int, 502, check=lambda p: 0 < p < 65536, hint="1..65535")
        if host:
            settings = TcpSettings(host, port, float(timeout))
    elif kind == "rtu":
        port = r.get("port", str)
        baud = r.get("baudrate", int, 9600, check=lambda v: v in (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200), hint="a standard rate (1200..115200)")
        bytesize = r.get("bytesize", int, 8, check=lambda v: v in (7, 8), hint="7 or 8")
        parity = r.get("parity", str, "N", check=lambda v: v in PARITIES, hint='"N", "E" or "O"')
        stopbits = r.get("stopbits", int, 1, check=lambda v: v in (1, 2), hint="1 or 2")
        if port:
            settings = SerialSettings(port, baud, bytesize, PARITIES[parity], stopbits, float(timeout))
    r.finish()
    if name is None or settings is None:
        return None
    return BusConfig(name, settings, float(pause))


def _decimal(v: int | float) -> Decimal:
    # str() gives the digits the technician wrote (0.001, not 0.001000000000000000020816…)
    return Decimal(str(v))


def _point(r: Reader, device_max: int) -> PointSpec | None:
    name = r.get("name", str, check=ID_RE.match, hint="letters, digits, '_', '.', '-'")
    table_s = r.get("table", str, "holding", check=lambda v: v in {t.value for t in Table}, hint="coil, discrete, input or holding")
    table = Table(table_s) if table_s else Table.HOLDING
    address = r.get("address", int, check=lambda v: 0 <= v <= 65535, hint="0..65535 (0-based protocol address)")
    default_type = "bool" if table.is_bits else "uint16"
    dtype = r.get("type", str, default_type, check=lambda v: v in DATA_TYPES, hint=", ".join(DATA_TYPES))
    byte_order = r.get("byte_order", str, "big", check=lambda v: v in ORDERS, hint='"big" or "little"')
    word_order = r.get("word_order", str, "big", check=lambda v: v in ORDERS, hint='"big" or "little"')
    bit = r.get("bit", int, None, check=lambda v: 0 <= v <= 15, hint="0..15")
    scale = r.get("scale", NUMBER, 1, check=lambda v: v != 0, hint="not 0")
    offset = r.get("offset", NUMBER, 0)
    unit = r.get("unit", str, "")
    vmin = r.get("min", NUMBER, None)
    vmax = r.get("max", NUMBER, None)
    fault_table = r.get("fault", dict, None)
    validity = _validity(Reader(fault_table, r.key("fault"), r.errors), dtype) if fault_table is not None else None
    r.finish()
    if dtype is not None:
        if table.is_bits and dtype not in BIT_TYPES:
            r.error("type", f"{dtype} is a register type, but a {table.value} holds one bit: use type = \"bool\"")
            dtype = None
        elif not table.is_bits and dtype in BIT_TYPES:
            r.error("type", f"bool is for coils and discrete inputs; for one bit of a {table.value} register use type = \"bit\" and bit = N")
            dtype = None
        elif dtype == REGISTER_BIT_TYPE and bit is None:
            r.error("bit", "type \"bit\" needs bit = 0..15")
        elif dtype != REGISTER_BIT_TYPE and bit is not None:
            r.error("bit", f"bit is only for type \"bit\", this point is {dtype}")
    if dtype in WORD_TYPES and WORD_TYPES[dtype][0] > device_max:
        r.error("type", f"{dtype} needs {WORD_TYPES[dtype][0]} registers but the device reads at most {device_max}")
    if vmin is not None and vmax is not None and vmin > vmax:
        r.error("min", f"min {vmin} is more than max {vmax}")
    if address is not None and dtype in WORD_TYPES and address + WORD_TYPES[dtype][0] > 65536:
        r.error("address", f"{dtype} at {address} runs past register 65535")
    if name is None or address is None or dtype is None:
        return None
    return PointSpec(
        name=name, table=table, address=address, type=dtype, byte_order=byte_order or "big", word_order=word_order or "big",
        bit=bit, scale=_decimal(scale or 1), offset=_decimal(offset or 0), unit=unit, min=vmin, max=vmax, validity=validity,
    )


def _names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _validity(r: Reader, dtype: str | None) -> PointValidity | None:
    """`fault = { codes = [65535], raw_min = 3800, raw_max = 20500, flags = ["sensor_fault"], valid = ["ok"] }`"""
    codes = r.get("codes", list, [], check=lambda v: all(isinstance(x, int) and not isinstance(x, bool) for x in v),
                  hint="raw register values (integers) that mean the reading is not valid")
    raw_min = r.get("raw_min", NUMBER, None)
    raw_max = r.get("raw_max", NUMBER, None)
    flags = r.get("flags", list, [], check=_names, hint="names of points of this device: fault while true")
    valid = r.get("valid", list, [], check=_names, hint="names of points of this device: fault while false")
    r.finish()
    if raw_min is not None and raw_max is not None and raw_min > raw_max:
        r.error("raw_min", f"{raw_min} is more than raw_max {raw_max}")
    if (codes or raw_min is not None or raw_max is not None) and dtype in ("bool", REGISTER_BIT_TYPE):
        r.error("codes" if codes else "raw_min", "raw fault codes and ranges are for register values, not single bits")
    if not (codes or raw_min is not None or raw_max is not None or flags or valid):
        r.error("", "says nothing: give codes, raw_min/raw_max, flags or valid")
        return None
    return PointValidity(frozenset(codes or ()), raw_min, raw_max, tuple(flags or ()), tuple(valid or ()))


def _device(r: Reader) -> tuple[DeviceConfig | None, list[tuple[int, PointSpec]]]:
    name = r.get("name", str, check=ID_RE.match, hint="letters, digits, '_', '.', '-'")
    bus = r.get("bus", str)
    unit = r.get("unit", int, 1, check=lambda v: 0 <= v <= 255, hint="1..247 on a serial bus, 0..255 over TCP")
    interval = r.get("interval_s", NUMBER, check=_positive, hint="must be more than 0 seconds")
    retries = r.get("retries", int, 1, check=lambda v: 0 <= v <= 10, hint="0..10")
    offline_after = r.get("offline_after", int, 3, check=lambda v: v >= 1, hint="≥ 1")
    backoff_max = r.get("backoff_max_s", NUMBER, 60.0, check=_positive, hint="> 0")
    coalesce = r.get("coalesce", bool, True)
    max_gap = r.get("max_gap", int, 8, check=lambda v: 0 <= v <= 124, hint="0..124")
    max_registers = r.get("max_registers", int, MODBUS_MAX_REGISTERS, check=lambda v: 1 <= v <= MODBUS_MAX_REGISTERS, hint=f"1..{MODBUS_MAX_REGISTERS}")
    max_bits = r.get("max_bits", int, MODBUS_MAX_BITS, check=lambda v: 1 <= v <= MODBUS_MAX_BITS, hint=f"1..{MODBUS_MAX_BITS}")
    raw_points = r.get("points", list, [])
    points: list[tuple[int, PointSpec]] = []
    for j, table in enumerate(raw_points):
        pr = Reader(table, f"{r.path}.points[{j}]", r.errors)
        if pr.ok:
            p = _point(pr, max_registers or MODBUS_MAX_REGISTERS)
            if p is not None:
                points.append((j, p))
    r.finish()
    if not raw_points and r.ok:
        r.error("points", "a device needs at least one [[devices.points]]")
    seen: dict[str, int] = {}
    for j, p in points:
        if p.name in seen:
            r.errors.append(Problem(f"{r.path}.points[{j}].name", f"point {p.name!r} is already defined at points[{seen[p.name]}]"))
        seen.setdefault(p.name, j)
    for j, p in points:
        if p.validity is None:
            continue
        for key in ("flags", "valid"):
            for k, status in enumerate(getattr(p.validity, key)):
                if status == p.name:
                    r.errors.append(Problem(f"{r.path}.points[{j}].fault.{key}[{k}]", f"{status!r} is this point itself"))
                elif status not in seen:
                    known = ", ".join(sorted(seen)) or "none"
                    r.errors.append(Problem(f"{r.path}.points[{j}].fault.{key}[{k}]",
                                            f"no point {status!r} on this device (its points: {known}); a status point must be read in the same poll"))
    _check_overlaps(r, points)
    if None in (name, bus, unit, interval):
        return None, points
    return (
        DeviceConfig(
            name=name, bus=bus, unit=unit, interval_s=float(interval), points=tuple(p for _, p in points), retries=retries,
            offline_after=offline_after, backoff_max_s=float(backoff_max), coalesce=coalesce, max_gap=max_gap,
            max_registers=max_registers, max_bits=max_bits,
        ),
        points,
    )


def _check_overlaps(r: Reader, points: list[tuple[int, PointSpec]]) -> None:
    """Two points may share registers only when they decode them the same way (or pick single bits)."""
    for a_idx, (ja, a) in enumerate(points):
        for jb, b in points[a_idx + 1 :]:
            if a.table is not b.table or a.address >= b.end or b.address >= a.end:
                continue
            if REGISTER_BIT_TYPE in (a.type, b.type) or a.table.is_bits:
                continue
            if (a.address, a.type, a.byte_order, a.word_order) == (b.address, b.type, b.byte_order, b.word_order):
                continue
            r.errors.append(
                Problem(
                    f"{r.path}.points[{jb}].address",
                    f"{b.name} ({b.type} at {b.address}..{b.end - 1}) overlaps {a.name} ({a.type} at {a.address}..{a.end - 1}) "
                    "and reads the same registers differently",
                )
            )


# ---------------------------------------------------------------- whole file


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a site file. Raises ConfigError listing every problem found."""
    path = Path(path)
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(shown, [Problem("(file)", f"cannot read: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(shown, [Problem("(file)", f"not UTF-8 text: {exc}")]) from exc
    return parse(text, shown, base=path.resolve().parent)


def parse(text: str, shown: str = "<config>", *, base: Path | None = None) -> Config:
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

    buses: list[BusConfig] = []
    bus_index: dict[str, int] = {}
    for i, t in enumerate(top.get("buses", list, [])):
        br = Reader(t, f"buses[{i}]", errors)
        bus = _bus(br) if br.ok else None
        if bus is None:
            continue
        if bus.name in bus_index:
            errors.append(Problem(f"buses[{i}].name", f"bus {bus.name!r} is already defined at buses[{bus_index[bus.name]}]"))
            continue
        bus_index[bus.name] = i
        buses.append(bus)
    _check_serial_ports(buses, bus_index, errors)
    bus_by_name = {b.name: b for b in buses}

    devices: list[DeviceConfig] = []
    device_index: dict[str, int] = {}
    units: dict[tuple[str, int], tuple[int, str]] = {}
    raw_devices = top.get("devices", list, [])
    for i, t in enumerate(raw_devices):
        dr = Reader(t, f"devices[{i}]", errors)
        if not dr.ok:
            continue
        device, _ = _device(dr)
        if device is None:
            continue
        if device.name in device_index:
            errors.append(Problem(f"devices[{i}].name", f"device {device.name!r} is already defined at devices[{device_index[device.name]}]"))
            continue
        device_index[device.name] = i
        if device.bus not in bus_index:
            known = ", ".join(sorted(bus_index)) or "none defined"
            errors.append(Problem(f"devices[{i}].bus", f"no bus named {device.bus!r} (buses: {known})"))
            continue
        if bus_by_name[device.bus].kind == "rtu" and not 1 <= device.unit <= 247:
            errors.append(Problem(f"devices[{i}].unit", f"unit {device.unit} on serial bus {device.bus!r}: RS-485 slaves are 1..247 (0 is broadcast, nobody answers)"))
            continue
        key = (device.bus, device.unit)
        if key in units:
            j, other = units[key]
            errors.append(Problem(f"devices[{i}].unit", f"unit {device.unit} on bus {device.bus!r} is already used by {other!r} (devices[{j}])"))
            continue
        units[key] = (i, device.name)
        devices.append(device)
    if not raw_devices and isinstance(doc.get("devices", []), list):
        errors.append(Problem("devices", "no [[devices]]: a site needs at least one device to poll"))
    raw_rules = top.get("rules", list, [])
    raw_actions = top.get("actions", list, [])
    top.finish()

    if errors:
        locator = Locator(text)
        located = [Problem(p.path, p.message, locator.line(p.path)) for p in errors]
        located.sort(key=lambda p: p.line or 0)  # read top to bottom, like the file
        raise ConfigError(shown, located)
    if site is None or uplink is None:  # unreachable: a missing section is an error above
        raise ConfigError(shown, [Problem("site" if site is None else "uplink", "missing")])
    catalogue = tuple(PointInfo(d.name, p.name, p.unit, p.type) for d in devices for p in d.points)
    cfg = Config(Path(shown), site, uplink, spool, tuple(buses), tuple(devices), catalogue)
    before = len(errors)
    rules = _rules(raw_rules, cfg, errors)
    # Actions name rules: checked against a rule list that failed, they would only echo its errors.
    actions = _actions(raw_actions, cfg, rules, errors) if len(errors) == before else ()
    if errors:
        locator = Locator(text)
        raise ConfigError(shown, sorted((Problem(p.path, p.message, locator.line(p.path)) for p in errors), key=lambda p: p.line or 0))
    return Config(Path(shown), site, uplink, spool, tuple(buses), tuple(devices), catalogue, rules, actions)


def _rules(raw: list[Any], cfg: Config, errors: list[Problem]) -> tuple[Any, ...]:
    from .rules import AlarmEngine, RuleConfigError, order_rules, parse_rule

    configs = []
    for i, item in enumerate(raw):
        try:
            configs.append(parse_rule(item, f"rules[{i}]"))
        except RuleConfigError as exc:
            errors.append(Problem(exc.path or f"rules[{i}]", exc.reason))
    if len(configs) != len(raw):
        return ()
    try:
        order_rules(configs)
        AlarmEngine(configs, cfg.resolve_point)  # resolves every point name now, not at run time
    except RuleConfigError as exc:
        errors.append(Problem(exc.path or "rules", exc.reason))
        return ()
    return tuple(configs)


def _actions(raw: list[Any], cfg: Config, rules: tuple[Any, ...], errors: list[Problem]) -> tuple[Any, ...]:
    if not raw:
        return ()
    try:
        from .actions import ActionConfigError, parse_actions
    except ImportError:  # pragma: no cover - the actions package is part of the tree
        errors.append(Problem("actions", "this build has no alarm actions"))
        return ()
    try:
        from .health import FAULT_RULE

        rule_ids = [r.id for r in rules] + [FAULT_RULE]  # an output may follow the gateway's own fault (a fault lamp)
        return tuple(parse_actions(raw, "actions", buses={b.name: b.kind for b in cfg.buses}, rule_ids=rule_ids))
    except ActionConfigError as exc:
        errors.append(Problem(exc.path or "actions", exc.reason))
        return ()


def _check_serial_ports(buses: list[BusConfig], index: dict[str, int], errors: list[Problem]) -> None:
    """One serial port is one wire, so it is one bus: its devices must share one scheduler and one line setting."""
    by_port: dict[str, BusConfig] = {}
    for bus in buses:
        s = bus.settings
        if not isinstance(s, SerialSettings):
            continue
        other = by_port.setdefault(s.port, bus)
        if other is bus or not isinstance(o := other.settings, SerialSettings):
            continue
        differ = [a for a in ("baudrate", "bytesize", "parity", "stopbits") if getattr(s, a) != getattr(o, a)]
        if differ:
            a = differ[0]
            errors.append(Problem(
                f"buses[{index[bus.name]}].{a}",
                f"port {s.port} is also bus {other.name!r} at {a} {getattr(o, a)}, here {getattr(s, a)}: one wire runs "
                "at one setting; give the device its own port or reconfigure it to match",
            ))
        else:
            errors.append(Problem(
                f"buses[{index[bus.name]}].port",
                f"port {s.port} is already bus {other.name!r}: put every device of one wire on one bus, so requests never overlap",
            ))
