"""What the HIL scenarios run against: the simulated rig (`sim`) or a real bench (`bench:<name>`), what each can do,
and a lock per bench so that two runs never drive one bench at once.

A bench is a TOML file, `hil_tests/benches/<name>.toml` (or `$YUJING_HIL_BENCH_DIR/<name>.toml`), described in
docs/hil-bench.md. The tests run on the gateway's own machine (the bench's Pi): the gateway under test is a
process the tests start with the bench's site file, its uplink pointed at the session's own mosquitto. So the
host-side faults (the network proxy, the broker, kill -9 of the gateway) work on every target; what a bench can
do beyond that comes from its file (a relay channel that cuts a node's power gives `node_power`, a spare
USB-RS485 adapter gives `rs485_fault_injection`, …).

`YUJING_HIL_SITE=<site file>` (the older way to name a bench) is folded in: it is a bench with only a site file,
named after the file; `--target` wins if both are given.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from gateway.config import Config, ConfigError, load
from gateway.plugins import FieldError, Table

BENCH_DIR = Path(__file__).parent / "benches"

# Every capability a scenario may ask for with @pytest.mark.needs(...), and what it means.
CAPABILITIES: dict[str, str] = {
    "simulated_devices": "the scenario builds its own simulated slaves, pty lines and sockets (the sim target only: "
                         "on a bench it would test the simulation, not the bench)",
    "rs485": "a Modbus RTU line with devices that answer",
    "modbus_tcp": "a Modbus TCP device",
    "rs485_fault_injection": "faults on the RS-485 line: the pty bridge's FaultyLine (sim) or a spare USB-RS485 "
                             "adapter on the line (bench [fault_injector])",
    "network_faults": "the gateway's uplink through the in-process fault proxy (hil_tests/netfault.py)",
    "broker_control": "the session's own broker, which the scenario may restart or make refuse",
    "gateway_kill": "the gateway is a local process the scenario may kill -9 and start again",
    "clock_control": "the scenario may set and step the gateway's wall clock",
    "nodes": "sensor nodes (MicroPython): the unix port here, ESP32 boards on a bench",
    "node_kill": "kill -9 of a node's process (the simulated node only)",
    "node_flash_cut": "a node's flash file cut at a byte, as a brown-out during a write leaves it "
                      "(the simulated node only)",
    "node_power": "a node's power may be cut and restored (sim: kill -9 of its process; bench: a relay channel)",
    "sensor_power": "a sensor's power may be cut and restored (sim: its slave stops answering; bench: a relay channel)",
}
HOST_SIDE = frozenset({"network_faults", "broker_control", "gateway_kill"})  # every target: they live on the test host


class TargetError(ValueError):
    """A bad --target, or a bench file that is not valid; the message names the file and the field."""


class BenchBusy(RuntimeError):
    """Another run holds the bench's lock."""


class _BenchTable(Table):
    error_type = FieldError


@dataclass(frozen=True)
class Adapter:
    bus: str  # the site file's bus it serves
    usb_serial: str
    by_id: str | None = None
    model: str = ""


@dataclass(frozen=True)
class BenchDevice:
    name: str  # as in the site file
    bus: str
    unit: int
    measures: str
    model: str = ""
    serial_number: str = ""


@dataclass(frozen=True)
class Node:
    device_id: str  # as issued by `yujing provision add-node`
    usb_serial: str
    by_id: str | None = None
    board: str = ""
    location: str = ""


@dataclass(frozen=True)
class RelayChannel:
    channel: int  # the relay module's coil address
    cuts: str  # "node:<device id>" or "device:<name>"
    wiring: str = "nc"  # "nc": powered while the coil is off (the bench works with the relay board unpowered)


@dataclass(frozen=True)
class Relay:
    driver: str  # "modbus_rtu" (the only one so far)
    usb_serial: str
    by_id: str | None
    baudrate: int
    unit: int
    model: str = ""
    channels: tuple[RelayChannel, ...] = ()


@dataclass(frozen=True)
class FaultInjector:
    bus: str  # the site file's bus whose line it is wired onto
    usb_serial: str
    by_id: str | None = None
    model: str = ""


