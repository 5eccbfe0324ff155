"""SL 651-2014 (水文监测数据通信规约), HEX/BCD encoding: frames, report bodies and element groups, both ways.
Pure, no I/O: the centre driver (device_drivers/drivers/sl651.py) and the station uplink
(gateway/uplink/sl651.py) use it, and it is tested against the standard's frames (docs/sl651.md).

Frame (§6.2, Table 20/21):

    7E 7E | centre (1) + station (5), swapped on a downlink | password (2) | function (1)
    | direction (4 bits: 0 up, 8 down) + body length (12 bits) | STX 02, or SYN 16 + total/sequence (3)
    | body | end: ETX 03 / ETB 17 (up), ENQ 05 / ACK 06 / EOT 04 / ESC 1B / NAK 15 (down)
    | CRC-16 (Modbus polynomial), high byte first, over everything before it

Report body (30H–37H): serial (2, HEX) · send time (6, BCD YYMMDDhhmmss) · F1 F1 station (5) · station
class (1) · F0 F0 observation time (5, BCD YYMMDDhhmm) · element groups. An element group is a leader
byte (the element's identifier), a definition byte (high 5 bits: data bytes; low 3 bits: decimals) and
the data: BCD, a leading FF byte for a negative number, all nibbles F for "no value"; a few elements are
binary (the element table, device_drivers/sl651_elements.toml, says which).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from pathlib import Path

START = b"\x7e\x7e"
STX, SYN = 0x02, 0x16
ETX, ETB, ENQ, ACK, EOT, ESC, NAK = 0x03, 0x17, 0x05, 0x06, 0x04, 0x1B, 0x15
UP_ENDS = (ETX, ETB)
DOWN_ENDS = (ENQ, ACK, EOT, ESC, NAK)

F_KEEPALIVE, F_TEST, F_INTERVAL, F_TIMED, F_ADDED, F_HOURLY, F_QUERY = 0x2F, 0x30, 0x31, 0x32, 0x33, 0x34, 0x37
REPORT_FUNCTIONS = (F_TEST, F_TIMED, F_ADDED, F_HOURLY, F_QUERY)
FUNCTION_NAMES = {0x2F: "keep-alive", 0x30: "test report", 0x31: "uniform-interval report", 0x32: "timed report",
                  0x33: "added report", 0x34: "hourly report", 0x37: "real-time query"}
MAX_BODY = 4095  # the length field has 12 bits


class SL651Error(ValueError):
    """A frame or body that does not follow the standard; the message says which byte and why."""


def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """CRC-16 with polynomial X^16 + X^15 + X^2 + 1 (reflected 0xA001, initial 0xFFFF), as Modbus. A byte
    at a time from a table: eight times faster than bit by bit, which matters to the deframer's budget."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for b in data:
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc


# ---------------------------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class Frame:
    up: bool  # station → centre
    centre: int  # 1..255
    station: str  # the 5-byte address as 10 hex digits (BCD digits for a hydrological station)
    password: int
    function: int
    body: bytes
    end: int
    packet: tuple[int, int] | None = None  # M3 multi-packet: (total, sequence), both 1..4095

    @property
    def last(self) -> bool:
        return self.end != ETB


def encode_frame(f: Frame) -> bytes:
    if len(f.body) > MAX_BODY:
        raise SL651Error(f"body of {len(f.body)} bytes; at most {MAX_BODY}")
    station = bytes.fromhex(f.station)
    if len(station) != 5:
        raise SL651Error(f"station address {f.station!r} is not 5 bytes")
    address = bytes([f.centre]) + station if f.up else station + bytes([f.centre])
    # Table 22: for SYN, the length counts every byte after SYN before the end character, so the 3 bytes
    # of packet total and sequence too.
    length = len(f.body) + (0 if f.packet is None else 3)
    if length > MAX_BODY:
        raise SL651Error(f"{length} bytes after STX/SYN; at most {MAX_BODY}")
    head = START + address + f.password.to_bytes(2, "big") + bytes([f.function]) + ((0 if f.up else 0x8000) | length).to_bytes(2, "big")
    if f.packet is None:
        head += bytes([STX])
    else:
        total, seq = f.packet
        head += bytes([SYN]) + ((total << 12) | seq).to_bytes(3, "big")
    data = head + f.body + bytes([f.end])
    return data + crc16(data).to_bytes(2, "big")


