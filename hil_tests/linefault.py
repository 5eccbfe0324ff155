"""Seeded, replayable faults on the simulated RS-485 line (issue 11, the RS-485 part).

`FaultyLine` is a `gateway.sim.ptybridge.PtyBridge` (two pseudo-terminals: the gateway's serial port on one,
pymodbus RTU slaves on the other) whose forwarding can go wrong the ways a real RS-485 line does:

    line = FaultyLine(seed=7, baudrate=19200)          # line.gateway_port / line.device_port as for PtyBridge
    line.start()
    line.set(flip_rate=0.5)                 # per reply frame: 1..3 bits flipped (the CRC no longer matches)
    line.set(split_rate=0.5)                # per reply frame: cut in two by a gap of more than 3.5 character times
    line.set(late_rate=0.5, late_s=(0.12, 0.35))   # per reply frame: held back this long (past the gateway's timeout)
    line.set(twice_rate=0.5, twice_gap_s=(0.005, 0.05))   # per reply frame: sent again after this gap
    line.set(noise_rate=4.0)                # bursts of 1..8 random bytes per second towards the gateway, between frames
    line.set(noise_before_rate=0.5)         # per reply frame: a burst between the request and the reply
    line.set(units={1})                     # frame faults hit only the replies of these units (None: every unit)
    line.set(units={1}, uart=Uart(9600))    # these slaves' UARTs are set otherwise (baud rate, parity, stop bits):
                                            # requests and replies reach the other side as that UART samples them
    line.set(rogue_rate=4.0, rogue_collide=0.3)   # a second master: seeded read requests to `units` (or anybody)
                                            # that collide with the gateway's frames or go into idle time
    line.start_disconnect(units={1})        # nobody answers (the request never reaches the slave); units=None: the whole line
    await line.disconnect(5.0, units=None)  # … for 5 s, then reconnected
    line.clear()                            # a clean line again
    line.events                             # FaultEvent(t=time.monotonic(), kind, detail) for every change and every
                                            # fault applied to a frame (with the frame's unit and index)

Every random choice comes from one `random.Random(seed)`, split into sub-streams: one for the frame faults (each
reply frame draws the same six numbers whichever faults are on, so the n-th reply meets the same dice in every
run with that seed), one for the noise schedule and its bytes, one for the second master's moments and requests
(what a rogue request meets, idle line or a frame, depends on the gateway's timing, as for noise). The faults may
change at any time; a reply already scheduled goes out as it was decided. Each slave's replies keep their order
(a late reply delays that slave's next ones); another slave's are not held back. Noise goes out only while no
reply is being sent.

A wrong baud rate or parity and two transmitters at once are worked out bit by bit (`Uart`, `resample`, `collide`
below): what the receiving UART would deliver is what the other end of the pty gets. Garbage that reaches the slaves'
side is dropped unless it is a frame with a valid CRC, as a real slave drops it at the next silence.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from typing import Any

from gateway.sim.ptybridge import PtyBridge

from .netfault import FaultEvent

# -- the UART at bit level: a wrong baud rate or parity, and two transmitters at once -----------------------------
#
# A pty carries bytes, not symbols, so what a mis-set UART makes of a frame is computed here, bit by bit, as the
# receiving UART would sample it, and the bytes it would deliver are what the other end of the pty gets.
#
# The transmitter sends a frame's characters back to back: start bit (0), 8 data bits LSB first, the parity bit
# (if any), the stop bit(s) (1); the idle line is 1. Two transmitters on the line at once are a wired-AND: the line
# is 0 while either drives a 0 (on RS-485 two drivers that disagree give an undefined level; taking the 0 is the
# usual model and deterministic). The receiver hunts for a falling edge, checks the start bit at its middle (a 1
# there is a false start: it hunts again from that point), samples each further bit at its middle at its OWN rate,
# checks only the first stop bit, and hunts for the next edge after that sample; after a framing error (stop bit
# read 0) it waits for the line to go 1 and then 0, as a UART does. Edges are taken at their exact time (a real UART
# finds them to 1/16 bit; that changes nothing at the ratios used here).
#
# What it delivers: Linux with pyserial's settings (as pymodbus opens the port, client and server: INPCK off,
# IGNPAR and PARMRK off) hands over every character as sampled, framing or parity error or not ("keep"). A driver
# that discards characters with errors is errors="drop". Times are exact fractions of a second: the model is
# deterministic (no floats), and identical settings on both sides give back the bytes sent.


@dataclass(frozen=True)
class Uart:
    """A UART's character format (8 data bits, as Modbus RTU has): baud rate, parity N/E/O, 1 or 2 stop bits."""

    baudrate: int
    parity: str = "N"
    stopbits: int = 1

    def __post_init__(self) -> None:
        if self.baudrate <= 0:
            raise ValueError(f"Uart baudrate = {self.baudrate}: must be > 0")
        if self.parity not in ("N", "E", "O"):
            raise ValueError(f"Uart parity = {self.parity!r}: 'N', 'E' or 'O'")
        if self.stopbits not in (1, 2):
            raise ValueError(f"Uart stopbits = {self.stopbits}: 1 or 2")

    @property
    def bits_per_char(self) -> int:
        return 1 + 8 + (self.parity != "N") + self.stopbits

    @property
    def bit(self) -> Fraction:
        return Fraction(1, self.baudrate)

    def __str__(self) -> str:
        return f"{self.baudrate} 8{self.parity}{self.stopbits}"


