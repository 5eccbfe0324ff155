"""`yujing demo`: a whole simulated reservoir site on one machine, no hardware and no broker installed.

- a Modbus TCP device (a dam-monitoring PLC: piezometers and a gas detector) on loopback,
- an RS-485 bus on a pair of pseudo-terminals made here (radar level, rain gauge, crack meter),
- an ultrasonic anemometer streaming NMEA sentences on another pseudo-terminal (the serial_line driver),
- an SL 651 rain station upstream that dials in over TCP with its timed reports (the gateway as centre),
- a broker: mosquitto when it is installed, else amqtt (pure Python) inside this process,
- the gateway itself, and the reference consumer printing every reading it decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiomqtt

from .app import Gateway
from .config import Config, parse
from .consumer import Decoder, load_schema
from .sim.devices import SimServer, SimSlave, site_value
from .sim.ptybridge import PtyBridge
from .sim.stations import SimAnemometer, SimHydroStation

log = logging.getLogger("yujing.demo")

SITE = """\
# Written by `yujing demo`: a small reservoir, KM-RES-01 (see examples/reservoir.toml for a real one).
[site]
id = "KM-RES-01"
gateway = "demo-gw"
name = "Demo reservoir (simulated)"

[uplink]
host = "127.0.0.1"
port = {broker_port}
tls = false               # loopback only; a real site keeps the default (TLS on)
protocol = "{protocol}"
batch_delay_s = 0.2

[spool]
path = "{workdir}/spool"

[status]
listen = "127.0.0.1:{status_port}"

[[buses]]
name = "rs485-a"
type = "rtu"
port = "{tty}"
baudrate = 9600
timeout_s = 0.3
pause_s = 0.01

