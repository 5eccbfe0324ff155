"""Readings as fixed 20-byte records in preallocated buffers: one layout for RAM and flash.

    offset 0  ts       u64  epoch milliseconds
           8  point    u8   catalogue index
           9  quality  u8   0 good, else the wire format's code
          10  kind     u8   NULL, FALSE, TRUE, INT, FLOAT or DEC
          11  exp      i8   DEC: the decimal exponent
          12  value    i64  INT value or DEC mantissa; FLOAT: float64 bits

A sample cycle fills a Batch; the ring buffer stores the same bytes; the wire encoder reads them.
"""

import struct

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


REC = const(20)
NULL = const(0)
FALSE = const(1)
TRUE = const(2)
INT = const(3)
FLOAT = const(4)
DEC = const(5)

_I64 = const(1 << 63)
_FMT_INT = "<QBBBbq"
_FMT_FLOAT = "<QBBBbd"


class Batch:
    """Up to `cap` readings (cap <= 255) in one bytearray; `order` holds a sort by (ts, point)."""

    def __init__(self, cap):
        if not 0 < cap <= 255:
            raise ValueError("batch capacity %d: 1..255" % cap)
        self.cap = cap
        self.buf = bytearray(cap * REC)
        self.mv = memoryview(self.buf)
        self.order = bytearray(cap)
        self.n = 0

    def clear(self):
        self.n = 0

    def full(self):
        return self.n >= self.cap

    def _slot(self):
        if self.n >= self.cap:
            raise ValueError("batch full (%d readings)" % self.cap)
        off = self.n * REC
        self.n += 1
        return off

    def add(self, point, ts, kind, exp=0, value=0, quality=0):
        """Append one reading. INT values and DEC mantissas must fit in 64 bits (signed)."""
        if kind == FLOAT:
            struct.pack_into(_FMT_FLOAT, self.buf, self._slot(), ts, point, quality, kind, 0, value)
            return
        if not -_I64 <= value < _I64:
            raise ValueError("reading %d: value out of 64-bit range" % point)
        struct.pack_into(_FMT_INT, self.buf, self._slot(), ts, point, quality, kind, exp, value)

    def add_none(self, point, ts, quality):
        self.add(point, ts, NULL, 0, 0, quality)

    def add_record(self, rec):
        """Copy a 20-byte record (from the ring buffer)."""
        off = self._slot()
        self.buf[off : off + REC] = rec

    def record(self, i):
        return self.mv[i * REC : (i + 1) * REC]

    def ts(self, i):
        return struct.unpack_from("<Q", self.buf, i * REC)[0]

    def point(self, i):
        return self.buf[i * REC + 8]

    def quality(self, i):
        return self.buf[i * REC + 9]

    def kind(self, i):
        return self.buf[i * REC + 10]

    def exp(self, i):
        e = self.buf[i * REC + 11]
        return e - 256 if e > 127 else e

    def ival(self, i):
        return struct.unpack_from("<q", self.buf, i * REC + 12)[0]

    def fval(self, i):
        return struct.unpack_from("<d", self.buf, i * REC + 12)[0]

    def cmp_ts(self, i, j):
        """-1, 0 or 1 comparing the timestamps of readings i and j, on the stored bytes (no big
        integers: epoch milliseconds do not fit a 32-bit board's small ints)."""
        buf = self.buf
        a = i * REC + 7
        b = j * REC + 7
        for _ in range(8):
            if buf[a] != buf[b]:
                return -1 if buf[a] < buf[b] else 1
            a -= 1
            b -= 1
        return 0

    def sort(self):
        """Fill `order` with indexes sorted by (ts, point), stable, without allocating a list."""
        order = self.order
        buf = self.buf
        for i in range(self.n):
            j = i
            pt = buf[i * REC + 8]
            while j > 0:
                k = order[j - 1]
                c = self.cmp_ts(k, i)
                if c < 0 or (c == 0 and buf[k * REC + 8] <= pt):
                    break
                order[j] = k
                j -= 1
            order[j] = i
