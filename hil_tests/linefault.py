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
    line.start_disconnect(units={1})        # nobody answers (the request never reaches the slave); units=None: the whole line
    await line.disconnect(5.0, units=None)  # … for 5 s, then reconnected
    line.clear()                            # a clean line again
    line.events                             # FaultEvent(t=time.monotonic(), kind, detail) for every change and every
                                            # fault applied to a frame (with the frame's unit and index)

Every random choice comes from one `random.Random(seed)`, split into sub-streams: one for the frame faults (each
reply frame draws the same six numbers whichever faults are on, so the n-th reply meets the same dice in every
run with that seed), one for the noise schedule and its bytes. The faults may change at any time; a reply already
scheduled goes out as it was decided. Each slave's replies keep their order (a late reply delays that slave's next
ones); another slave's are not held back. Noise goes out only while no reply is being sent.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from gateway.sim.ptybridge import PtyBridge

from .netfault import FaultEvent


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
        self.baudrate = baudrate
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
        self._pending: set[asyncio.TimerHandle] = set()

    # -- life cycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        super().start()
        self.t0 = time.monotonic()

    def close(self) -> None:
        if self._noise_handle is not None:
            self._noise_handle.cancel()
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
            if isinstance(v, (int, float)) and v < 0:
                raise ValueError(f"{k} = {v}: must be >= 0")
            if k.endswith("_rate") and k != "noise_rate" and v > 1:
                raise ValueError(f"{k} = {v}: a probability per frame, 0..1")
        if units is not True:
            changes["units"] = None if units is None else frozenset(units)  # type: ignore[arg-type]
        self.faults = replace(self.faults, **changes)
        defaults = LineFaults()
        self._log("set", **{k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in asdict(self.faults).items()
                            if v != getattr(defaults, k)})
        self._schedule_noise()
        return self.faults

    def clear(self) -> None:
        """A clean line: no frame faults, no noise, everybody connected."""
        self.faults = LineFaults()
        self.disconnected = False
        self._schedule_noise()
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

    def _request(self, frame: bytes) -> None:
        if self._cut_off(frame[0]):
            self.stats.requests += 1
            self.stats.per_unit[frame[0]] = self.stats.per_unit.get(frame[0], 0) + 1
            self.stats.dropped += 1
            self._awaiting = None
            return
        super()._request(frame)

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