def _parity(byte: int, parity: str) -> int:
    ones = byte.bit_count() & 1
    return ones if parity == "E" else 1 - ones  # even: data + parity bit hold an even number of 1s


Lows = list[tuple[Fraction, Fraction]]  # the intervals (seconds) in which the line is 0; 1 elsewhere


def transmit(data: bytes, uart: Uart, at: Fraction = Fraction(0)) -> Lows:
    """The intervals in which a UART sending `data` back to back from time `at` drives the line to 0."""
    lows: Lows = []
    t, bit = at, uart.bit
    for b in data:
        bits = [0, *((b >> i) & 1 for i in range(8))]
        if uart.parity != "N":
            bits.append(_parity(b, uart.parity))
        bits.extend([1] * uart.stopbits)
        for level in bits:
            if level == 0:
                if lows and lows[-1][1] == t:
                    lows[-1] = (lows[-1][0], t + bit)
                else:
                    lows.append((t, t + bit))
            t += bit
    return lows


def wire(*transmitters: Lows, deaf: tuple[Fraction, Fraction] | None = None) -> Lows:
    """The line as one receiver hears it: the transmitters wired-AND (0 wins), and, if `deaf` is given, 1 during
    that interval (a half-duplex transceiver whose receiver is off while its own driver is on)."""
    spans = sorted(iv for lows in transmitters for iv in lows)
    if deaf is not None:
        a, b = deaf
        cut: Lows = []
        for lo, hi in spans:
            if lo < a:
                cut.append((lo, min(hi, a)))
            if hi > b:
                cut.append((max(lo, b), hi))
        spans = sorted(cut)
    out: Lows = []
    for lo, hi in spans:
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


@dataclass(frozen=True)
class Char:
    """One character as a receiving UART took it."""

    byte: int
    framing_error: bool  # the stop bit was read as 0
    parity_error: bool  # the parity bit disagreed (only with parity on)


