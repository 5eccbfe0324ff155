"""The RS-485 line-fault layer itself (hil_tests/linefault.py): a canned slave on the device side, raw bytes on the
gateway side, through real pseudo-terminals."""

from __future__ import annotations

import asyncio
import os
import random
import time
from fractions import Fraction

import pytest

from .linefault import (
    FaultyLine,
    Uart,
    collide,
    deliver,
    receive,
    resample,
    transmit,
    wire,
)
from .linefault import _crc as crc  # the Modbus RTU CRC-16 the line checks frames with

pytestmark = pytest.mark.hil

REQUEST = bytes.fromhex("010300010001d5ca")  # unit 1, read holding 1, count 1
REPLY = bytes.fromhex("01030204d2")  # unit 1, 2 bytes, 0x04d2
REPLY += crc(REPLY)


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


# -- the UART model: a wrong baud rate or parity, and two transmitters at once ----------------------------------

N1 = Uart(19200)


def test_identical_settings_are_the_identity() -> None:
    data = bytes(random.Random(1).getrandbits(8) for _ in range(64)) + b"\x00\xff\x55\xaa"
    for u in (Uart(9600), Uart(19200, "E"), Uart(19200, "O"), Uart(38400, "N", 2), Uart(4800, "E", 2)):
        assert resample(data, u, u) == data, u
        assert all(not (c.framing_error or c.parity_error) for c in receive(wire(transmit(data, u)), u)), u


def test_a_byte_sent_at_9600_is_two_garbage_bytes_at_19200() -> None:
    # 0x55 at 9600 8N1 is 0 1010 1010 1 (start, data LSB first, stop), each bit two bit times at 19200. The receiver
    # samples at 0.25, 0.75, 1.25, ... 9600-bit times: data 0,1,1,0,0,1,1,0 = 0x66, stop at 4.75 reads bit 4 (0): a
    # framing error; the next edge is bit 6, sampled at 6.75 ... : 0,1,1,0,0,1,1,1 = 0xe6, stop (idle) 1.
    chars = receive(wire(transmit(b"\x55", Uart(9600))), N1)
    assert [(c.byte, c.framing_error) for c in chars] == [(0x66, True), (0xE6, False)]
    assert resample(b"\x55", Uart(9600), N1) == b"\x66\xe6"
    assert resample(b"\x55", Uart(9600), N1, errors="drop") == b"\xe6"  # a driver that drops characters with errors
    # 0xff: the start bit spans the first two samples (the second is data bit 0), all else is 1
    assert resample(b"\xff", Uart(9600), N1) == b"\xfe"


def test_a_wrong_baud_rate_garbles_every_request_both_ways() -> None:
    for rx in (Uart(9600), Uart(4800), Uart(38400), Uart(57600)):
        got = resample(REQUEST, N1, rx)
        assert got != REQUEST and REQUEST not in got, rx
        assert crc(got[:-2]) != got[-2:], rx  # no slave would act on it
    assert len(resample(REQUEST, N1, Uart(9600))) < len(REQUEST) < len(resample(REQUEST, N1, Uart(38400)))


def test_parity_only_a_longer_character_than_expected_shifts_the_framing() -> None:
    # 8N1 characters back to back, taken by an 8E1 receiver: it reads the stop bit as parity and the next start bit
    # as its stop bit (a framing error), then hunts for an edge inside the next character: garbage after byte one.
    got = resample(REQUEST, N1, Uart(19200, "E"))
    assert got[0] == REQUEST[0] and got != REQUEST and crc(got[:-2]) != got[-2:]
    assert any(c.framing_error for c in receive(wire(transmit(REQUEST, N1)), Uart(19200, "E")))
    # The other way, the parity bit is read as the stop bit and the real stop bit as idle: the bytes come through
    # (a framing error where the parity bit is 0, which Linux delivers as the byte sampled).
    assert resample(REQUEST, Uart(19200, "E"), N1) == REQUEST
    assert resample(REQUEST, Uart(19200, "O"), N1) == REQUEST
    # Two stop bits against one are harmless both ways (only the first stop bit is checked).
    assert resample(REQUEST, N1, Uart(19200, "N", 2)) == REQUEST == resample(REQUEST, Uart(19200, "N", 2), N1)


