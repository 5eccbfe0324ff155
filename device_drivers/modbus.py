"""Modbus transports (TCP and RTU over a serial port) on pymodbus's async clients.

The only module that touches pymodbus. It moves one request at a time and translates every failure
into `DeviceError` (a quality code: the device is there but this read failed) or `TransportError`
(the port or connection is gone). Retries, pacing and device state belong to the bus scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
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
        return data

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
        call = {
            Table.COIL: c.read_coils,
            Table.DISCRETE: c.read_discrete_inputs,
            Table.HOLDING: c.read_holding_registers,
            Table.INPUT: c.read_input_registers,
        }[table]
        response = await self._execute(lambda: call(address, count=count, device_id=unit), f"read {table.value} {address}+{count}", unit)
        values = response.bits if table.is_bits else response.registers
        if len(values) < count:
            raise DeviceError(Quality.FRAMING, f"{self.name} unit {unit}: short reply, {len(values)} of {count}")
        return list(values[:count])

    async def write_coil(self, address: int, value: bool, unit: int) -> None:
        await self._execute(lambda: self._client.write_coil(address, value, device_id=unit), f"write coil {address}", unit)

    async def write_register(self, address: int, value: int, unit: int) -> None:
        await self._execute(lambda: self._client.write_register(address, value, device_id=unit), f"write register {address}", unit)

    async def _execute(self, call: Callable[[], Awaitable[ModbusPDU]], what: str, unit: int) -> ModbusPDU:
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
        try:
            response = await self._call_cancellable(call, what)
        except ModbusIOException as exc:
            quality = Quality.FRAMING if self._rx_bytes else Quality.TIMEOUT
            if isinstance(self.settings, SerialSettings) and (self._rx_bytes or time.monotonic() - self._answered.get(unit, -1e9) < 60):
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
        guard = getattr(self.settings, "reply_guard_s", 0.0)
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
