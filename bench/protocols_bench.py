"""Protocol benchmark: prints figures, asserts nothing. Run: .venv/bin/python bench/protocols_bench.py [--quick]

1. SL 651: frames decoded per second, (a) the codec alone (decode_frame + decode_report of the standard's
   three frames), (b) the whole centre path: a byte stream in 4 kB reads through the deframer and the
   centre driver (station lookup, password, dedup, readings, the confirm frame), on one core;
2. serial line: NMEA sentences per second through the framer, the checksum and the field conversion;
3. SMS: the latency from an alarm transition (the rule's event, in the gateway) to the modem's `+CMGS`
   for the first recipient, with a simulated modem on a real pseudo-terminal and a real Modbus TCP
   detector; median and maximum over several alarms. The modem answers at once, so this is the gateway's
   own share; a real modem adds its network time (typically 2-5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import free_port, start_mosquitto  # noqa: E402
from device_drivers import sl651  # noqa: E402

VECTORS = [bytes.fromhex(h) for h in (
    "7E7E010053010001123432002B020001250715080000F1F100530100014BF0F02507150800201900012526190035603B23019523843812126803FA37",
    "7E7E0100530100011234330027020002250715081512F1F100530100014BF0F025071508153B230195412045200000000438121261036054",
    "7E7E010010100001A00032002B02000C200724172349F1F1001010000148F0F020072417232019000130221900004039230000055038121268038397",
)]


def _rate(prepare, count: int, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Items per second of what `prepare(count)` returns to run (preparing the input is not timed)."""
    runs = []
    for _ in range(repeats):
        run = prepare(count)
        t = time.perf_counter()
        run()
        runs.append(count / (time.perf_counter() - t))
    return statistics.median(runs)


def sl651_codec(count: int):  # type: ignore[no-untyped-def]
    def run() -> None:
        for i in range(count):
            frame = sl651.decode_frame(VECTORS[i % 3])
            sl651.decode_report(frame.body)

    return run


def sl651_centre(count: int):  # type: ignore[no-untyped-def]
    from fuzz.targets import SL651_CENTRE_SITE, _fuzz_site
    from device_drivers.drivers.sl651 import SL651Driver

    cfg = _fuzz_site(SL651_CENTRE_SITE)  # a station "0053010001" with ZU, PJ and ZT bit 2

    driver = SL651Driver(cfg.buses[0], cfg.devices)
    base = sl651.decode_frame(VECTORS[0])
    report = sl651.decode_report(base.body)
    # distinct serials, so that the dedup delivers every one (a repeated frame is only confirmed)
    frames = [sl651.encode_frame(sl651.Frame(True, 1, base.station, base.password, 0x32,
                                             sl651.encode_report(sl651.Report(s, report.sent, report.station, report.station_class,
                                                                              report.observed, report.values)), sl651.ETX))
              for s in range(1, count + 1)]
    stream = b"".join(frames)
    delivered = []

    class Link:
        def now_ms(self) -> int:
            return 1_780_000_000_000

    async def feed() -> None:
        deframer = sl651.Deframer()
        for i in range(0, len(stream), 4096):
            for f in deframer.feed(stream[i : i + 4096]):
                driver._frame(f, lambda name, readings: delivered.append(len(readings)), Link())  # type: ignore[arg-type]

    def run() -> None:
        loop = asyncio.new_event_loop()  # the driver reads the loop's clock
        try:
            loop.run_until_complete(feed())
        finally:
            loop.close()
        assert len(delivered) == count, (len(delivered), count)

    return run


