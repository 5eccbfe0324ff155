"""ASCII line protocols: cutting a byte stream into lines, checking a line's frame and checksum, and turning
its fields into values. Pure (no I/O), so every rule is tested byte for byte.

    framer = LineFramer(terminator=b"\\r\\n", max_line=256)
    for line in framer.feed(chunk): ...              # whole lines; overlong ones come out as Garbage
    frame = LineFormat(start="$", checksum="nmea", separator=",")
    fields = frame.fields(line)                      # raises LineError naming what is wrong

NMEA 0183 checksum: the XOR of every character between `$` (or `!`) and `*`, as two hex digits after `*`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from .model import Quality, Value


class LineError(ValueError):
    """A line that does not follow the device's format; `quality` says how it failed."""

    def __init__(self, quality: int, detail: str) -> None:
        super().__init__(detail)
        self.quality = quality


@dataclass(frozen=True)
class Garbage:
    """Bytes that never made a line: too long, or not text."""

    data: bytes


class LineFramer:
    """Bytes in, whole lines out (without the terminator). Bounded: a line longer than `max_line` is cut and
    reported as Garbage, so noise on a line that never ends cannot grow memory."""

    def __init__(self, terminator: bytes = b"\r\n", max_line: int = 256) -> None:
        if not terminator:
            raise ValueError("a line terminator is needed")
        self.terminator = terminator
        self.max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes | Garbage]:
        self._buf += data
        term = self.terminator
        while True:
            i = self._buf.find(term)
            if i < 0:
                if len(self._buf) > self.max_line:
                    junk = bytes(self._buf)
                    self._buf.clear()
                    yield Garbage(junk)
                return
            line = bytes(self._buf[:i])
            del self._buf[: i + len(term)]
            if len(line) > self.max_line:
                yield Garbage(line)
            elif line:
                yield line

    @property
    def pending(self) -> int:
        return len(self._buf)

    def clear(self) -> None:
        self._buf.clear()


def nmea_checksum(body: str) -> str:
    value = 0
    for ch in body:
        value ^= ord(ch)
    return f"{value:02X}"


@dataclass(frozen=True)
class LineFormat:
    """How a device's line is built: an optional start character, a checksum, and either a field separator
    or a regular expression with named groups."""

    start: str = ""
    checksum: str = "none"  # "none" or "nmea"
    separator: str | None = ","
    pattern: re.Pattern[str] | None = None
    encoding: str = "ascii"

    def text(self, line: bytes) -> str:
        try:
            text = line.decode(self.encoding)
        except UnicodeDecodeError:
            raise LineError(Quality.FRAMING, f"not {self.encoding} text: {line[:32]!r}") from None
        if any(ord(c) < 32 and c not in "\t" for c in text) or "\x7f" in text:
            raise LineError(Quality.FRAMING, f"control characters in the line: {line[:32]!r}")
        return text.strip(" \t")

    def body(self, line: bytes) -> str:
        """The line without its start character and checksum, both checked."""
        text = self.text(line)
        if self.start:
            at = text.rfind(self.start)  # noise before the start character is dropped with it
            if at < 0:
                raise LineError(Quality.FRAMING, f"no start character {self.start!r}: {text[:40]!r}")
            text = text[at + len(self.start):]
        if self.checksum == "nmea":
            body, star, given = text.rpartition("*")
            if not star or len(given) != 2:
                raise LineError(Quality.FRAMING, f"no *hh checksum: {text[:40]!r}")
            if given.upper() != nmea_checksum(body):
                raise LineError(Quality.FRAMING, f"checksum {given} does not match {nmea_checksum(body)}: {text[:40]!r}")
            text = body
        return text

    def fields(self, line: bytes) -> dict[str | int, str]:
        """The line's fields, by index (separator) or group name (pattern)."""
        body = self.body(line)
        if self.pattern is not None:
            m = self.pattern.fullmatch(body)
            if m is None:
                raise LineError(Quality.DECODE, f"does not match the pattern: {body[:40]!r}")
            return {k: v for k, v in m.groupdict().items() if v is not None}
        parts = body.split(self.separator) if self.separator else [body]
        return {i: p.strip() for i, p in enumerate(parts)}


def parse_value(text: str, typ: str, scale: Decimal = Decimal(1), offset: Decimal = Decimal(0)) -> Value:
    """A field's text as a value of `typ` ("decimal", "int", "bool", "str" is not a reading type). Decimal
    text stays exact (12.30 m is 12.30, not a float), then raw × scale + offset in decimal."""
    t = text.strip()
    if typ == "bool":
        low = t.lower()
        if low in ("1", "true", "on", "a", "y", "yes"):
            return True
        if low in ("0", "false", "off", "v", "n", "no"):
            return False
        raise LineError(Quality.DECODE, f"{t[:20]!r} is not a yes/no value")
    if typ == "int":
        if not re.fullmatch(r"[+-]?[0-9]{1,19}", t):
            raise LineError(Quality.DECODE, f"{t[:20]!r} is not an integer")
        value: Value = int(t)
    else:
        if not re.fullmatch(r"[+-]?([0-9]{1,18}(\.[0-9]{0,12})?|\.[0-9]{1,12})([eE][+-]?[0-9]{1,3})?", t):
            raise LineError(Quality.DECODE, f"{t[:20]!r} is not a number")
        try:
            value = Decimal(t)
        except InvalidOperation:
            raise LineError(Quality.DECODE, f"{t[:20]!r} is not a number") from None
    if scale != 1 or offset != 0:
        value = value * scale + offset  # type: ignore[operator]
    return value
