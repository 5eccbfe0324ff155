"""A stopping gateway stops, even when a library loses a cancellation (CPython 3.11 wait_for, gh-86296)."""

from __future__ import annotations

import asyncio

import pytest
from pymodbus.exceptions import ModbusIOException

from device_drivers.modbus import ModbusTransport, TcpSettings
from gateway.app import stop_tasks


async def _timeout_instead_of_cancel() -> None:
    # What pymodbus's wait_for does when the cancellation and its response timeout race.
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        raise ModbusIOException("No response received") from None


async def test_a_cancelled_modbus_call_is_cancelled_even_if_pymodbus_reports_a_timeout() -> None:
    transport = ModbusTransport("plc", TcpSettings("127.0.0.1", 1))
    task = asyncio.create_task(transport._call_cancellable(_timeout_instead_of_cancel, "read holding 0+1"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_real_timeout_is_still_a_timeout() -> None:
    transport = ModbusTransport("plc", TcpSettings("127.0.0.1", 1))

    async def timeout() -> None:
        raise ModbusIOException("No response received")

    with pytest.raises(ModbusIOException):
        await transport._call_cancellable(timeout, "read holding 0+1")


async def test_stop_tasks_cancels_again_a_task_that_swallowed_its_cancellation() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed == 0:  # lose the first cancellation, as the wait_for race does
                    swallowed += 1
                    continue
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.01)
    await asyncio.wait_for(stop_tasks([task], retry_s=0.05), 2)
    assert task.cancelled() and swallowed == 1