def decode_frame(data: bytes) -> Frame:
    """One whole frame (no bytes before or after). Raises SL651Error."""
    if len(data) < 17 or data[:2] != START:
        raise SL651Error(f"not an SL 651 HEX frame: {data[:8].hex()}")
    crc = crc16(data[:-2])
    if crc != int.from_bytes(data[-2:], "big"):
        raise SL651Error(f"CRC {data[-2:].hex()} does not match {crc:04x}")
    word = int.from_bytes(data[11:13], "big")
    up = word >> 12 == 0
    if word >> 12 not in (0, 8):
        raise SL651Error(f"direction nibble {word >> 12:x} (0 up, 8 down)")
    length = word & 0x0FFF
    marker = data[13]
    packet = None
    if len(data) != 14 + length + 3:
        raise SL651Error(f"length field says {length} bytes after STX/SYN, the frame holds {len(data) - 17}")
    if marker == SYN:
        if length < 3:
            raise SL651Error(f"SYN frame of length {length}: the 3 bytes of packet total and sequence are missing")
        count = int.from_bytes(data[14:17], "big")
        packet = (count >> 12, count & 0x0FFF)
        start = 17
    elif marker == STX:
        start = 14
    else:
        raise SL651Error(f"byte 13 is {marker:02x}, not STX 02 or SYN 16")
    end = data[14 + length]
    if end not in (UP_ENDS if up else DOWN_ENDS):
        raise SL651Error(f"end character {end:02x} is not one of {'ETX/ETB' if up else 'ENQ/ACK/EOT/ESC/NAK'}")
    if up:
        centre, station = data[2], data[3:8].hex().upper()
    else:
        station, centre = data[2:7].hex().upper(), data[7]
    return Frame(up, centre, station, int.from_bytes(data[8:10], "big"), data[10], bytes(data[start : 14 + length]), end, packet)


