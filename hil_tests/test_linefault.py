"""The RS-485 line-fault layer itself (hil_tests/linefault.py): a canned slave on the device side, raw bytes on the
gateway side, through real pseudo-terminals."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from .linefault import FaultyLine

pytestmark = pytest.mark.hil

REQUEST = bytes.fromhex("010300010001d5ca")  # unit 1, read holding 1, count 1
REPLY = bytes.fromhex("01030204d2") + b""  # unit 1, 2 bytes, 0x04d2 (CRC appended below)


def crc(frame: bytes) -> bytes:
    c = 0xFFFF
    for b in frame:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
    return bytes([c & 0xFF, c >> 8])


REPLY = REPLY + crc(REPLY)


class Rig:
    """The line with a slave that answers every request with REPLY, and the gateway's end read with timestamps."""

    def __init__(self, seed: int) -> None:
        self.line = FaultyLine(seed=seed, baudrate=19200)
        self.got: list[tuple[float, bytes]] = []

    async def __aenter__(self) -> Rig:
        self.line.start()
        loop = asyncio.get_running_loop()
        os.set_blocking(self.line.slave_a, False)
        os.set_blocking(self.line.slave_b, False)
        loop.add_reader(self.line.slave_b, self._slave)
        loop.add_reader(self.line.slave_a, self._gateway)
        return self

    async def __aexit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.line.slave_b)
        loop.remove_reader(self.line.slave_a)
        self.line.close()

    def _slave(self) -> None:
        data = os.read(self.line.slave_b, 4096)
        for _ in range(len(data) // len(REQUEST)):
            os.write(self.line.slave_b, REPLY)

    def _gateway(self) -> None:
        self.got.append((time.monotonic(), os.read(self.line.slave_a, 4096)))

    async def ask(self, wait: float = 0.08) -> list[tuple[float, bytes]]:
        self.got.clear()
        os.write(self.line.slave_a, REQUEST)
        await asyncio.sleep(wait)
        return list(self.got)


async def test_a_clean_line_passes_replies_untouched() -> None:
    async with Rig(1) as rig:
        for _ in range(5):
            got = await rig.ask()
            assert b"".join(b for _, b in got) == REPLY
        assert rig.line.stats.requests == 5 and rig.line.stats.responses == 5


async def test_flipped_bits_break_the_crc() -> None:
    async with Rig(2) as rig:
        rig.line.set(flip_rate=1.0)
        for _ in range(10):
            data = b"".join(b for _, b in await rig.ask())
            assert len(data) == len(REPLY) and data != REPLY
            assert crc(data[:-2]) != data[-2:]  # CRC-16 catches every 1..3 bit error
        assert rig.line.applied["flip"] == 10


async def test_a_split_reply_has_a_gap_longer_than_three_and_a_half_characters() -> None:
    async with Rig(3) as rig:
        rig.line.set(split_rate=1.0)
        for _ in range(5):
            got = await rig.ask()
            assert b"".join(b for _, b in got) == REPLY
            assert len(got) == 2, got
            assert got[1][0] - got[0][0] > 3.5 * rig.line.char_s


async def test_late_twice_and_disconnected() -> None:
    async with Rig(4) as rig:
        rig.line.set(late_rate=1.0, late_s=(0.2, 0.2))
        began = time.monotonic()
        got = await rig.ask(0.3)
        assert got and got[0][0] - began >= 0.19 and b"".join(b for _, b in got) == REPLY
        rig.line.clear()
        rig.line.set(twice_rate=1.0, twice_gap_s=(0.02, 0.02))
        got = await rig.ask(0.1)
        assert b"".join(b for _, b in got) == REPLY + REPLY
        rig.line.clear()
        rig.line.start_disconnect()
        assert await rig.ask(0.1) == []
        rig.line.reconnect()
        assert b"".join(b for _, b in await rig.ask()) == REPLY
        rig.line.start_disconnect(units={2})  # another unit's stub: unit 1 still answers
        assert b"".join(b for _, b in await rig.ask()) == REPLY
        kinds = [e.kind for e in rig.line.events]
        assert kinds == ["set", "late", "clear", "set", "twice", "clear", "disconnect", "reconnect", "disconnect"]
        assert all(a.t <= b.t for a, b in zip(rig.line.events, rig.line.events[1:]))


async def test_noise_goes_between_frames() -> None:
    async with Rig(5) as rig:
        rig.line.set(noise_rate=50.0)
        await asyncio.sleep(0.3)
        assert rig.line.applied.get("noise", 0) > 3
        assert rig.got  # noise reached the gateway's end with nobody asking


async def test_the_same_seed_replays_the_same_faults() -> None:
    async def run(seed: int) -> list[tuple[str, dict]]:
        async with Rig(seed) as rig:
            rig.line.set(flip_rate=0.3, split_rate=0.3, twice_rate=0.3, twice_gap_s=(0.001, 0.002))
            for _ in range(20):
                await rig.ask(0.02)
            return [(e.kind, e.detail) for e in rig.line.events if e.kind != "set"]

    a, b, c = await run(11), await run(11), await run(12)
    assert a == b and a
    assert a != c


async def test_noise_before_a_reply_comes_after_the_request_and_before_the_reply() -> None:
    async with Rig(6) as rig:
        rig.line.set(noise_before_rate=1.0)
        got = await rig.ask()
        data = b"".join(b for _, b in got)
        assert data.endswith(REPLY) and len(data) > len(REPLY)
        assert len(got) == 2 and got[1][0] - got[0][0] > 3.5 * rig.line.char_s
