"""Modbus transports (TCP and RTU over a serial port) on pymodbus's async clients.

The only module that touches pymodbus. It moves one request at a time and translates every failure
into `DeviceError` (a quality code: the device is there but this read failed) or `TransportError`
(the port or connection is gone). Retries, pacing and device state belong to the bus scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerRTU
from pymodbus.pdu import ModbusPDU

from .base import DeviceError, TransportError, serial_open_failure
from .model import Quality, modbus_exception_quality

from .registers import Table

# pymodbus logs every timeout at ERROR; the scheduler logs state changes instead.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


@dataclass(frozen=True, slots=True)
class TcpSettings:
    host: str
    port: int = 502
    timeout_s: float = 1.0


@dataclass(frozen=True, slots=True)
class SerialSettings:
    port: str
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: int = 1
    timeout_s: float = 0.3
    reply_guard_s: float = 0.0  # after each reply, listen this long; a second reply makes the transaction bad


def _crc(frame: bytes) -> bytes:
    return FramerRTU.compute_CRC(frame).to_bytes(2, "big")


class Transport(Protocol):
    name: str

    async def connect(self) -> None:
        """Open the port or connection; raises TransportError."""

    async def read(self, table: Table, address: int, count: int, unit: int) -> list[int] | list[bool]:
        """One read. Returns exactly `count` registers or bits; raises DeviceError or TransportError."""

    async def write_coil(self, address: int, value: bool, unit: int) -> None:
        """One coil write (FC 5); raises DeviceError or TransportError."""

    async def write_register(self, address: int, value: int, unit: int) -> None:
        """One holding-register write (FC 6); raises DeviceError or TransportError."""

    def close(self) -> None:
        """Release the port; safe to call twice."""


class ModbusTransport:
    """A pymodbus client with one request in flight at a time and translated errors."""

    def __init__(self, name: str, settings: TcpSettings | SerialSettings) -> None:
        self.name = name
        self.settings = settings
        self._rx_bytes = 0
        self._failed: dict[int, tuple[float, str]] = {}  # unit → when its last request failed, and which (serial)
        self._answered: dict[int, float] = {}  # unit → when it last answered (serial)
        self._heard: deque[tuple[float, bytes]] = deque(maxlen=64)  # what came in lately, and when (serial)
        # An RTU line has no transaction ids: the late, doubled and foreign replies below are its troubles only
        self._serial = isinstance(settings, SerialSettings)
        if isinstance(settings, TcpSettings):
            self._client = AsyncModbusTcpClient(
                settings.host,
                port=settings.port,
                timeout=settings.timeout_s,
                retries=0,
                reconnect_delay=0,
                trace_packet=self._trace,
            )
        else:
            self._client = AsyncModbusSerialClient(
                settings.port,
                framer=FramerType.RTU,
                baudrate=settings.baudrate,
                bytesize=settings.bytesize,
                parity=settings.parity,
                stopbits=settings.stopbits,
                timeout=settings.timeout_s,
                retries=0,
                reconnect_delay=0,
                trace_packet=self._trace,
            )

    def _trace(self, sending: bool, data: bytes) -> bytes:
        # Bytes that arrive but never make a valid response mean CRC/framing trouble, not silence.
        if not sending:
            self._rx_bytes += len(data)
            if self._serial:
                self._heard.append((time.monotonic(), data))
        return data

    def _another_master(self, unit: int, since: float, reply: ModbusPDU) -> bool:
        """Whether a read request to `unit` that is not ours was heard since `since` (serial). Another master is
        talking to that slave then, and the reply just taken may be the answer to its request: an RTU reply names no
        register, so one of the same shape decodes without complaint (hil_tests/test_line_faults.py, "rogue"). Its
        request may be byte for byte one of ours: ours are not heard (an adapter that echoes them would need
        pymodbus's handle_local_echo, which this transport does not set)."""
        body = bytes([unit, reply.function_code]) + reply.encode()
        heard = b"".join(d for t, d in self._heard if t >= since).replace(body + _crc(body), b"", 1)  # less the reply
        return any(heard[i] == unit and heard[i + 1] in (1, 2, 3, 4) and _crc(heard[i : i + 6]) == heard[i + 6 : i + 8]
                   for i in range(len(heard) - 7))

    @property
    def connected(self) -> bool:
        return bool(self._client.connected)

    async def connect(self) -> None:
        try:
            ok = await self._client.connect()
        except (OSError, ModbusException) as exc:
            if isinstance(self.settings, SerialSettings):
                raise TransportError(f"{self.name}: {serial_open_failure(self.settings.port, exc)}") from exc
            raise TransportError(f"{self.name}: cannot connect to {self._where()}: {exc}") from exc
        if not ok:
            # pymodbus does not say why; for a serial port the OS is asked (missing adapter? the dialout group?)
            if isinstance(self.settings, SerialSettings):
                raise TransportError(f"{self.name}: {serial_open_failure(self.settings.port)}")
            raise TransportError(f"{self.name}: cannot connect to {self._where()}")

    def _where(self) -> str:
        s = self.settings
        return f"{s.host}:{s.port}" if isinstance(s, TcpSettings) else s.port

    async def read(self, table: Table, address: int, count: int, unit: int) -> list[int] | list[bool]:
        c = self._client
        call, fc = {
            Table.COIL: (c.read_coils, 1),
            Table.DISCRETE: (c.read_discrete_inputs, 2),
            Table.HOLDING: (c.read_holding_registers, 3),
            Table.INPUT: (c.read_input_registers, 4),
        }[table]
        what = f"read {table.value} {address}+{count}"
        response = await self._execute(lambda: call(address, count=count, device_id=unit), what, unit, fc)
        values = response.bits if table.is_bits else response.registers
        if len(values) < count:
            raise DeviceError(Quality.FRAMING, f"{self.name} unit {unit}: short reply, {len(values)} of {count}")
        if len(values) != (8 * ((count + 7) // 8) if table.is_bits else count):
            # Too long for this request: the answer to another (another master's read of more registers)
            raise self._untrusted(unit, what, f"a reply of {len(values)} values")
        return list(values[:count])

    async def write_coil(self, address: int, value: bool, unit: int) -> None:
        what = f"write coil {address}"
        await self._execute(lambda: self._client.write_coil(address, value, device_id=unit), what, unit, 5)

    async def write_register(self, address: int, value: int, unit: int) -> None:
        what = f"write register {address}"
        await self._execute(lambda: self._client.write_register(address, value, device_id=unit), what, unit, 6)

    async def _execute(self, call: Callable[[], Awaitable[ModbusPDU]], what: str, unit: int, fc: int) -> ModbusPDU:
        if not self._client.connected:
            await self.connect()
        failed = self._failed.pop(unit, None)
        if failed is not None and failed[1] != what:
            # An RTU reply names no request: a reply that comes after its timeout would be taken as the answer
            # to the next, different request to that unit (another address: a wrong value of quality good;
            # hil_tests/test_line_faults.py). So that request waits until the failed one's timeout has passed
            # once more; what arrives meanwhile finds no request waiting, and pymodbus drops it. A retry of the
            # same request needs no wait (a late answer is still its answer), nor does another unit (pymodbus
            # checks the unit id).
            quiet = failed[0] + self.settings.timeout_s - time.monotonic()
            if quiet > 0:
                await asyncio.sleep(quiet)
        self._rx_bytes = 0
        sent_at = time.monotonic()
        try:
            response = await self._call_cancellable(call, what)
        except ModbusIOException as exc:
            quality = Quality.FRAMING if self._rx_bytes else Quality.TIMEOUT
            if self._serial and (self._rx_bytes or time.monotonic() - self._answered.get(unit, -1e9) < 60):
                # Only a unit that talks can answer late: an absent one (a relay module not fitted) must not
                # slow the bus down with waits for replies that will never come.
                self._failed[unit] = (time.monotonic(), what)
            raise DeviceError(quality, f"{self.name} unit {unit}: {what}: {'bad frame' if self._rx_bytes else 'no answer'}") from exc
        except ConnectionException as exc:
            raise TransportError(f"{self.name}: connection lost during {what}: {exc}") from exc
        except ModbusException as exc:
            raise DeviceError(Quality.FRAMING, f"{self.name} unit {unit}: {what}: {exc}") from exc
        except OSError as exc:
            raise TransportError(f"{self.name}: {what}: {exc}") from exc
        if self._serial:
            # pymodbus matches an RTU reply by unit id only. A reply to another function (another master's read of
            # the input registers, say) or too long for the request is not its answer; nor, perhaps, one taken while
            # another master's request to the same slave was on the line (within a timeout before ours, or since).
            if response.function_code & 0x7F != fc:
                raise self._untrusted(unit, what, f"a reply to function {response.function_code & 0x7F}")
            if self._another_master(unit, sent_at - self.settings.timeout_s, response):
                raise self._untrusted(unit, what, "another master's request to this unit was heard")
        guard = self.settings.reply_guard_s if isinstance(self.settings, SerialSettings) else 0.0
        if guard > 0:
            # A reply that comes twice would be taken as the answer to the next request to this unit (an RTU
            # reply names no request). A line that does that is not trusted for this transaction either.
            heard = self._rx_bytes
            await asyncio.sleep(guard)
            if self._rx_bytes > heard:
                raise DeviceError(Quality.FRAMING, f"{self.name} unit {unit}: {what}: more bytes followed the reply "
                                                   f"within reply_guard_s ({self._rx_bytes - heard}); reading not trusted")
        self._answered[unit] = time.monotonic()
        if response.isError():
            code = getattr(response, "exception_code", 0)
            raise DeviceError(modbus_exception_quality(code), f"{self.name} unit {unit}: {what}: Modbus exception {code}")
        return response

    def _untrusted(self, unit: int, what: str, problem: str) -> DeviceError:
        """A reply that is not (surely) the answer to this request; its own answer may still come, so a different
        request to that unit waits until it has passed by, as after a timeout."""
        if self._serial:
            self._failed[unit] = (time.monotonic(), what)
        return DeviceError(Quality.FRAMING, f"{self.name} unit {unit}: {what}: {problem}; reading not trusted")

    async def _call_cancellable(self, call: Callable[[], Awaitable[ModbusPDU]], what: str) -> ModbusPDU:
        try:
            return await call()
        except (ModbusException, OSError):
            # pymodbus waits with asyncio.wait_for, which on CPython 3.11 can turn a cancellation that
            # races the response timeout into a timeout (gh-86296). A stopping gateway must stop.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError(f"{self.name}: cancelled during {what}") from None
            raise

    def close(self) -> None:
        self._client.close()