@dataclass(frozen=True)
class Bench:
    name: str
    path: Path
    site: Path
    description: str = ""
    location: str = ""
    board: str = ""
    serial_number: str = ""
    clock_control: bool = False
    adapters: tuple[Adapter, ...] = ()
    devices: tuple[BenchDevice, ...] = ()
    nodes: tuple[Node, ...] = ()
    provisioning_dir: str = ""
    relay: Relay | None = None
    fault_injector: FaultInjector | None = None
    config: Config | None = field(default=None, compare=False, repr=False)

    def hardware_ids(self) -> dict[str, Any]:
        """What the report files as "which hardware": every serial number the bench file gives."""
        out: dict[str, Any] = {
            "gateway": {"board": self.board, "serial_number": self.serial_number,
                        "adapters": [{"bus": a.bus, "usb_serial": a.usb_serial, "model": a.model}
                                     for a in self.adapters]},
            "devices": [{"name": d.name, "bus": d.bus, "unit": d.unit, "model": d.model,
                         "serial_number": d.serial_number} for d in self.devices],
            "nodes": [{"device_id": n.device_id, "usb_serial": n.usb_serial, "board": n.board} for n in self.nodes],
        }
        if self.relay is not None:
            out["relay"] = {"model": self.relay.model, "usb_serial": self.relay.usb_serial, "unit": self.relay.unit}
        if self.fault_injector is not None:
            out["fault_injector"] = {"model": self.fault_injector.model, "usb_serial": self.fault_injector.usb_serial}
        return out

    def serial_ports(self) -> dict[str, tuple[str, str | None]]:
        """Every USB serial device the bench needs: label → (USB serial number, by-id path)."""
        ports = {f"adapter {a.bus}": (a.usb_serial, a.by_id) for a in self.adapters}
        ports.update({f"node {n.device_id}": (n.usb_serial, n.by_id) for n in self.nodes})
        if self.relay is not None:
            ports["relay"] = (self.relay.usb_serial, self.relay.by_id)
        if self.fault_injector is not None:
            ports["fault injector"] = (self.fault_injector.usb_serial, self.fault_injector.by_id)
        return ports


@dataclass(frozen=True)
class Target:
    kind: str  # "sim" or "bench"
    name: str  # "sim", or the bench's name
    bench: Bench | None = None
    capabilities: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        return "sim" if self.kind == "sim" else f"bench:{self.name}"

    def lacks(self, needs: set[str] | frozenset[str] | tuple[str, ...]) -> list[str]:
        return sorted(set(needs) - self.capabilities)


SIM = Target("sim", "sim", None, frozenset(CAPABILITIES))


def _port_field(t: Table) -> tuple[str, str | None]:
    usb_serial = t.string("usb_serial")
    if not usb_serial.strip():
        raise t.error("usb_serial", "must not be empty: it is how the adapter is found when ttyUSB numbers move")
    by_id = t.string("by_id", None)
    if by_id is not None and not by_id.startswith("/dev/serial/by-id/"):
        raise t.error("by_id", f"{by_id!r} is not a /dev/serial/by-id/ path (those stay put across reboots and "
                               f"replugging; /dev/ttyUSB* do not)")
    if by_id is not None and usb_serial not in by_id:
        raise t.error("by_id", f"{by_id!r} does not contain the usb_serial {usb_serial!r} (udev names by-id links "
                               f"after the serial number: is one of them copied from another adapter?)")
    return usb_serial, by_id


