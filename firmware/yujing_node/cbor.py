"""A small deterministic CBOR writer (RFC 8949 §4.2.1) into a preallocated buffer.

Only what the wire format needs: unsigned/negative integers up to 64 bits, text, arrays and maps
of known length, bool/null, floats and decimal fractions (tag 4). The caller writes map keys in
ascending order (the wire format's keys are small unsigned integers, whose bytewise order is their
numeric order). Floats are written as the shortest of float16/32/64 that holds the value exactly,
worked out on integers (sign, odd mantissa, power of two), so the result does not depend on the
board's float precision or on struct supporting 'e'. The bytes equal cbor2's canonical output
(checked by tests/test_firmware_cbor.py against gateway/wire.py).
"""

import struct

try:
    from micropython import const
except ImportError:  # CPython: the host tests import the firmware too

    def const(x):
        return x


_NULL = const(0xF6)
_TRUE = const(0xF5)
_FALSE = const(0xF4)
_TAG_DECIMAL = const(4)

# (mantissa bits incl. the implicit one, min normal exponent, max exponent, initial byte, width)
_FORMATS = ((11, -14, 15, 0xF9, 2), (24, -126, 127, 0xFA, 4), (53, -1022, 1023, 0xFB, 8))


class Writer:
    """Appends CBOR items to `buf` (a bytearray it owns); `n` is the length written so far."""

    def __init__(self, size):
        self.buf = bytearray(size)
        self.n = 0
        self._f64 = bytearray(8)

    def reset(self):
        self.n = 0

    def view(self):
        return memoryview(self.buf)[: self.n]

    def _room(self, k):
        if self.n + k > len(self.buf):
            raise ValueError("cbor: message larger than the %d-byte buffer" % len(self.buf))

    def _be(self, v, width):
        """v as `width` big-endian bytes (struct: no intermediate big ints on a 32-bit board)."""
        if width == 1:
            self.buf[self.n] = v
        else:
            struct.pack_into(">H" if width == 2 else (">I" if width == 4 else ">Q"), self.buf, self.n, v)
        self.n += width

    def head(self, major, v):
        """Initial byte plus the shortest argument (RFC 8949 §3, §4.2.1)."""
        if v < 0 or v > 0xFFFFFFFFFFFFFFFF:
            raise ValueError("cbor: argument %d out of range" % v)
        major <<= 5
        if v < 24:
            width, ai = 0, v
        elif v < 0x100:
            width, ai = 1, 24
        elif v < 0x10000:
            width, ai = 2, 25
        elif v < 0x100000000:
            width, ai = 4, 26
        else:
            width, ai = 8, 27
        self._room(1 + width)
        self.buf[self.n] = major | ai
        self.n += 1
        if width:
            self._be(v, width)

    def byte(self, b):
        self._room(1)
        self.buf[self.n] = b
        self.n += 1

    def int(self, v):
        if v < 0:
            self.head(1, -1 - v)
        else:
            self.head(0, v)

    def text(self, s):
        b = s.encode()
        self.head(3, len(b))
        self.raw(b)

    def bytes(self, b):
        self.head(2, len(b))
        self.raw(b)

    def raw(self, b):
        """Bytes that already are CBOR (an item encoded earlier)."""
        self._room(len(b))
        self.buf[self.n : self.n + len(b)] = b
        self.n += len(b)

    def array(self, count):
        self.head(4, count)

    def map(self, count):
        self.head(5, count)

    def null(self):
        self.byte(_NULL)

    def bool(self, v):
        self.byte(_TRUE if v else _FALSE)

    def float(self, x):
        """The shortest float16/32/64 equal to x (NaN as f97e00, as cbor2 writes it)."""
        struct.pack_into("<d", self._f64, 0, x)
        bits = struct.unpack_from("<Q", self._f64, 0)[0]
        neg = bits >> 63
        exp = (bits >> 52) & 0x7FF
        frac = bits & 0xFFFFFFFFFFFFF
        if exp == 0x7FF:  # inf or NaN
            self.byte(0xF9)
            self._room(2)
            self._be(0x7E00 if frac else (0xFC00 if neg else 0x7C00), 2)
        elif exp == 0 and frac == 0:  # zero keeps its sign
            self.byte(0xF9)
            self._room(2)
            self._be(neg << 15, 2)
        elif exp == 0:
            self.binary(neg, frac, -1074)
        else:
            self.binary(neg, frac | (1 << 52), exp - 1075)

    def binary(self, neg, q, e2):
        """Write (-1)**neg * q * 2**e2 (q > 0) as the shortest exact float; False if no float64 holds it."""
        while not q & 1:
            q >>= 1
            e2 += 1
        n = 0
        t = q
        while t:
            t >>= 1
            n += 1
        top = e2 + n - 1  # exponent of the leading bit
        for p, emin, emax, ib, width in _FORMATS:
            if top > emax:
                continue
            if top >= emin:
                if n > p:
                    continue
                bits = ((top + 1 - emin) << (p - 1)) | ((q << (p - n)) - (1 << (p - 1)))
            else:  # subnormal: q * 2**e2 == k * 2**(emin - p + 1)
                shift = e2 - (emin - p + 1)
                if shift < 0:
                    continue
                bits = q << shift
            self._room(1 + width)
            self.buf[self.n] = ib
            self.n += 1
            self._be(bits | (neg << (8 * width - 1)), width)
            return True
        return False

    def decimal(self, m, e):
        """m * 10**e by the wire format's rule: an integer when whole, the shortest float when the
        decimal is binary-exact, else tag 4 [e, m] normalised (no trailing zero in m)."""
        if m == 0:
            self.head(0, 0)
            return
        while m % 10 == 0:
            m //= 10
            e += 1
        if e >= 0:
            self.int(m * 10**e)
            return
        p5 = 5 ** (-e)
        if m % p5 == 0:  # m / 10**k == (m / 5**k) / 2**k: binary-exact
            q = m // p5
            if self.binary(1 if q < 0 else 0, -q if q < 0 else q, e):
                return
        self.head(6, _TAG_DECIMAL)
        self.head(4, 2)
        self.int(e)
        self.int(m)