def receive(lows: Lows, uart: Uart) -> list[Char]:
    """The characters a UART set to `uart` takes from the line `lows` (merged, sorted, as `wire` returns)."""
    starts = [lo for lo, _ in lows]

    def level(t: Fraction) -> int:
        i = bisect.bisect_right(starts, t) - 1
        return 0 if i >= 0 and t < lows[i][1] else 1

    out: list[Char] = []
    bit = uart.bit
    ready = None  # the receiver hunts for the first edge after this time (None: from the beginning)
    while True:
        i = 0 if ready is None else bisect.bisect_right(starts, ready)
        if i >= len(starts):
            return out
        edge = starts[i]  # a falling edge: a low interval begins (the line was 1 just before)
        if level(edge + bit / 2) != 0:
            ready = edge + bit / 2  # a false start: too short a 0
            continue
        byte = sum(level(edge + (Fraction(3, 2) + k) * bit) << k for k in range(8))
        n = 9
        parity_error = False
        if uart.parity != "N":
            parity_error = level(edge + (n + Fraction(1, 2)) * bit) != _parity(byte, uart.parity)
            n += 1
        ready = edge + (n + Fraction(1, 2)) * bit
        out.append(Char(byte, level(ready) == 0, parity_error))


def deliver(chars: list[Char], errors: str = "keep") -> bytes:
    """What the receiving side reads from its port: every character ("keep"), or only those without errors."""
    if errors not in ("keep", "drop"):
        raise ValueError(f"errors = {errors!r}: 'keep' or 'drop'")
    return bytes(c.byte for c in chars if errors == "keep" or not (c.framing_error or c.parity_error))


def resample(data: bytes, tx: Uart, rx: Uart, errors: str = "keep") -> bytes:
    """What a UART set to `rx` delivers of a frame sent by a UART set to `tx` (identical settings: `data`)."""
    return deliver(receive(wire(transmit(data, tx)), rx), errors)


def collide(first: bytes, second: bytes, offset_bits: Fraction, uart: Uart, *, deaf_first: bool = False,
            errors: str = "keep") -> bytes:
    """What a receiver delivers when `second` starts `offset_bits` bit times after `first` (negative: before) on
    one line; `deaf_first`: the receiver is the sender of `first` and hears nothing while it sends."""
    a = transmit(first, uart)
    b = transmit(second, uart, offset_bits * uart.bit)
    deaf = (Fraction(0), len(first) * uart.bits_per_char * uart.bit) if deaf_first else None
    return deliver(receive(wire(a, b, deaf=deaf), uart), errors)


@dataclass(frozen=True)
class LineFaults:
    """The faults in force on the line. Rates are probabilities per reply frame, except noise (bursts per second)."""

    flip_rate: float = 0.0
    flip_bits: tuple[int, int] = (1, 3)  # how many bits one corrupted frame gets (CRC-16 catches every 1..3 bit error)
    split_rate: float = 0.0
    split_gap_chars: tuple[float, float] = (5.0, 40.0)  # the gap, in character times at the line's baud rate (> 3.5)
    late_rate: float = 0.0
    late_s: tuple[float, float] = (0.15, 0.35)
    twice_rate: float = 0.0
    twice_gap_s: tuple[float, float] = (0.005, 0.05)
    noise_rate: float = 0.0
    noise_before_rate: float = 0.0  # per reply frame: a noise burst on the line just before it (after the request)
    noise_bytes: tuple[int, int] = (1, 8)
    units: frozenset[int] | None = None  # whose replies the frame faults hit; None: everybody's
    uart: Uart | None = None  # the UART setting of the slaves in `units` (wrong baud rate or parity); None: the line's
    rogue_rate: float = 0.0  # a second master on the line: its requests per second, at seeded moments
    rogue_collide: float = 0.0  # per rogue request on an idle line: it starts together with the next frame instead
    rogue_fcs: tuple[int, ...] = (3, 4)  # it only reads (a rogue that writes would change what the slaves hold)
    rogue_addresses: tuple[int, ...] = tuple(range(32))
    rogue_count: tuple[int, int] = (1, 2)


def _crc(frame: bytes) -> bytes:
    c = 0xFFFF
    for b in frame:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
    return bytes([c & 0xFF, c >> 8])


def _is_frame(data: bytes) -> bool:
    """Whether data is one RTU frame with a valid CRC (what a slave acts on; garbage it drops at the next silence)."""
    return len(data) >= 4 and _crc(data[:-2]) == data[-2:]