def serial_lines(count: int):  # type: ignore[no-untyped-def]
    from fuzz.targets import SERIAL_LINE_SITE, _fuzz_site
    from device_drivers.drivers.serial_line import _values
    from device_drivers.lines import LineFramer
    from gateway.sim.stations import mwv_sentence

    cfg = _fuzz_site(SERIAL_LINE_SITE)  # devices[0]: an NMEA anemometer, streamed

    device = cfg.devices[0]
    stream = b"".join(mwv_sentence(i % 360, (i % 200) / 10) for i in range(count))
    framer = LineFramer(device.spec.terminator, device.spec.max_line)

    def run() -> None:
        n = 0
        for i in range(0, len(stream), 4096):
            for line in framer.feed(stream[i : i + 4096]):
                _values(device, device.spec.format.fields(line))
                n += 1
        assert n == count

    return run


SMS_SITE = """
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
port = {modbus}

[[devices]]
name = "lel1"
bus = "plc"
unit = 1
interval_s = 0.2
  [[devices.points]]
  name = "conc"
  address = 0
  scale = 0.1
  unit = "%LEL"

[[rules]]
kind = "threshold"
id = "gas.lel1"
point = "lel1.conc"
levels = [ {{ level = "III_YELLOW", set = 25, clear = 23 }} ]

[[uplinks]]
kind = "sms"
name = "duty"
port = "{modem}"
level = "III_YELLOW"
fold_s = 0
max_per_hour = 100
recipients = [ {{ name = "值班长", number = "+8613900000001" }} ]
"""


async def sms_latency(workdir: Path, broker_port: int, alarms: int) -> list[float]:
    from gateway.uplink import base as uplinks
    from gateway.app import Gateway
    from gateway.sim.devices import SimServer, SimSlave
    from gateway.sim.modem import SimModem
    from tests.e2e import running, site

    raised_at: list[float] = []
    original = uplinks.EventFanout.append_events

    def spy(self, events):  # type: ignore[no-untyped-def]
        for e in events:
            if e.kind in ("raised", "escalated"):
                raised_at.append(time.monotonic())
        original(self, events)

    async def until(predicate) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 15
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError("no text within 15 s")
            await asyncio.sleep(0.005)

    uplinks.EventFanout.append_events = spy  # type: ignore[method-assign]  # bench instrumentation only
    modem = SimModem()
    modem.start()
    modbus = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", modbus))
    await server.start()
    latencies = []
    try:
        cfg = site(broker_port, workdir, SMS_SITE.format(modbus=modbus, modem=modem.path))
        point = cfg.devices[0].points[0]
        await server.set_point(1, point, 5)
        async with running(Gateway(cfg)) as gw:
            await until(lambda: gw.readings > 2)
            for _ in range(alarms):
                texts, events = len(modem.accepted_at), len(raised_at)
                await server.set_point(1, point, 30)
                await until(lambda: len(modem.accepted_at) > texts and len(raised_at) > events)
                latencies.append(modem.accepted_at[texts] - raised_at[events])
                await server.set_point(1, point, 5)
                await asyncio.sleep(0.8)  # cleared
    finally:
        await server.stop()
        modem.close()
        uplinks.EventFanout.append_events = original  # type: ignore[method-assign]
    return latencies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short runs (for a smoke check, not for figures)")
    args = ap.parse_args()
    n = 2_000 if args.quick else 20_000
    repeats = 3 if args.quick else 5
    print(f"SL 651 codec: {_rate(sl651_codec, n, repeats):,.0f} frames/s decoded (frame + report body, median of {repeats})")
    print(f"SL 651 centre: {_rate(sl651_centre, n, repeats):,.0f} reports/s through deframer → driver → readings + confirm")
    print(f"serial line: {_rate(serial_lines, n * 5, repeats):,.0f} NMEA sentences/s framed, checked and converted")
    with tempfile.TemporaryDirectory(prefix="yujing-bench-") as tmp:
        broker, port = start_mosquitto(Path(tmp))
        try:
            lat = asyncio.run(sms_latency(Path(tmp), port, 3 if args.quick else 10))
        finally:
            broker.terminate()
            broker.wait(5)
    print(f"SMS: alarm event → modem +CMGS: median {statistics.median(lat) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms "
          f"over {len(lat)} alarms (simulated modem on a pty, answering at once)")


if __name__ == "__main__":
    main()