def _parse(raw: dict[str, Any], path: Path) -> Bench:
    from provisioning.identity import ProvisionError, check_id

    top = _BenchTable(raw, "")
    b = top.table("bench", None)
    name = path.stem
    description = location = ""
    if b is not None:
        name = b.string("name", path.stem)
        description = b.string("description", "")
        location = b.string("location", "")
        b.finish()
    g = top.table("gateway")
    site = Path(g.string("site"))
    site = site if site.is_absolute() else path.parent / site
    board = g.string("board", "")
    serial_number = g.string("serial_number", "")
    clock_control = g.boolean("clock_control", False)
    adapters = []
    if g.has("adapters"):
        for a in g.tables("adapters"):
            usb, by_id = _port_field(a)
            adapters.append(Adapter(a.string("bus"), usb, by_id, a.string("model", "")))
            a.finish()
    g.finish()
    if not site.is_file():
        raise g.error("site", f"{str(site)!r}: no such file (relative paths are from the bench file's folder)")
    try:
        config = load(site)
    except ConfigError as exc:
        raise g.error("site", f"the site file is not valid:\n{exc}") from None
    buses = {bus.name: bus for bus in config.buses}
    site_devices = {d.name: d for d in config.devices}

    seen_bus = set()
    for i, a in enumerate(adapters):
        where = f"gateway.adapters[{i}]"
        if a.bus not in buses:
            raise FieldError(f"{where}.bus",
                             f"{a.bus!r} is not a bus of {site.name} (buses: {', '.join(buses) or 'none'})")
        if a.bus in seen_bus:
            raise FieldError(f"{where}.bus", f"a second adapter for bus {a.bus!r}")
        seen_bus.add(a.bus)
        opens = getattr(buses[a.bus].settings, "port", None)
        if a.by_id is not None and opens is not None and opens != a.by_id:
            raise FieldError(f"{where}.by_id",
                             f"{a.by_id!r}, but {site.name} opens {opens!r} for bus {a.bus!r}: "
                             f"put the by-id path in the site file, so the gateway opens this adapter")

    devices = []
    for d in top.tables("devices") if top.has("devices") else []:
        dev = BenchDevice(d.string("name"), d.string("bus"), d.integer("unit", minimum=0, maximum=255),
                          d.string("measures"), d.string("model", ""), d.string("serial_number", ""))
        d.finish()
        if dev.name not in site_devices:
            raise d.error("name", f"{dev.name!r} is not a device of {site.name} "
                                  f"(devices: {', '.join(site_devices) or 'none'})")
        sd = site_devices[dev.name]
        if (sd.bus, sd.unit) != (dev.bus, dev.unit):
            raise d.error("unit" if sd.bus == dev.bus else "bus",
                          f"bus {dev.bus!r} unit {dev.unit}, but {site.name} polls {dev.name!r} "
                          f"on bus {sd.bus!r} unit {sd.unit}")
        devices.append(dev)

    nodes = []
    for n in top.tables("nodes") if top.has("nodes") else []:
        device_id = n.string("device_id")
        try:
            check_id(device_id)
        except ProvisionError as exc:
            raise n.error("device_id", str(exc)) from None
        usb, by_id = _port_field(n)
        nodes.append(Node(device_id, usb, by_id, n.string("board", ""), n.string("location", "")))
        n.finish()
    ids = [n.device_id for n in nodes]
    for i, d in enumerate(ids):
        if d in ids[:i]:
            raise FieldError(f"nodes[{i}].device_id", f"{d!r} is listed twice")
    prov = top.table("provisioning", None)
    provisioning_dir = ""
    if prov is not None:
        provisioning_dir = prov.string("site_dir")
        prov.finish()

    relay = None
    r = top.table("relay", None)
    if r is not None:
        driver = r.string("driver", choices=("modbus_rtu",))
        usb, by_id = _port_field(r)
        baud = r.integer("baudrate", 9600, minimum=1200, maximum=921600)
        unit = r.integer("unit", minimum=1, maximum=247)
        model = r.string("model", "")
        channels = []
        for c in r.tables("channels"):
            ch = RelayChannel(c.integer("channel", minimum=0, maximum=65535), c.string("cuts"),
                              c.string("wiring", "nc", choices=("nc", "no")))
            c.finish()
            what, _, who = ch.cuts.partition(":")
            if what == "node" and who not in ids:
                raise c.error("cuts", f"{ch.cuts!r}: no node {who!r} on this bench (nodes: {', '.join(ids) or 'none'})")
            if what == "device" and who not in {d.name for d in devices}:
                raise c.error("cuts", f"{ch.cuts!r}: no device {who!r} in this bench's [[devices]] "
                                      f"({', '.join(d.name for d in devices) or 'none'})")
            if what not in ("node", "device"):
                raise c.error("cuts", f"{ch.cuts!r}: write \"node:<device id>\" or \"device:<name>\"")
            if ch.channel in {x.channel for x in channels}:
                raise c.error("channel", f"channel {ch.channel} is listed twice")
            channels.append(ch)
        r.finish()
        relay = Relay(driver, usb, by_id, baud, unit, model, tuple(channels))

    injector = None
    f = top.table("fault_injector", None)
    if f is not None:
        usb, by_id = _port_field(f)
        bus = f.string("bus")
        injector = FaultInjector(bus, usb, by_id, f.string("model", ""))
        f.finish()
        if bus not in buses or buses[bus].kind != "rtu":
            raise f.error("bus", f"{bus!r} is not an RTU bus of {site.name} "
                                 f"(RTU buses: {', '.join(n for n, x in buses.items() if x.kind == 'rtu') or 'none'})")
    top.finish()
    return Bench(name, path, site, description, location, board, serial_number, clock_control, tuple(adapters),
                 tuple(devices), tuple(nodes), provisioning_dir, relay, injector, config)