def _reply_length(buf: bytes) -> int | None:
    """Length of the RTU reply at the start of buf, or None if more bytes are needed."""
    if len(buf) < 3:
        return None
    fc = buf[1]
    if fc & 0x80:
        return 5
    if fc in (1, 2, 3, 4):
        return 5 + buf[2]
    if fc in (5, 6, 15, 16):
        return 8
    return len(buf)  # unknown: pass through what we have


class FaultyLine(PtyBridge):
    def __init__(self, *, seed: int = 0, baudrate: int = 9600, bits_per_char: int = 10, response_timeout: float = 1.0) -> None:
        super().__init__(response_timeout=response_timeout)
        self.seed = seed
        self.rng = random.Random(seed)
        self._frame_rng = random.Random(self.rng.getrandbits(64))
        self._noise_rng = random.Random(self.rng.getrandbits(64))
        self._rogue_rng = random.Random(self.rng.getrandbits(64))
        self.baudrate = baudrate
        self.uart = Uart(baudrate)  # the master's setting, and every slave's unless `faults.uart` says otherwise
        self.char_s = bits_per_char / baudrate
        self.faults = LineFaults()
        self.disconnected: frozenset[int] | None | bool = False  # False: connected; None: the whole line; a set: those units
        self.events: list[FaultEvent] = []
        self.frames = 0  # reply frames seen from the slaves
        self.applied: dict[str, int] = {}  # fault kind → frames it hit
        self.t0 = time.monotonic()
        self._dbuf = b""
        self._out_at: dict[int, float] = {}  # unit → loop time when its last scheduled write to the gateway goes out
        self._noise_handle: asyncio.TimerHandle | None = None
        self._rogue_handle: asyncio.TimerHandle | None = None
        self._armed: tuple[bytes, float, str] | None = None  # a rogue request waiting to start with the next request
                                                             # or reply (and where in it, 0..1)
        self._pending: set[asyncio.TimerHandle] = set()

    # -- life cycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        super().start()
        self.t0 = time.monotonic()

    def close(self) -> None:
        if self._noise_handle is not None:
            self._noise_handle.cancel()
        if self._rogue_handle is not None:
            self._rogue_handle.cancel()
        for h in self._pending:
            h.cancel()
        self._pending.clear()
        super().close()

    def _log(self, kind: str, **detail: Any) -> None:
        self.events.append(FaultEvent(time.monotonic(), kind, detail))

    def report(self, t0: float | None = None) -> list[dict[str, Any]]:
        """The events as JSON-ready dicts, `t` in seconds since t0 (default: the line started)."""
        return [e.as_dict(self.t0 if t0 is None else t0) for e in self.events]

    # -- the fault controls -------------------------------------------------------------------------------------

    def set(self, *, units: set[int] | frozenset[int] | None | bool = True, **changes: Any) -> LineFaults:
        """Change faults; unnamed fields keep their value (`units` too, unless given)."""
        for k, v in changes.items():
            if not hasattr(self.faults, k) or k == "units":
                raise TypeError(f"unknown fault {k!r}")
            if k == "uart" and v is not None and not isinstance(v, Uart):
                raise TypeError(f"uart = {v!r}: a Uart or None")
            if isinstance(v, (int, float)) and v < 0:
                raise ValueError(f"{k} = {v}: must be >= 0")
            if k.endswith("_rate") and k not in ("noise_rate", "rogue_rate") and v > 1:
                raise ValueError(f"{k} = {v}: a probability per frame, 0..1")
        if units is not True:
            changes["units"] = None if units is None else frozenset(units)  # type: ignore[arg-type]
        self.faults = replace(self.faults, **changes)
        defaults = LineFaults()
        self._log("set", **{k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in asdict(self.faults).items()
                            if v != getattr(defaults, k)})
        self._schedule_noise()
        self._schedule_rogue()
        return self.faults

    def clear(self) -> None:
        """A clean line: no frame faults, no noise, everybody connected."""
        self.faults = LineFaults()
        self.disconnected = False
        self._armed = None
        self._schedule_noise()
        self._schedule_rogue()
        self._log("clear")

    def start_disconnect(self, units: set[int] | None = None) -> None:
        """From now on the requests (to `units`, or to anybody) never reach a slave: no answer at all."""
        self.disconnected = None if units is None else frozenset(units)
        self._log("disconnect", units="all" if units is None else sorted(units))

    def reconnect(self) -> None:
        self.disconnected = False
        self._log("reconnect")

    async def disconnect(self, seconds: float, units: set[int] | None = None) -> None:
        self.start_disconnect(units)
        await asyncio.sleep(seconds)
        self.reconnect()

    # -- the wire -----------------------------------------------------------------------------------------------

    def _cut_off(self, unit: int) -> bool:
        d = self.disconnected
        return d is None or (d is not False and unit in d)  # type: ignore[operator]

    def _uart_of(self, unit: int) -> Uart | None:
        """The setting of that slave's UART if it differs from the line's."""
        f = self.faults
        if f.uart is None or f.uart == self.uart or not (f.units is None or unit in f.units):
            return None
        return f.uart

    def _request(self, frame: bytes) -> None:
        unit = frame[0]
        if self._cut_off(unit):
            self.stats.requests += 1
            self.stats.per_unit[unit] = self.stats.per_unit.get(unit, 0) + 1
            self.stats.dropped += 1
            self._awaiting = None
            return
        if self._armed is not None and self._armed[2] == "request":
            self._collide_request(frame)
            return
        uart = self._uart_of(unit)
        if uart is None:
            super()._request(frame)
            return
        # The addressed slave takes the request as its mis-set UART samples it (the others, set right, hear the
        # request intact and ignore it: it is not theirs; the mis-set slave's reading of their requests is not
        # modelled).
        heard = resample(frame, self.uart, uart)
        self._sent(unit)
        self._hit("uart", unit, -1, direction="request", uart=str(uart), sent=frame.hex(), heard=heard.hex())
        self._to_slaves(heard)

    def _sent(self, unit: int) -> None:
        """The PtyBridge's bookkeeping for a request from the gateway to `unit`."""
        now = asyncio.get_running_loop().time()
        if self._awaiting is not None and now - self._awaiting_since < self.response_timeout:
            self.stats.overlaps += 1
        self.stats.requests += 1
        self.stats.per_unit[unit] = self.stats.per_unit.get(unit, 0) + 1
        self._awaiting, self._awaiting_since = unit, now

    def _to_slaves(self, data: bytes) -> None:
        # A slave acts on a frame with a valid CRC and drops garbage at the next silence of 3.5 characters. The
        # pymodbus server would keep garbage in its buffer and lose the next good request with it (it does not time
        # the line), so what is not a frame is dropped here, on its behalf.
        if _is_frame(data):
            try:
                os.write(self.master_b, data)
            except OSError:
                pass

    def _from_device(self) -> None:
        data = self._read(self.master_b)
        if not data:
            return
        self._dbuf += data
        while (n := _reply_length(self._dbuf)) is not None and len(self._dbuf) >= n:
            frame, self._dbuf = self._dbuf[:n], self._dbuf[n:]
            self._reply(frame)

    def _reply(self, frame: bytes) -> None:
        self.stats.responses += 1
        self._awaiting = None
        index = self.frames
        self.frames += 1
        r = self._frame_rng
        # Always the same draws per frame, whichever faults are on: the n-th frame meets the same dice.
        d_flip, d_split, d_late, d_twice, d_noise, d_param = (r.random(), r.random(), r.random(), r.random(), r.random(),
                                                              r.random())
        pick = random.Random(int(d_param * 2**53))  # the details (which bits, how long) from the frame's own draw
        f = self.faults
        unit = frame[0]
        hit = f.units is None or unit in f.units
        loop = asyncio.get_running_loop()
        now = loop.time()
        delay = 0.0
        pieces: list[tuple[float, bytes]] = []
        out = bytearray(frame)
        if (uart := self._uart_of(unit)) is not None:
            heard = resample(frame, uart, self.uart)  # sent by the mis-set slave, taken by the line's UARTs
            self._hit("uart", unit, index, direction="reply", uart=str(uart), sent=frame.hex(), heard=heard.hex())
            out = bytearray(heard)
        if self._armed is not None and out:
            out = bytearray(self._collide_reply(bytes(out), unit, index))
        if not out:
            return
        if hit and d_flip < f.flip_rate:
            bits = sorted(pick.sample(range(len(out) * 8), pick.randint(*f.flip_bits)))
            for b in bits:
                out[b // 8] ^= 1 << (b % 8)
            self._hit("flip", unit, index, bits=bits)
        if hit and d_late < f.late_rate:
            delay = pick.uniform(*f.late_s)
            self._hit("late", unit, index, delay_s=round(delay, 4))
        if hit and d_split < f.split_rate and len(out) > 2:
            cut = pick.randint(1, len(out) - 1)
            gap = pick.uniform(*f.split_gap_chars) * self.char_s
            pieces = [(delay, bytes(out[:cut])), (delay + gap, bytes(out[cut:]))]
            self._hit("split", unit, index, at=cut, gap_s=round(gap, 5), gap_chars=round(gap / self.char_s, 1))
        else:
            pieces = [(delay, bytes(out))]
        if hit and d_noise < f.noise_before_rate:
            burst = bytes(pick.getrandbits(8) for _ in range(pick.randint(*f.noise_bytes)))
            gap = pick.uniform(4.0, 20.0) * self.char_s  # a gap of more than 3.5 characters before the reply
            pieces = [(delay, burst)] + [(o + gap, c) for o, c in pieces]
            self._hit("noise_before", unit, index, bytes=burst.hex(), gap_s=round(gap, 5))
        if hit and d_twice < f.twice_rate:
            gap = pick.uniform(*f.twice_gap_s)
            pieces.append((pieces[-1][0] + gap, bytes(out)))
            self._hit("twice", unit, index, gap_s=round(gap, 4))
        # In order per slave: a reply never overtakes an earlier one of the same unit (a late one delays those
        # after it). Another unit's reply is not held back by it: both go out when they are due.
        base = max(0.0, self._out_at.get(unit, 0.0) - now)
        for offset, chunk in pieces:
            when = now + base + offset
            self._out_at[unit] = max(self._out_at.get(unit, 0.0), when)
            if when <= now and not self._pending:
                self._write(chunk)
            else:
                self._schedule(when, chunk)

    def _hit(self, kind: str, unit: int, index: int, **detail: Any) -> None:
        self.applied[kind] = self.applied.get(kind, 0) + 1
        self._log(kind, unit=unit, frame=index, **detail)

    def _schedule(self, when: float, chunk: bytes) -> None:
        loop = asyncio.get_running_loop()
        holder: list[asyncio.TimerHandle] = []

        def fire() -> None:
            self._pending.discard(holder[0])
            self._write(chunk)

        h = loop.call_at(when, fire)
        holder.append(h)
        self._pending.add(h)

    def _write(self, chunk: bytes) -> None:
        try:
            os.write(self.master_a, chunk)
        except OSError:
            pass  # the line was closed under us

    # -- a second master -------------------------------------------------------------------------------------------

    def _schedule_rogue(self) -> None:
        if self._rogue_handle is not None:
            self._rogue_handle.cancel()
            self._rogue_handle = None
        if self.faults.rogue_rate > 0 and self._loop is not None:
            self._rogue_handle = self._loop.call_later(self._rogue_rng.expovariate(self.faults.rogue_rate), self._rogue)

    def _busy(self) -> bool:
        """Whether a transaction of the gateway is under way (its request out, its reply not yet back)."""
        now = asyncio.get_running_loop().time()
        awaiting = self._awaiting is not None and now - self._awaiting_since < 0.05
        return awaiting or bool(self._pending) or max(self._out_at.values(), default=0.0) > now

    def _rogue(self) -> None:
        """A moment at which the second master sends a request. It does not listen first: on a busy line (the
        gateway waiting for a reply) its request collides with the reply; on an idle line it goes out alone (and the
        slave answers it, to everybody) or, with probability rogue_collide, starts together with the gateway's next
        request or the reply to it (even odds). Each moment draws the same seven numbers."""
        self._rogue_handle = None
        r = self._rogue_rng
        d_mode, d_unit, d_fc, d_addr, d_count, d_offset, d_target = (r.random() for _ in range(7))
        f = self.faults
        units = sorted(f.units) if f.units is not None else (sorted(self.stats.per_unit) or [1])
        lo, hi = f.rogue_count
        unit = units[int(d_unit * len(units))]
        fc = f.rogue_fcs[int(d_fc * len(f.rogue_fcs))]
        address = f.rogue_addresses[int(d_addr * len(f.rogue_addresses))]
        count = lo + int(d_count * (hi - lo + 1))
        body = bytes([unit, fc]) + address.to_bytes(2, "big") + count.to_bytes(2, "big")
        frame = body + _crc(body)
        if self._armed is not None:
            pass  # it is still waiting to start with the next frame
        elif self._busy():
            self._armed = (frame, d_offset, "reply")
        elif d_mode < f.rogue_collide:
            self._armed = (frame, d_offset, "request" if d_target < 0.5 else "reply")
        else:
            self._to_slaves(frame)  # everybody hears it: the slaves (one answers) and the gateway
            self._write(frame)
            self._hit("rogue_idle", unit, -1, request=frame.hex())
        self._schedule_rogue()

    def _offset(self, first: bytes, second: bytes, draw: float) -> Fraction:
        """When the rogue's frame starts, in bit times after the other one's start, so that they overlap."""
        a, b = len(first) * self.uart.bits_per_char, len(second) * self.uart.bits_per_char
        return Fraction(round((1 - b + draw * (a + b - 2)) * 16), 16)

    def _collide_request(self, frame: bytes) -> None:
        assert self._armed is not None
        rogue, draw, _ = self._armed
        self._armed = None
        offset = self._offset(frame, rogue, draw)
        slaves = collide(frame, rogue, offset, self.uart)
        gateway = collide(frame, rogue, offset, self.uart, deaf_first=True)  # it hears only what is not its own sending
        self._sent(frame[0])
        self._hit("rogue_on_request", frame[0], -1, offset_bits=float(offset), rogue=rogue.hex(),
                  sent=frame.hex(), slaves_heard=slaves.hex(), gateway_heard=gateway.hex())
        self._to_slaves(slaves)
        if gateway:
            self._write(gateway)

    def _collide_reply(self, frame: bytes, unit: int, index: int) -> bytes:
        assert self._armed is not None
        rogue, draw, _ = self._armed
        self._armed = None
        offset = self._offset(frame, rogue, draw)
        heard = collide(frame, rogue, offset, self.uart)  # the gateway and the slaves hear the same
        self._hit("rogue_on_reply", unit, index, offset_bits=float(offset), rogue=rogue.hex(),
                  sent=frame.hex(), heard=heard.hex())
        self._to_slaves(heard)
        return heard

    # -- noise ----------------------------------------------------------------------------------------------------

    def _schedule_noise(self) -> None:
        if self._noise_handle is not None:
            self._noise_handle.cancel()
            self._noise_handle = None
        if self.faults.noise_rate > 0 and self._loop is not None:
            gap = self._noise_rng.expovariate(self.faults.noise_rate)
            self._noise_handle = self._loop.call_later(gap, self._noise)

    def _noise(self) -> None:
        self._noise_handle = None
        r = self._noise_rng
        burst = bytes(r.getrandbits(8) for _ in range(r.randint(*self.faults.noise_bytes)))
        loop = asyncio.get_running_loop()
        if self._pending or max(self._out_at.values(), default=0.0) > loop.time():
            pass  # a reply is being sent: noise goes between frames, so it waits for the next turn
        else:
            self._write(burst)
            self._hit("noise", -1, -1, bytes=burst.hex())
        self._schedule_noise()