class Deframer:
    """Bytes from a stream in, whole frames out; noise between frames is skipped and counted. Bounded in
    memory (one frame's worth) and in CPU: checking candidate frames costs CRC work, and a stream built to
    make every other byte look like a frame start must not turn a few kilobytes into seconds on the event
    loop. So the work is paid for by the bytes that arrive (`WORK_PER_BYTE` CRC bytes each, saved up to
    a limit), the search for later frame starts resumes where it stopped, and at most `MAX_CANDIDATES`
    later starts are remembered. An honest stream never runs short: a frame brings the budget to check it."""

    WORK_PER_BYTE = 8
    MAX_CANDIDATES = 16

    def __init__(self, max_frame: int = MAX_BODY + 17) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame
        self.skipped = 0  # bytes of noise dropped
        self.bad: list[str] = []  # why the last rejected frames were rejected (bounded)
        self._budget = 0
        self._reset_scan()

    def _reset_scan(self) -> None:
        self._scan = 2  # where the search for later starts resumes
        self._candidates: list[tuple[int, int | None]] = []  # (start, end or None while its head is incomplete)

    def _drop(self, n: int) -> None:
        self.skipped += n
        del self._buf[:n]
        self._reset_scan()

    def _need(self, at: int) -> int:
        """The length of the frame starting at `at` (its 14-byte head must be here). Table 20/22: the length
        counts the bytes after STX or SYN up to the end character."""
        length = int.from_bytes(self._buf[at + 11 : at + 13], "big") & 0x0FFF
        return 14 + length + 3

    def _try(self, at: int, end: int) -> Frame | None:
        """Decode buf[at:end] (the caller checked that the budget pays for it); None if it is no frame."""
        self._budget -= end - at
        try:
            return decode_frame(bytes(self._buf[at:end]))
        except SL651Error as exc:
            self.bad = [*self.bad[-9:], str(exc)]
            return None

    def _complete_frame_after(self) -> int | None:
        """The position of a later start whose whole frame is already here and checks out, if any."""
        buf = self._buf
        while len(self._candidates) < self.MAX_CANDIDATES:
            j = buf.find(START, self._scan)
            if j < 0:
                self._scan = max(2, len(buf) - 1)
                break
            self._scan = j + 1  # 7E 7E 7E holds two starts
            self._candidates.append((j, None))
        kept = []
        for j, end in self._candidates:
            if end is None and len(buf) >= j + 14:
                end = j + self._need(j)
            if end is not None and end <= len(buf) and self._budget >= end - j:
                if self._try(j, end) is not None:
                    return j
                continue  # not a frame: forget it
            kept.append((j, end))  # incomplete, or to be checked when the next bytes pay for it
        self._candidates = kept
        return None

    def feed(self, data: bytes) -> Iterator[Frame]:
        self._buf += data
        self._budget = min(self._budget + self.WORK_PER_BYTE * len(data), self.WORK_PER_BYTE * self.max_frame)
        while True:
            i = self._buf.find(START)
            if i < 0:
                keep = 1 if self._buf[-1:] == b"\x7e" else 0
                if len(self._buf) - keep:
                    self._drop(len(self._buf) - keep)
                return
            if i:
                self._drop(i)
            if len(self._buf) < 14:
                return
            need = self._need(0)
            if len(self._buf) < need:
                if len(self._buf) > self.max_frame:
                    self._drop(2)  # cannot be a frame: more bytes than any frame has
                    continue
                later = self._complete_frame_after()
                if later is not None:  # a false start (7E 7E in noise) with a whole frame behind it
                    self._drop(later)
                    continue
                return
            if self._budget < need:
                if len(self._buf) > self.max_frame:
                    self._drop(2)  # starts arrive faster than their checks are paid for: a flood, not a station
                    continue
                return  # the next bytes pay for the check
            frame = self._try(0, need)
            if frame is None:
                self._drop(2)  # a false start: look for the next one
                continue
            del self._buf[:need]
            self._reset_scan()
            yield frame


# ---------------------------------------------------------------------------------------------- elements


