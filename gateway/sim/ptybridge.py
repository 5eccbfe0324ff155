"""A virtual RS-485 line between two pseudo-terminals, with a view of the wire.

The gateway opens one end, a simulated slave (a pymodbus serial server) the other, and real bytes
flow through real ttys, as they do through `socat pty,raw pty,raw`. Unlike socat, the bridge can act
as a dead slave (swallow requests to some unit ids), corrupt a reply's CRC, and check that the
master never starts a request while another is still on the wire.
"""

from __future__ import annotations

import asyncio
import os
import termios
import tty
from dataclasses import dataclass, field


def _request_length(buf: bytes) -> int | None:
    """Length of the RTU request at the start of buf, or None if more bytes are needed."""
    if len(buf) < 2:
        return None
    fc = buf[1]
    if fc in (1, 2, 3, 4, 5, 6):
        return 8
    if fc in (15, 16):
        return 9 + buf[6] if len(buf) >= 7 else None
    return len(buf)  # unknown function: pass through what we have


@dataclass
class WireStats:
    requests: int = 0
    responses: int = 0
    overlaps: int = 0  # a request started while the previous one still awaited its response
    dropped: int = 0
    per_unit: dict[int, int] = field(default_factory=dict)


class PtyBridge:
    def __init__(self, *, response_timeout: float = 1.0) -> None:
        self.master_a, self.slave_a = os.openpty()
        self.master_b, self.slave_b = os.openpty()
        for fd in (self.slave_a, self.slave_b, self.master_a, self.master_b):
            tty.setraw(fd, termios.TCSANOW)
        os.set_blocking(self.master_a, False)
        os.set_blocking(self.master_b, False)
        self.gateway_port = os.ttyname(self.slave_a)
        self.device_port = os.ttyname(self.slave_b)
        self.dead_units: set[int] = set()
        self.corrupt_units: set[int] = set()
        self.stats = WireStats()
        self.response_timeout = response_timeout
        self._buf = b""
        self._awaiting: int | None = None  # unit whose response is pending
        self._awaiting_since = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.master_a, self._from_gateway)
        self._loop.add_reader(self.master_b, self._from_device)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.master_a)
            self._loop.remove_reader(self.master_b)
            self._loop = None
        for fd in (self.master_a, self.master_b, self.slave_a, self.slave_b):
            try:
                os.close(fd)
            except OSError:
                pass

    def _read(self, fd: int) -> bytes:
        try:
            return os.read(fd, 4096)
        except (BlockingIOError, OSError):
            return b""

    def _from_gateway(self) -> None:
        self._buf += self._read(self.master_a)
        while (n := _request_length(self._buf)) is not None and len(self._buf) >= n:
            frame, self._buf = self._buf[:n], self._buf[n:]
            self._request(frame)

    def _request(self, frame: bytes) -> None:
        now = asyncio.get_running_loop().time()
        unit = frame[0]
        if self._awaiting is not None and now - self._awaiting_since < self.response_timeout:
            self.stats.overlaps += 1
        self.stats.requests += 1
        self.stats.per_unit[unit] = self.stats.per_unit.get(unit, 0) + 1
        if unit in self.dead_units:
            self.stats.dropped += 1
            self._awaiting = None
            return
        self._awaiting, self._awaiting_since = unit, now
        os.write(self.master_b, frame)

    def _from_device(self) -> None:
        data = self._read(self.master_b)
        if not data:
            return
        if self._awaiting in self.corrupt_units:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])  # break the CRC
        self.stats.responses += 1
        self._awaiting = None
        os.write(self.master_a, data)
