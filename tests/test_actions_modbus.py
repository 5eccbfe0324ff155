"""Coil actions against real pymodbus servers, through a real BusScheduler and ModbusTransport over TCP.

The relay module is a SimSlave (unit 10, as on the slope site); a sensor on unit 1 is polled on the same bus
so that we can see polling carry on while the relay module is dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from device_drivers.drivers.modbus import ModbusDevice, ModbusDriver
from device_drivers.modbus import TcpSettings
from device_drivers.registers import PointSpec, Table
from gateway.app import stop_tasks
from gateway.actions import ActionController, ActuatorEvent, parse_actions
from gateway.clock import SystemClock
from gateway.config import BusConfig, DeviceConfig
from gateway.model import Quality, Reading
from gateway.poll.bus import BusScheduler
from gateway.rules.levels import Level
from gateway.sim.devices import SimServer, SimSlave
from tests.conftest import free_port

RELAY = 10
SENSOR = 1
SIREN = PointSpec(name="siren", table=Table.COIL, address=0, type="bool")

ORANGE = {"gas.lel1": Level.II_ORANGE, "gas.lel2": Level.NONE, "res.zu": Level.NONE}
YELLOW = {"gas.lel1": Level.III_YELLOW, "gas.lel2": Level.NONE, "res.zu": Level.NONE}
QUIET = {"gas.lel1": Level.NONE, "gas.lel2": Level.NONE, "res.zu": Level.NONE}


def coil_actions(extra: list[dict] | None = None) -> tuple:
    raw = [{
        "kind": "coil", "name": "siren", "bus": "plc", "unit": RELAY, "address": 0,
        "when": {"rules": ["gas.*"], "level": "orange"},
    }, *(extra or [])]
    return parse_actions(raw, buses={"plc": "tcp"}, rule_ids=list(QUIET))


@dataclass
class Rig:
    """A scheduler polling the sensor every `interval_s`, and the readings it produced."""

    scheduler: BusScheduler
    readings: list[Reading] = field(default_factory=list)

    def good_sensor_readings(self) -> int:
        return sum(1 for r in self.readings if r.quality == Quality.GOOD)


@contextlib.asynccontextmanager
async def bus(port: int, interval_s: float) -> AsyncIterator[Rig]:
    config = BusConfig(name="plc", kind="tcp", settings=TcpSettings("127.0.0.1", port, timeout_s=0.3))
    sensor = DeviceConfig(name="sensor", bus="plc", spec=ModbusDevice(SENSOR), interval_s=interval_s,
                          points=(PointSpec(name="lel", table=Table.HOLDING, address=0, type="uint16"),), retries=0)
    rig = Rig(None)  # type: ignore[arg-type]
    rig.scheduler = BusScheduler(config, [(sensor, 0)], ModbusDriver(config, [sensor]), SystemClock(), rig.readings.extend)
    task = asyncio.create_task(rig.scheduler.run(), name="bus-plc")
    try:
        yield rig
    finally:
        await stop_tasks([task])


@contextlib.asynccontextmanager
async def running(controller: ActionController) -> AsyncIterator[ActionController]:
    task = asyncio.create_task(controller.run(), name="actions")
    try:
        yield controller
    finally:
        await stop_tasks([task])
        controller.close()


async def until(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Poll `predicate` every 5 ms; return the time it took. Fails the test after `timeout` seconds."""
    start = time.monotonic()
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