[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
port = {modbus_port}

[[buses]]
name = "wind-line"
type = "serial_line"
port = "{wind_tty}"
baudrate = 4800

[[buses]]
name = "hydro"
type = "sl651"
listen = "127.0.0.1:{sl651_port}"
centre = 1

[[devices]]
name = "wind"             # an ultrasonic anemometer: $IIMWV,<direction>,R,<speed>,M,A*hh
bus = "wind-line"
mode = "stream"
interval_s = 1
start = "$"
checksum = "nmea"
separator = ","
valid = {{ field = 5, equals = "A" }}
  [[devices.points]]
  name = "direction"
  field = 1
  unit = "deg"
  [[devices.points]]
  name = "speed"
  field = 3
  unit = "m/s"

[[devices]]
name = "upstream"         # an SL 651 rain station up the valley, reporting every few seconds in the demo
bus = "hydro"
station = "0053010002"
interval_s = 3
  [[devices.points]]
  name = "rain_today"
  element = "PJ"
  [[devices.points]]
  name = "battery"
  element = "VT"

[[devices]]
name = "radar"
bus = "rs485-a"
unit = 1
interval_s = 1
  [[devices.points]]
  name = "gap"
  address = 1
  unit = "mm"
  [[devices.points]]
  name = "level"          # the same register, as reservoir level ZU = 1963.000 − gap/1000
  address = 1
  scale = -0.001
  offset = 1963.0
  unit = "m"

[[devices]]
name = "rain"
bus = "rs485-a"
unit = 2
interval_s = 2
  [[devices.points]]
  name = "total"
  address = 0
  type = "uint32"
  scale = 0.1
  unit = "mm"

[[devices]]
name = "crack"
bus = "rs485-a"
unit = 3
interval_s = 2
  [[devices.points]]
  name = "crack_opening"
  address = 4
  type = "int16"
  scale = 0.01
  unit = "mm"

[[devices]]
name = "dam-plc"
bus = "plc"
unit = 1
interval_s = 1
  [[devices.points]]
  name = "piezo_p1"
  address = 0
  type = "float32"
  word_order = "little"
  unit = "kPa"
  min = 0
  max = 400
  [[devices.points]]
  name = "piezo_p2"
  address = 2
  type = "float32"
  word_order = "little"
  unit = "kPa"
  min = 0
  max = 400
  [[devices.points]]
  name = "pump_running"
  table = "coil"
  address = 0

# Local alarm rules: evaluated here, on every reading, whatever the uplink does.
[[rules]]
kind = "threshold"
id = "res.level"
point = "radar.level"
direction = "high"
levels = [ {{ level = "IV_BLUE", set = 1953.20, clear = 1953.18 }}, {{ level = "III_YELLOW", set = 1953.50, clear = 1953.45 }} ]
[rules.fault]
interval_s = 1
max_step = 0.5             # a jump of more than 0.5 m between readings is a radar glitch: fault, not red

[[rules]]
kind = "rate"
id = "res.rise"
point = "radar.level"
window_s = 60
per_s = 3600
direction = "rise"
levels = [ {{ level = "III_YELLOW", set = 0.10, clear = 0.08 }} ]
"""


def free_port(preferred: int = 0) -> int:
    """`preferred` if nothing listens there (the status page's usual port), else any free one."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"broker did not listen on 127.0.0.1:{port} within {timeout}s")


@contextlib.asynccontextmanager
async def embedded_broker(kind: str, workdir: Path) -> AsyncIterator[tuple[int, str, str]]:
    """Yield (port, protocol, name) of a broker on loopback for the demo's lifetime."""
    port = free_port()
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if kind == "mosquitto" or (kind == "auto" and exe):
        if not exe:
            raise RuntimeError("--broker mosquitto: mosquitto is not installed (apt-get install mosquitto)")
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await _wait_port(port)
            yield port, "5", f"mosquitto (pid {proc.pid})"
        finally:
            proc.terminate()
            proc.wait(5)
        return
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise RuntimeError("no broker: install mosquitto, or pip install 'yujing[demo]' for the embedded amqtt broker") from exc
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    try:
        yield port, "3.1.1", "amqtt (embedded, pure Python)"
    finally:
        await broker.shutdown()


async def _animate(cfg: Config, servers: dict[str, SimServer], stop: asyncio.Event) -> None:
    """Move the simulated values like a real site: once a second, every point of every device."""
    rng = random.Random(7)
    t0 = time.monotonic()
    while not stop.is_set():
        t = time.monotonic() - t0
        for d in cfg.devices:
            if d.bus not in servers:
                continue  # not Modbus: the instrument simulates itself
            written: set[tuple[str, int]] = set()
            for p in d.points:
                if (p.table.value, p.address) in written:
                    continue  # a second view of the same register (radar gap and level)
                written.add((p.table.value, p.address))
                await servers[d.bus].set_point(d.unit, p, site_value(d, p, t, rng))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


def yujing_command() -> str:
    """How to type `yujing` in another terminal: the bare name when the shell finds this installation, else
    its full path (scripts/demo.sh runs .venv/bin/yujing without activating the virtualenv, so the bare name
    is "command not found" there, or another installation)."""
    mine = Path(sys.executable).parent / "yujing"  # the script pip put next to this interpreter (not resolved: a venv)
    if not mine.is_file():
        return "yujing"
    found = shutil.which("yujing")
    if found is not None and Path(found).resolve() == mine.resolve():
        return "yujing"
    return str(mine.absolute())


def _print_reading(rec: dict) -> None:
    ts = time.strftime("%H:%M:%S", time.localtime(rec["ts"] / 1000))
    if "alarm" in rec:
        # A rule's message names the rule, the kind and the levels already (gateway.rules.core); an output's or
        # the gateway's own fault does not, so those get the rule and kind in front.
        message = rec["message"]
        if not message.startswith(f"{rec['rule']} "):
            message = f"{rec['rule']} {rec['alarm']}: {message}"
        print(f"{ts}  ALARM {message}", flush=True)
        return
    value = rec["value"]
    shown = f"{value:.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
    quality = "" if rec["quality"] == "good" else f"  [{rec['quality']}]"
    print(f"{ts}  {rec['device']:>8}.{rec['point']:<14} {shown:>12} {rec['unit'] or '':<4} seq {rec['seq']}{quality}", flush=True)


async def run_demo(*, duration: float | None, workdir: str | None, broker: str = "auto") -> int:
    with contextlib.ExitStack() as stack:
        wd = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="yujing-demo-")))
        wd.mkdir(parents=True, exist_ok=True)
        async with embedded_broker(broker, wd) as (broker_port, protocol, broker_name):
            bridge = PtyBridge()
            bridge.start()
            modbus_port = free_port()
            wind = SimAnemometer(lambda t: (200 + 40 * math.sin(t / 7), 3.0 + 2.5 * abs(math.sin(t / 5))))
            sl651_port = free_port()
            station = SimHydroStation(("127.0.0.1", sl651_port), station="0053010002", interval_s=3.0,
                                      elements=lambda t: {0x20: Decimal(round(12.5 + t / 10, 1)), 0x38: Decimal("12.68")})
            status_port = free_port(8780)
            text = SITE.format(broker_port=broker_port, protocol=protocol, workdir=wd, tty=bridge.gateway_port, modbus_port=modbus_port,
                               wind_tty=wind.path, sl651_port=sl651_port, status_port=status_port)
            (wd / "site.toml").write_text(text)
            cfg = parse(text, str(wd / "site.toml"), base=wd)
            rtu = SimServer([SimSlave(1), SimSlave(2), SimSlave(3)], serial={"port": bridge.device_port, "baudrate": 9600})
            tcp = SimServer([SimSlave(1)], tcp=("127.0.0.1", modbus_port))
            await rtu.start()
            await tcp.start()
            wind.start()
            station.start()
            print(f"yujing demo: broker {broker_name} on 127.0.0.1:{broker_port}; RS-485 bus on {bridge.gateway_port}; "
                  f"Modbus TCP on 127.0.0.1:{modbus_port}; anemometer on {wind.path}; SL 651 centre on 127.0.0.1:{sl651_port}; config {wd / 'site.toml'}", file=sys.stderr, flush=True)
            print(f"yujing demo: try `{yujing_command()} consume --broker 127.0.0.1:{broker_port} --protocol {protocol}` in another terminal"
                  + (f"; stopping after {duration:g}s" if duration else "; Ctrl-C stops"), file=sys.stderr, flush=True)
            print(f"yujing demo: the site at a glance: open http://127.0.0.1:{status_port}/ in a browser, or run "
                  f"`{yujing_command()} status {wd / 'site.toml'}`", file=sys.stderr, flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            import signal

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            gateway = Gateway(cfg)
            schema = load_schema()
            decoder = Decoder(validate=(lambda b: schema.validate_cbor(b)) if schema is not None else None)
            counts = {"readings": 0, "alarms": 0}

            async def consumer() -> None:
                client = aiomqtt.Client("127.0.0.1", broker_port, identifier="yujing-demo-consumer",
                                        protocol=aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311)
                async with client:
                    await client.subscribe("yujing/v1/#", qos=1)
                    async for m in client.messages:
                        res = decoder.feed(str(m.topic), bytes(m.payload))
                        for n in res.notices:
                            print(f"yujing demo: {n}", file=sys.stderr, flush=True)
                        for rec in res.records:
                            counts["readings" if "point" in rec else "alarms"] += 1
                            _print_reading(rec)

            servers = {"rs485-a": rtu, "plc": tcp}
            try:
                async with asyncio.TaskGroup() as tg:
                    cons = tg.create_task(consumer(), name="consumer")
                    await asyncio.sleep(0.3)  # the consumer subscribes before the first birth
                    anim = tg.create_task(_animate(cfg, servers, stop), name="animate")
                    gw = tg.create_task(gateway.run(stop), name="gateway")
                    if duration:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), duration)
                        stop.set()
                    await gw
                    await anim
                    await asyncio.sleep(0.3)  # let the death reach the consumer
                    cons.cancel()
            finally:
                await rtu.stop()
                await tcp.stop()
                bridge.close()
                wind.close()
                station.close()
            print(f"yujing demo: done — {gateway.readings} readings polled, {counts['readings']} readings and "
                  f"{counts['alarms']} alarm events decoded by the consumer, session {gateway.session}", file=sys.stderr, flush=True)
    return 0