def load_bench(path: Path) -> Bench:
    """Read and check a bench file (and the site file it names). TargetError names the file and the field."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TargetError(f"{path}: cannot read the bench file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{path}: not valid TOML: {exc}") from None
    try:
        return _parse(raw, path)
    except FieldError as exc:
        raise TargetError(f"{path}: {exc}") from None


def capabilities_of(bench: Bench) -> frozenset[str]:
    caps = set(HOST_SIDE)
    cfg = bench.config
    kinds = {b.name: b.kind for b in cfg.buses} if cfg else {}
    if cfg and any(kinds.get(d.bus) == "rtu" for d in cfg.devices):
        caps.add("rs485")
    if cfg and any(kinds.get(d.bus) == "tcp" for d in cfg.devices):
        caps.add("modbus_tcp")
    if bench.fault_injector is not None:
        caps.add("rs485_fault_injection")
    if bench.clock_control:
        caps.add("clock_control")
    if bench.nodes:
        caps.add("nodes")
    if bench.relay is not None:
        cuts = {c.cuts.partition(":")[0] for c in bench.relay.channels}
        if "node" in cuts:
            caps.add("node_power")
        if "device" in cuts:
            caps.add("sensor_power")
    return frozenset(caps)


def bench_dir() -> Path:
    return Path(os.environ["YUJING_HIL_BENCH_DIR"]) if os.environ.get("YUJING_HIL_BENCH_DIR") else BENCH_DIR


def resolve(spec: str | None = None) -> Target:
    """The target from `--target` (or $YUJING_HIL_TARGET), else $YUJING_HIL_SITE, else the simulated rig."""
    spec = spec or os.environ.get("YUJING_HIL_TARGET") or ""
    if not spec:
        site = os.environ.get("YUJING_HIL_SITE")
        if not site:
            return SIM
        path = Path(site)
        try:
            config = load(path)
        except ConfigError as exc:
            raise TargetError(f"YUJING_HIL_SITE={site}: the site file is not valid:\n{exc}") from None
        bench = Bench(path.stem, path, path, description="YUJING_HIL_SITE (a site file only)", config=config)
        return Target("bench", bench.name, bench, capabilities_of(bench))
    if spec == "sim":
        return SIM
    kind, _, name = spec.partition(":")
    if kind != "bench" or not name:
        raise TargetError(f"--target {spec!r}: write `sim` or `bench:<name>` (a file <name>.toml in {bench_dir()})")
    path = bench_dir() / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in bench_dir().glob("*.toml") if not p.name.endswith(".site.toml"))
        raise TargetError(f"--target {spec}: no bench file {path} (benches there: {', '.join(known) or 'none'})")
    bench = load_bench(path)
    return Target("bench", name, bench, capabilities_of(bench))


def target_of(config: Any) -> Target:
    """The session's target, as the HIL plugin resolved it (the simulated rig when the plugin is not loaded)."""
    return getattr(config.pluginmanager.get_plugin("hil-session"), "target", SIM)


def find_port(usb_serial: str, by_id: str | None) -> str | None:
    """Where the USB serial device with this serial number is now: its by-id path if that exists, else the port
    pyserial lists with that serial number, else None (unplugged)."""
    if by_id and os.path.exists(by_id):
        return by_id
    from serial.tools import list_ports

    for p in list_ports.comports():
        if p.serial_number == usb_serial:
            return p.device
    return None


def missing_hardware(bench: Bench) -> list[str]:
    """The bench's USB serial devices that are not plugged in (empty: everything is there)."""
    return [f"{label} (USB serial {usb}{', ' + by_id if by_id else ''})"
            for label, (usb, by_id) in bench.serial_ports().items() if find_port(usb, by_id) is None]


# ------------------------------------------------------------------------------------------------ the lock


def lock_dir() -> Path:
    if os.environ.get("YUJING_HIL_LOCK_DIR"):
        return Path(os.environ["YUJING_HIL_LOCK_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "yujing-hil"
    return Path.home() / ".cache" / "yujing-hil"


class BenchLock:
    """An exclusive flock on `<lock dir>/<bench>.lock`, holding who took it. The kernel drops the lock when its
    holder dies however it dies, so a stale file never blocks; the file itself stays (deleting it would let a
    second run lock a new file while a third still holds the old one)."""

    def __init__(self, bench: str, directory: Path | None = None) -> None:
        self.bench = bench
        self.path = (directory or lock_dir()) / f"{bench}.lock"
        self._fd: int | None = None

    def acquire(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                   f" ({holder.get('argv', '')})" if holder else "a run that has not written its name yet")
            raise BenchBusy(f"bench {self.bench!r} is in use by {who}; lock file {self.path}. Wait for that run "
                            f"to end (a dead run's lock is released by the kernel: no file to delete)") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            return json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}

    def holder(self) -> dict[str, Any]:
        if self._fd is None:
            return {}
        return self._read(self._fd)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
