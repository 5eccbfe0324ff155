"""A strict walk over untrusted CBOR bytes before any decoder builds objects from them.

cbor2 decodes whatever RFC 8949 allows: bignums (tags 2/3) whose conversion and printing cost grows
quadratically with their size, decimal fractions with any exponent, indefinite lengths, duplicate map keys
(the last one silently wins), nesting as deep as the C stack. For bytes that came off the network that is
a denial of service waiting to happen, and a duplicate key makes two readers of one signed message see two
different messages. `check()` reads the item headers only — no object is built, no integer is converted
to text — and refuses anything outside a `Policy` with an error naming the byte offset. It costs one pass
over the bytes; after it, cbor2 can decode them without surprises.

Every map key in Yujing's formats (and in a COSE header) is an integer, so keys are limited to integers:
that makes duplicate detection exact (two encodings of one integer compare equal) and cheap.
"""

from __future__ import annotations

from dataclasses import dataclass


class CborRejected(ValueError):
    """The bytes are not well-formed CBOR, or use something the policy refuses; the message says where."""


@dataclass(frozen=True, slots=True)
class Policy:
    max_bytes: int
    max_depth: int = 8  # arrays/maps/tags nested inside each other
    max_items: int = 100_000  # data items in all
    max_string: int = 65_536  # bytes in one text or byte string
    tags: frozenset[int] = frozenset()  # tags allowed anywhere (everything else is refused)
    floats: bool = False
    canonical: bool = False  # require shortest-form arguments (RFC 8949 §4.2.1), as signed bytes must be
    decimal_exponent: int = 30  # tag 4 content must be [int, int] with |exponent| ≤ this


_SIMPLE_OK = (20, 21, 22)  # false, true, null; `undefined` and unassigned simple values are refused


def check(data: bytes | bytearray | memoryview, policy: Policy) -> None:
    """Raise CborRejected unless `data` is exactly one well-formed CBOR item within `policy`."""
    n = len(data)
    if n > policy.max_bytes:
        raise CborRejected(f"{n} bytes, more than the {policy.max_bytes} allowed")
    if n == 0:
        raise CborRejected("empty")
    walker = _Walker(bytes(data), policy)
    end = walker.item(0, 0)
    if end != n:
        raise CborRejected(f"byte {end}: {n - end} bytes after the item")


class _Walker:
    __slots__ = ("b", "p", "items")

    def __init__(self, b: bytes, policy: Policy) -> None:
        self.b = b
        self.p = policy
        self.items = 0

    def head(self, pos: int) -> tuple[int, int, int, int]:
        """(major type, additional info, argument, position after the head)."""
        b = self.b
        if pos >= len(b):
            raise CborRejected(f"byte {pos}: truncated (an item was expected)")
        initial = b[pos]
        major, info = initial >> 5, initial & 0x1F
        pos += 1
        if info < 24:
            return major, info, info, pos
        if info > 27:
            if info == 31:
                if major == 7:
                    raise CborRejected(f"byte {pos - 1}: unexpected break code (0xff)")
                raise CborRejected(f"byte {pos - 1}: indefinite length (only definite lengths are accepted)")
            if major == 7 and info > 27:
                raise CborRejected(f"byte {pos - 1}: reserved simple value encoding")
            raise CborRejected(f"byte {pos - 1}: reserved additional information {info}")
        size = 1 << (info - 24)
        if pos + size > len(b):
            raise CborRejected(f"byte {pos - 1}: truncated ({size}-byte argument)")
        arg = int.from_bytes(b[pos : pos + size], "big")
        if self.p.canonical and major != 7 and arg < (24 if size == 1 else 1 << (4 * size)):
            raise CborRejected(f"byte {pos - 1}: argument {arg} not in its shortest form")
        return major, info, arg, pos + size

    def item(self, pos: int, depth: int) -> int:
        self.items += 1
        if self.items > self.p.max_items:
            raise CborRejected(f"byte {pos}: more than {self.p.max_items} data items")
        start = pos
        major, info, arg, pos = self.head(pos)
        if major in (0, 1):
            return pos
        if major in (2, 3):
            if arg > self.p.max_string:
                raise CborRejected(f"byte {start}: a {arg}-byte string, more than {self.p.max_string}")
            end = pos + arg
            if end > len(self.b):
                raise CborRejected(f"byte {start}: truncated string ({arg} bytes announced)")
            if major == 3:
                try:
                    self.b[pos:end].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise CborRejected(f"byte {start}: text string is not UTF-8 ({exc.reason})") from None
            return end
        if major == 7:
            if info < 24:
                if arg not in _SIMPLE_OK:
                    raise CborRejected(f"byte {start}: simple value {arg} (only false, true and null)")
                return pos
            if info == 24:
                raise CborRejected(f"byte {start}: simple value {arg} (only false, true and null)")
            if not self.p.floats:
                raise CborRejected(f"byte {start}: a float (not accepted here)")
            return pos
        if depth >= self.p.max_depth:
            raise CborRejected(f"byte {start}: nested deeper than {self.p.max_depth}")
        remaining = len(self.b) - pos
        if major == 4:
            if arg > remaining:  # each element takes at least one byte
                raise CborRejected(f"byte {start}: truncated array ({arg} elements announced)")
            for _ in range(arg):
                pos = self.item(pos, depth + 1)
            return pos
        if major == 5:
            if 2 * arg > remaining:
                raise CborRejected(f"byte {start}: truncated map ({arg} pairs announced)")
            keys: set[int] = set()
            for _ in range(arg):
                key_at = pos
                kmajor, _, karg, after = self.head(pos)
                if kmajor not in (0, 1):
                    raise CborRejected(f"byte {key_at}: map key of major type {kmajor} (only integer keys)")
                self.items += 1
                key = karg if kmajor == 0 else -1 - karg
                if key in keys:
                    raise CborRejected(f"byte {key_at}: duplicate map key {key}")
                keys.add(key)
                pos = self.item(after, depth + 1)
            return pos
        # major 6: a tag
        if arg not in self.p.tags:
            raise CborRejected(f"byte {start}: tag {arg} (not accepted here)")
        if arg == 4:
            return self.decimal(start, pos, depth)
        return self.item(pos, depth + 1)

    def decimal(self, start: int, pos: int, depth: int) -> int:
        """Tag 4 content: [exponent, mantissa], both integers (so the mantissa fits 64 bits), exponent bounded."""
        major, _, arg, pos = self.head(pos)
        if major != 4 or arg != 2:
            raise CborRejected(f"byte {start}: decimal fraction must be [exponent, mantissa]")
        emajor, _, earg, pos = self.head(pos)
        if emajor not in (0, 1):
            raise CborRejected(f"byte {start}: decimal fraction exponent is not an integer")
        exponent = earg if emajor == 0 else -1 - earg
        if abs(exponent) > self.p.decimal_exponent:
            raise CborRejected(f"byte {start}: decimal fraction exponent {exponent} outside ±{self.p.decimal_exponent}")
        mmajor, _, _, pos = self.head(pos)
        if mmajor not in (0, 1):
            raise CborRejected(f"byte {start}: decimal fraction mantissa is not a 64-bit integer")
        self.items += 3
        return pos