class DroppingProxy:
    """A Modbus-TCP front for the server that swallows requests to `dead_units`, the way a TCP gateway does
    when the RS-485 slave behind it is unplugged: no answer at all, so the client times out."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.dead_units: set[int] = set()
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in self._writers:
                w.close()  # the handler's reads then end with IncompleteReadError
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def back() -> None:
            while data := await up_reader.read(4096):
                writer.write(data)
                await writer.drain()

        pump = asyncio.create_task(back())
        try:
            while True:
                header = await reader.readexactly(7)  # MBAP: transaction, protocol, length, unit
                body = await reader.readexactly(int.from_bytes(header[4:6], "big") - 1)
                if header[6] in self.dead_units:
                    self.dropped += 1
                    continue
                up_writer.write(header + body)
                await up_writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            pump.cancel()
            up_writer.close()
            writer.close()
            self._writers.discard(writer)


async def test_coil_follows_the_level_within_a_fraction_of_the_poll_interval() -> None:
    port = free_port()
    relay = SimSlave(RELAY, clock=time.monotonic)
    server = SimServer([SimSlave(SENSOR), relay], tcp=("127.0.0.1", port))
    await server.start()
    try:
        async with bus(port, interval_s=1.0) as rig:
            controller = ActionController(coil_actions(), {"plc": rig.scheduler}, SystemClock())
            async with running(controller):
                await until(lambda: rig.readings, 2.0, "the first poll")
                controller.update(YELLOW, ())  # below orange: the siren is asserted OFF, nothing more
                await until(lambda: relay.coil_writes, 1.0, "the initial OFF write")
                assert relay.coil_writes == [(0, False, relay.coil_writes[0][2])]
                assert await server.coil(RELAY, 0) is False

                await asyncio.sleep(0.1)  # just after a poll: the next one is ~0.9 s away
                t0 = time.monotonic()
                controller.update(ORANGE, ())
                await until(lambda: server.coil(RELAY, 0), 1.0, "the siren coil to go on")
                address, value, written_at = relay.coil_writes[-1]
                assert (address, value) == (0, True)
                # It did not wait for the bus's next poll (interval 1 s): the write went out at once.
                assert written_at - t0 < 0.25, f"coil written {written_at - t0:.3f}s after update()"

                controller.update(ORANGE, ())  # the same state again: nothing to write
                controller.update({**ORANGE, "res.zu": Level.I_RED}, ())  # a rule the action does not watch
                await asyncio.sleep(0.1)
                assert len(relay.coil_writes) == 2

                t1 = time.monotonic()
                controller.update(YELLOW, ())
                await until(lambda: not relay.coil_writes[-1][1], 1.0, "the siren coil to go off")
                assert relay.coil_writes[-1][2] - t1 < 0.25
                assert await server.coil(RELAY, 0) is False
                assert len(relay.coil_writes) == 3
                assert controller.faults == {}
                assert controller.status()["siren"]["applied"] is False
    finally:
        await server.stop()


async def test_silent_relay_module_faults_retries_and_recovers_while_polling_goes_on() -> None:
    server_port = free_port()
    relay = SimSlave(RELAY)
    server = SimServer([SimSlave(SENSOR), relay], tcp=("127.0.0.1", server_port))
    await server.start()
    proxy = DroppingProxy(server_port)
    proxy.dead_units.add(RELAY)  # the relay module is unplugged
    await proxy.start()
    events: list[ActuatorEvent] = []
    try:
        async with bus(proxy.port, interval_s=0.2) as rig:
            controller = ActionController(coil_actions(), {"plc": rig.scheduler}, SystemClock(), on_event=events.append,
                                          backoff_min_s=0.1, backoff_max_s=0.4, write_timeout_s=2.0)
            async with running(controller):
                await until(lambda: rig.readings, 2.0, "the first poll")
                controller.update(ORANGE, ())
                await until(lambda: events, 2.0, "an actuator fault")
                assert [e.kind for e in events] == ["actuator_fault"]
                fault = events[0]
                assert fault.action == "siren" and abs(fault.ts_ms - time.time() * 1000) < 5000
                assert "bus plc unit 10 coil 0" in fault.message and "no answer" in fault.message, fault.message
                assert set(controller.faults) == {"siren"}

                attempts = controller.status()["siren"]["attempts"]
                polled = rig.good_sensor_readings()
                await asyncio.sleep(1.5)
                assert controller.status()["siren"]["attempts"] >= attempts + 2, "the write is retried"
                assert proxy.dropped >= 3
                assert rig.good_sensor_readings() >= polled + 4, "the sensor is still polled while the relay is dead"
                assert len(events) == 1, "one fault event per outage, not one per retry"
                assert await server.coil(RELAY, 0) is False

                proxy.dead_units.clear()  # plugged back in
                await until(lambda: len(events) >= 2, 2.0, "actuator_ok")
                assert [e.kind for e in events] == ["actuator_fault", "actuator_ok"]
                assert await server.coil(RELAY, 0) is True
                assert relay.coil_writes[-1][:2] == (0, True)
                assert controller.faults == {}
                assert controller.status()["siren"]["applied"] is True
    finally:
        await proxy.stop()
        await server.stop()


async def test_relay_unit_not_served_then_server_restarted_with_it() -> None:
    port = free_port()
    first = SimServer([SimSlave(SENSOR)], tcp=("127.0.0.1", port))  # no unit 10: the server answers an exception
    await first.start()
    events: list[ActuatorEvent] = []
    stopped = False
    try:
        async with bus(port, interval_s=0.2) as rig:
            controller = ActionController(coil_actions(), {"plc": rig.scheduler}, SystemClock(), on_event=events.append,
                                          backoff_min_s=0.1, backoff_max_s=0.4, write_timeout_s=2.0)
            async with running(controller):
                await until(lambda: rig.readings, 2.0, "the first poll")
                controller.update(ORANGE, ())
                await until(lambda: events, 2.0, "an actuator fault")
                assert events[0].kind == "actuator_fault"
                assert "bus plc unit 10 coil 0" in events[0].message and "Modbus exception" in events[0].message

                await first.stop()  # the whole Modbus-TCP gateway goes away, then comes back with the module
                stopped = True
                relay = SimSlave(RELAY)
                second = SimServer([SimSlave(SENSOR), relay], tcp=("127.0.0.1", port))
                await second.start()
                try:
                    await until(lambda: len(events) >= 2, 8.0, "actuator_ok")
                    assert [e.kind for e in events] == ["actuator_fault", "actuator_ok"]
                    assert await second.coil(RELAY, 0) is True
                    assert controller.faults == {}
                    polled = rig.good_sensor_readings()
                    await until(lambda: rig.good_sensor_readings() > polled, 2.0, "polling after the restart")
                finally:
                    await second.stop()
    finally:
        if not stopped:
            await first.stop()


async def test_reasserts_a_coil_changed_behind_its_back() -> None:
    port = free_port()
    relay = SimSlave(RELAY)
    server = SimServer([SimSlave(SENSOR), relay], tcp=("127.0.0.1", port))
    await server.start()
    try:
        async with bus(port, interval_s=0.5) as rig:
            controller = ActionController(coil_actions(), {"plc": rig.scheduler}, SystemClock(), reassert_s=0.3)
            async with running(controller):
                controller.update(ORANGE, ())
                await until(lambda: server.coil(RELAY, 0), 1.0, "the siren coil to go on")
                writes = len(relay.coil_writes)
                # The module rebooted (or someone switched the relay by hand): the coil is off again.
                await server.set_raw(RELAY, SIREN, False)
                assert await server.coil(RELAY, 0) is False
                took = await until(lambda: server.coil(RELAY, 0), 1.5, "the reassert to switch it back on")
                assert took < 0.6
                assert len(relay.coil_writes) > writes and all(v for _, v, _ in relay.coil_writes[writes:])
    finally:
        await server.stop()


async def test_a_dead_relay_module_does_not_delay_a_gpio_output() -> None:
    from gpiozero.pins.mock import MockFactory

    server_port = free_port()
    server = SimServer([SimSlave(SENSOR), SimSlave(RELAY)], tcp=("127.0.0.1", server_port))
    await server.start()
    proxy = DroppingProxy(server_port)
    proxy.dead_units.add(RELAY)  # every coil write waits for the 0.3 s timeout
    await proxy.start()
    factory = MockFactory()
    try:
        async with bus(proxy.port, interval_s=0.2) as rig:
            configs = coil_actions([{"kind": "gpio", "name": "board.siren", "pin": 17, "when": {"rules": ["gas.lel1"], "level": "II_ORANGE"}}])
            controller = ActionController(configs, {"plc": rig.scheduler}, SystemClock(), pin_factory=factory)
            async with running(controller):
                controller.update(ORANGE, ())
                took = await until(lambda: factory.pin(17).state, 0.5, "the GPIO pin to go high")
                assert took < 0.1, f"the pin waited {took:.3f}s"
                assert "siren" not in controller.faults, "the coil write is still waiting for its answer"
                await until(lambda: "siren" in controller.faults, 2.0, "the coil fault")
                assert "board.siren" not in controller.faults
                assert factory.pin(17).state is True
    finally:
        await proxy.stop()
        await server.stop()