@dataclass(frozen=True)
class Element:
    id: int
    name: str
    what: str
    unit: str
    digits: int
    decimals: int
    encoding: str = "bcd"

    @property
    def definition(self) -> int:
        """The default definition byte: data bytes in the high 5 bits, decimals in the low 3."""
        size = {"drp": 12, "drz": 24}.get(self.encoding, (self.digits + 1) // 2)
        return (size << 3) | (self.decimals if self.encoding == "bcd" else 0)


@cache
def elements() -> tuple[dict[int, Element], dict[str, Element]]:
    """The element table (device_drivers/sl651_elements.toml), by identifier and by ASCII name."""
    raw = tomllib.loads(Path(__file__).with_name("sl651_elements.toml").read_text(encoding="utf-8"))
    table = [Element(e["id"], e["name"], e["what"], e["unit"], e["digits"], e["decimals"], e.get("encoding", "bcd")) for e in raw["element"]]
    return {e.id: e for e in table}, {e.name: e for e in table}


def element(ref: str | int) -> Element | None:
    """An element by ASCII name ("ZU"), by hex identifier ("3B", "0x3B") or by number."""
    by_id, by_name = elements()
    if isinstance(ref, int):
        return by_id.get(ref)
    if ref.upper() in by_name:
        return by_name[ref.upper()]
    try:
        return by_id.get(int(ref, 16))
    except ValueError:
        return None


def _bcd_digits(data: bytes) -> str:
    return data.hex().upper()


def decode_element_value(ident: int, definition: int, data: bytes) -> Decimal | int | None | list[Decimal | None]:
    """One element group's data → a value (None: the station has none). Raises SL651Error."""
    known = elements()[0].get(ident)
    encoding = known.encoding if known is not None else "bcd"
    if encoding == "hex":
        return int.from_bytes(data, "big")
    if encoding == "drp":
        return [None if b == 0xFF else Decimal(b).scaleb(-1) for b in data]
    if encoding == "drz":
        return [None if data[i : i + 2] == b"\xff\xff" else Decimal(int.from_bytes(data[i : i + 2], "big")).scaleb(-2) for i in range(0, len(data) - 1, 2)]
    decimals = definition & 0x07
    digits = _bcd_digits(data)
    if digits and set(digits) == {"F"}:
        return None
    negative = data[:1] == b"\xff"
    if negative:
        digits = digits[2:]
    digits = digits.lstrip("F") if negative else digits
    if not digits or not digits.isdigit():
        raise SL651Error(f"element {ident:02X}: {data.hex()} is not BCD")
    value = Decimal(int(digits)).scaleb(-decimals)
    return -value if negative else value


def encode_element(ident: int, value: Decimal | int | float | None, definition: int | None = None) -> bytes:
    """An element group (leader, definition, data) for one value, in the element's default definition."""
    known = elements()[0].get(ident)
    if known is None and definition is None:
        raise SL651Error(f"element {ident:02X} is not in the table: give its definition byte")
    definition = definition if definition is not None else known.definition  # type: ignore[union-attr]
    size, decimals = definition >> 3, definition & 0x07
    if known is not None and known.encoding == "hex":
        return bytes([ident, definition]) + int(value or 0).to_bytes(size, "big")
    if value is None:
        return bytes([ident, definition]) + b"\xff" * size
    scaled = int((Decimal(str(value)) if isinstance(value, float) else Decimal(value)).scaleb(decimals).to_integral_value())
    negative = scaled < 0
    digits = str(abs(scaled))
    room = 2 * (size - 1 if negative else size)
    if len(digits) > room:
        raise SL651Error(f"element {ident:02X}: {value} does not fit {size} bytes with {decimals} decimals")
    data = bytes.fromhex(digits.rjust(room, "0"))
    return bytes([ident, definition]) + (b"\xff" + data if negative else data)


# ---------------------------------------------------------------------------------------------- bodies

Time = tuple[int, int, int, int, int, int]  # year, month, day, hour, minute, second (station's local time)


def _bcd_time(data: bytes) -> Time:
    text = data.hex()
    if not text.isdigit():
        raise SL651Error(f"time {data.hex()} is not BCD")
    parts = [int(text[i : i + 2]) for i in range(0, len(text), 2)] + [0] * (6 - len(data))
    y, mo, d, h, mi, s = parts[:6]
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h <= 23 and mi <= 59 and s <= 59):
        raise SL651Error(f"time {data.hex()} is not a date and time")
    return (2000 + y, mo, d, h, mi, s)


def _time_bcd(t: Time, size: int) -> bytes:
    y, mo, d, h, mi, s = t
    return bytes.fromhex(f"{y % 100:02d}{mo:02d}{d:02d}{h:02d}{mi:02d}{s:02d}"[: 2 * size])


@dataclass(frozen=True)
class Report:
    """The body of a report (30H–37H): when it was sent, by which station, and its element values, each
    with the observation time it belongs to."""

    serial: int
    sent: Time
    station: str
    station_class: int
    observed: Time
    values: tuple[tuple[int, Time, Decimal | int | None | list[Decimal | None]], ...] = field(default=())