def test_two_transmitters_are_a_wired_and() -> None:
    a, b = REQUEST, bytes.fromhex("010300140001c40e")
    bits = N1.bits_per_char
    assert collide(a, b, Fraction(0), N1) == bytes(x & y for x, y in zip(a, b))  # in step: bit for bit AND
    assert collide(a, a, Fraction(0), N1) == a
    assert collide(a, b, Fraction(len(a) * bits), N1) == a + b  # one after the other: no collision
    assert collide(a, b, Fraction(len(a) * bits), N1, deaf_first=True) == b  # the sender of a hears only b
    assert collide(a, b, Fraction(-len(b) * bits), N1) == b + a
    garbled = collide(a, b, Fraction(37, 16), N1)  # out of step by a fraction of a bit
    assert garbled not in (a, b) and crc(garbled[:-2]) != garbled[-2:]
    assert deliver(receive(wire(), N1)) == b""
    with pytest.raises(ValueError):
        Uart(9600, "X")


async def test_a_slave_at_another_baud_rate_never_answers_and_its_replies_are_garbled() -> None:
    async with Rig(7) as rig:
        rig.line.set(units={1}, uart=Uart(9600))
        assert await rig.ask() == []  # the slave took garbage (no valid frame): no answer
        heard = [e.detail["heard"] for e in rig.line.events if e.kind == "uart"]
        assert heard == [resample(REQUEST, N1, Uart(9600)).hex()]
        # A reply the mis-set slave sends anyway is taken by the gateway's UART at 19200.
        rig.got.clear()
        os.write(rig.line.slave_b, REPLY)
        await asyncio.sleep(0.05)
        assert b"".join(b for _, b in rig.got) == resample(REPLY, Uart(9600), N1) != REPLY
        rig.line.set(uart=Uart(19200, "N", 2))  # two stop bits: still understood
        assert b"".join(b for _, b in await rig.ask()) == REPLY
        rig.line.set(units={2}, uart=Uart(9600))  # another unit mis-set: unit 1 unaffected
        assert b"".join(b for _, b in await rig.ask()) == REPLY
        rig.line.clear()
        assert b"".join(b for _, b in await rig.ask()) == REPLY


async def test_a_second_master_on_an_idle_line_is_heard_and_answered() -> None:
    async with Rig(8) as rig:
        rig.line.set(units={1}, rogue_rate=40.0, rogue_fcs=(3,), rogue_addresses=(20,), rogue_count=(1, 1))
        await asyncio.sleep(0.3)
        rig.line.clear()
        await asyncio.sleep(0.05)
        idle = [e for e in rig.line.events if e.kind == "rogue_idle"]
        assert len(idle) >= 3
        rogue = bytes.fromhex(idle[0].detail["request"])
        assert rogue == bytes.fromhex("010300140001c40e")  # unit 1, read holding 20, one register, a valid CRC
        heard = b"".join(b for _, b in rig.got)
        assert heard.count(rogue) == len(idle) and heard.count(REPLY) == len(idle)  # its request, then the answer
        assert rig.line.stats.requests == 0  # the gateway asked nothing


async def test_a_second_master_that_starts_with_a_request_or_a_reply_garbles_both() -> None:
    async with Rig(9) as rig:
        rig.line.set(rogue_rate=100.0, rogue_collide=1.0)
        seen: dict[str, bool] = {}
        for _ in range(20):
            await asyncio.sleep(0.03)  # the rogue is waiting for the next frame
            got = b"".join(b for _, b in await rig.ask())
            hits = [e for e in rig.line.events if e.kind.startswith("rogue_on")]
            if not hits:
                continue
            e = hits[-1]
            rig.line.events.clear()
            d = e.detail
            rogue, offset = bytes.fromhex(d["rogue"]), Fraction(d["offset_bits"]).limit_denominator(16)
            if e.kind == "rogue_on_request":  # the slave took garbage and said nothing; the gateway heard the rest
                assert d["slaves_heard"] != REQUEST.hex() and got == bytes.fromhex(d["gateway_heard"])
                assert got == collide(REQUEST, rogue, offset, N1, deaf_first=True)
            else:  # the request went through; the reply met the rogue's request on the line
                assert e.kind == "rogue_on_reply" and got == bytes.fromhex(d["heard"]) != REPLY
                assert got == collide(REPLY, rogue, offset, N1)
            seen[e.kind] = True
        assert set(seen) == {"rogue_on_request", "rogue_on_reply"}


async def test_the_second_master_replays_with_the_seed() -> None:
    async def run(seed: int) -> list[str]:
        async with Rig(seed) as rig:
            rig.line.set(rogue_rate=30.0)
            await asyncio.sleep(0.3)
            return [e.detail["request"] for e in rig.line.events if e.kind == "rogue_idle"]

    a, b, c = await run(21), await run(21), await run(22)
    n = min(len(a), len(b), len(c))  # how many moments fit in 0.3 s depends on the machine; their order does not
    assert n >= 3 and a[:n] == b[:n] and a[:n] != c[:n]