def decode_report(body: bytes) -> Report:
    if len(body) < 8:
        raise SL651Error(f"report body of {len(body)} bytes")
    serial = int.from_bytes(body[:2], "big")
    sent = _bcd_time(body[2:8])
    if len(body) < 23 or body[8:10] != b"\xf1\xf1" or body[16:18] != b"\xf0\xf0":
        raise SL651Error("report body lacks its F1F1 station and F0F0 observation time")
    station = body[10:15].hex().upper()
    station_class = body[15]
    observed = _bcd_time(body[18:23])
    values = []
    i = 23
    now = observed
    while i < len(body):
        if i + 2 > len(body):
            raise SL651Error(f"byte {i}: an element group cut short")
        ident, definition = body[i], body[i + 1]
        if ident == 0xF0 and definition == 0xF0:  # a further observation time for what follows
            now = _bcd_time(body[i + 2 : i + 7])
            i += 7
            continue
        size = definition >> 3
        data = body[i + 2 : i + 2 + size]
        if len(data) != size:
            raise SL651Error(f"byte {i}: element {ident:02X} announces {size} bytes, {len(data)} left")
        values.append((ident, now, decode_element_value(ident, definition, data)))
        i += 2 + size
    return Report(serial, sent, station, station_class, observed, tuple(values))


def encode_report(r: Report) -> bytes:
    out = bytearray(r.serial.to_bytes(2, "big") + _time_bcd(r.sent, 6))
    out += b"\xf1\xf1" + bytes.fromhex(r.station) + bytes([r.station_class])
    out += b"\xf0\xf0" + _time_bcd(r.observed, 5)
    current = r.observed
    for ident, t, value in r.values:
        if t != current:
            out += b"\xf0\xf0" + _time_bcd(t, 5)
            current = t
        out += encode_element(ident, value)  # type: ignore[arg-type]
    return bytes(out)


def encode_short_body(serial: int, sent: Time) -> bytes:
    """A confirm's, a keep-alive's or a query's body: serial and send time."""
    return serial.to_bytes(2, "big") + _time_bcd(sent, 6)


def decode_short_body(body: bytes) -> tuple[int, Time]:
    if len(body) < 8:
        raise SL651Error(f"body of {len(body)} bytes; a serial and a send time need 8")
    return int.from_bytes(body[:2], "big"), _bcd_time(body[2:8])


class Reassembler:
    """M3 multi-packet messages: packets may come in any order and twice; the body is whole once every
    sequence number 1..total has arrived. Bounded: at most `keep` messages in progress and `max_bytes`
    held in all (the oldest message in progress goes first), and no message of more than `max_total`
    packets, so a station that announces 4095 packets of 4 kB cannot make the centre hold 16 MB."""

    def __init__(self, keep: int = 16, max_bytes: int = 1 << 20, max_total: int = 1024) -> None:
        self._parts: dict[tuple[str, int, int], dict[int, bytes]] = {}
        self.keep = keep
        self.max_bytes = max_bytes
        self.max_total = max_total
        self._held = 0

    def add(self, f: Frame) -> bytes | None:
        if f.packet is None:
            return f.body
        total, seq = f.packet
        if not 1 <= seq <= total:
            raise SL651Error(f"packet {seq} of {total}")
        if total > self.max_total:
            raise SL651Error(f"a message of {total} packets; this centre takes at most {self.max_total}")
        key = (f.station, f.function, total)
        parts = self._parts.setdefault(key, {})
        if seq not in parts:  # a repeated packet changes nothing
            parts[seq] = f.body
            self._held += len(f.body)
        if len(parts) < total:
            while len(self._parts) > self.keep or (self._held > self.max_bytes and len(self._parts) > 1):
                oldest = next(iter(self._parts))
                self._held -= sum(len(b) for b in self._parts.pop(oldest).values())
            if self._held > self.max_bytes:  # this message alone is too big
                self._held -= sum(len(b) for b in self._parts.pop(key).values())
                raise SL651Error(f"a message of more than {self.max_bytes} bytes")
            return None
        del self._parts[key]
        self._held -= sum(len(b) for b in parts.values())
        return b"".join(parts[i] for i in range(1, total + 1))


def split_packets(f: Frame, size: int) -> list[Frame]:
    """A frame whose body is too long for one packet, as M3 packets of at most `size` body bytes."""
    chunks: Sequence[bytes] = [f.body[i : i + size] for i in range(0, len(f.body), size)] or [b""]
    total = len(chunks)
    return [Frame(f.up, f.centre, f.station, f.password, f.function, c, ETX if n == total else ETB, (total, n))
            for n, c in enumerate(chunks, start=1)]
