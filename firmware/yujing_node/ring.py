"""Offline buffer: a bounded ring of reading records on the flash filesystem.

Design requirements: bounded (a fixed number of fixed-size slot files, never more), survives a
reset and a power cut, and is wear-aware: records are collected in a RAM block (`stage`) and
flash is written one whole block at a time when the block fills, never once per reading.
Before a deep sleep the node keeps the partial block in RTC memory (no flash write); with
`"sync": "cycle"` it is also written every cycle (a power cut then loses nothing, at the cost
of one block write per cycle).

Each slot is its own small file, `<dir>/<slot>`, rewritten whole. On LittleFS (the ESP32
default) a file rewrite is copy-on-write and atomic at close, and costs one block program plus
a metadata commit; rewriting the middle of one big file would instead copy every later block of
it (CTZ skip-lists are append-only).

A slot file holds one block, packed (version 2): the records are 20 bytes in RAM (the stage, the RTC
image) but go to flash as what they hold, 3-6 bytes for a typical reading, so an offline hour programs a
third of the bytes at the same loss bound (the readings of one block):
    magic u16 "YR" | version u8 = 2 | count u8 | bseq u32 | crc32 u32 | block bytes u16 | count packed records
    packed record: head u8 (bit 7: a new timestamp follows; bits 4-6: kind; bit 3: a quality byte follows;
                   bits 0-2: value bytes - 1) | point u8 | [ts u64] | [quality u8] |
                   [DEC: exp i8] | [INT, DEC: the value's low bytes, sign-extended on reading] | [FLOAT: f64]
A block that would pack larger than it is (floats, each with a time of its own) is written as version 1.
Packing works on the records' bytes only: no big integers (epoch milliseconds do not fit a 32-bit
board's small ints), no allocation. Version 1 slots (whole 20-byte records) are still read.
bseq is a block sequence number that never repeats; block b lives in slot b % blocks. On start
the ring reads the slots: the newest valid block and the run of consecutive older ones are the
contents; a block torn by a power cut fails its CRC and is not part of it (when it is the block being
written, newer than every whole one, and its header survived, its unsent readings are counted in
`dropped`). When the ring is full the oldest block is overwritten and its unsent readings are counted
in `dropped` (birth key 11).

What has been sent is a cursor (tail bseq, index in block) that the node persists with its state
(RTC memory every cycle, flash after a flush), so a crash re-sends at most what was in flight.
"""

import binascii
import os
import struct

from .records import REC

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_MAGIC = const(0x5259)
_VERSION = const(1)  # the RAM image (stage, RTC memory) and version 1 slot files: whole records
_PACKED = const(2)  # slot files: packed records
_HDR = const(12)
_PHDR = const(14)  # packed header: the RAM header + the block size it was packed from
_FMT = "<HBBII"
_MAX_PACKED = const(24)  # a packed record's largest size (a FLOAT with a new ts and a quality)


def _pack(src, count, dst, bsize):
    """Pack `count` RAM records (at _HDR in src) into dst after a packed header; returns the length."""
    o = _PHDR
    last = -1
    for i in range(count):
        r = _HDR + i * REC
        kind = src[r + 10]
        same = last >= 0 and src[r : r + 8] == src[last : last + 8]
        quality = src[r + 9]
        n = 0
        if kind == 3 or kind == 5:  # INT, DEC: the value's bytes without their sign extension
            top = r + 19
            fill = 0xFF if src[top] & 0x80 else 0
            while top > r + 12 and src[top] == fill and (src[top - 1] & 0x80) == (fill & 0x80):
                top -= 1
            n = top - (r + 12) + 1
        elif kind == 4:  # FLOAT
            n = 8
        dst[o] = (0 if same else 0x80) | (kind << 4) | (0x08 if quality else 0) | ((n - 1) & 7 if n else 0)
        dst[o + 1] = src[r + 8]
        o += 2
        if not same:
            dst[o : o + 8] = src[r : r + 8]
            o += 8
            last = r
        if quality:
            dst[o] = quality
            o += 1
        if kind == 5:
            dst[o] = src[r + 11]
            o += 1
        if n:
            dst[o : o + n] = src[r + 12 : r + 12 + n]
            o += n
    struct.pack_into("<HBBII", dst, 0, _MAGIC, _PACKED, count, 0, 0)
    struct.pack_into("<H", dst, 12, bsize)
    return o


def _unpack(src, length, count, dst):
    """Packed records (src[_PHDR:length]) back into RAM records at _HDR in dst; False if malformed."""
    o = _PHDR
    ts = -1
    for i in range(count):
        if o + 2 > length:
            return False
        head = src[o]
        kind = (head >> 4) & 7
        r = _HDR + i * REC
        dst[r + 8] = src[o + 1]
        o += 2
        if head & 0x80:
            if o + 8 > length:
                return False
            dst[r : r + 8] = src[o : o + 8]
            ts = r
            o += 8
        elif ts < 0:
            return False
        else:
            dst[r : r + 8] = dst[ts : ts + 8]
        dst[r + 9] = 0
        if head & 0x08:
            dst[r + 9] = src[o]
            o += 1
        dst[r + 10] = kind
        dst[r + 11] = 0
        if kind == 5:
            dst[r + 11] = src[o]
            o += 1
        n = 8 if kind == 4 else ((head & 7) + 1 if kind == 3 or kind == 5 else 0)
        if o + n > length:
            return False
        fill = 0xFF if n and n < 8 and src[o + n - 1] & 0x80 else 0
        for k in range(8):
            dst[r + 12 + k] = src[o + k] if k < n else fill
        o += n
    return o == length


class Ring:
    def __init__(self, path, blocks, block_bytes):
        self.path = path
        self.nblocks = blocks
        self.bsize = block_bytes
        self.cap = (block_bytes - _HDR) // REC
        if self.cap < 1 or self.cap > 255:
            raise ValueError("ring: block of %d bytes holds %d records (1..255)" % (block_bytes, self.cap))
        self.stage = bytearray(block_bytes)
        self.rbuf = bytearray(block_bytes)
        self.pbuf = bytearray(_PHDR + self.cap * _MAX_PACKED)  # a packed block, to and from flash
        self.rseq = 0  # which block rbuf holds (0: none)
        self.head = 1  # bseq of the block being filled (the stage)
        self.count = 0  # records in the stage
        self.tail = 1  # oldest unsent record: block bseq ...
        self.tidx = 0  # ... and index in it
        self.oldest = 1
        self.dropped = 0
        self.writes = 0  # block writes since start, and their bytes: wear accounting
        self.bytes_written = 0
        self.dirty = False  # the stage holds records not yet in its slot
        self._torn = []  # (bseq, count) of a block newer than any whole one whose write a power cut tore
        try:
            os.mkdir(path)
        except OSError:
            pass  # exists
        for name in os.listdir(path):  # slots of a larger ring configured earlier
            if not (name.isdigit() and int(name) < blocks):
                os.remove(self._slot_path(name))
        self._scan()

    # ------------------------------------------------------------ files

    def _slot_path(self, slot):
        return "%s/%s" % (self.path, slot)

    def _load(self, slot, buf):
        """Read a slot file into buf as a RAM block image; False when it is missing, of another block size,
        or does not unpack (a torn write)."""
        try:
            with open(self._slot_path(slot), "rb") as f:
                n = f.readinto(self.pbuf)
                if f.read(1) != b"":
                    return False
        except OSError:
            return False
        p = self.pbuf
        if n == self.bsize and p[2] == _VERSION:  # a version 1 slot: the RAM image itself
            buf[:] = memoryview(p)[: self.bsize]
            return True
        if n < _PHDR or p[2] != _PACKED or struct.unpack_from("<H", p, 12)[0] != self.bsize:
            return False
        magic, _, count, bseq, crc = struct.unpack_from(_FMT, p, 0)
        if magic != _MAGIC or count > self.cap:
            return False
        if binascii.crc32(memoryview(p)[_PHDR:n], binascii.crc32(memoryview(p)[:8])) & 0xFFFFFFFF != crc:
            return False
        if not _unpack(p, n, count, buf):
            return False
        struct.pack_into("<HBBI", buf, 0, _MAGIC, _VERSION, count, bseq)
        struct.pack_into("<I", buf, 8, self._crc(buf, count))
        return True

    def _header(self, slot):
        """(bseq, count) from the first bytes of a slot file that does not load (a torn write), or None."""
        try:
            with open(self._slot_path(slot), "rb") as f:
                h = f.read(8)
        except OSError:
            return None
        if len(h) < 8:
            return None  # torn inside its header: which block it was cannot be told
        magic, ver, count, bseq = struct.unpack("<HBBI", h)
        if magic != _MAGIC or ver not in (_VERSION, _PACKED) or count > self.cap:
            return None
        if not bseq or bseq % self.nblocks != slot:
            return None
        return bseq, count

    def close(self):
        pass  # no file is kept open

    def _crc(self, buf, count):
        return (
            binascii.crc32(memoryview(buf)[_HDR : _HDR + count * REC], binascii.crc32(memoryview(buf)[:8])) & 0xFFFFFFFF
        )

    def _valid(self, buf):
        """(bseq, count) of a valid block image, or (0, 0)."""
        magic, ver, count, bseq, crc = struct.unpack_from(_FMT, buf, 0)
        if magic != _MAGIC or ver != _VERSION or count > self.cap or bseq == 0:
            return 0, 0
        if self._crc(buf, count) != crc:
            return 0, 0
        return bseq, count

    def _read(self, bseq):
        """Load block bseq into rbuf; its record count, or -1 if the slot holds something else."""
        if self.rseq != bseq:
            self.rseq = 0
            if not self._load(bseq % self.nblocks, self.rbuf):
                return -1
            got, count = self._valid(self.rbuf)
            if got != bseq:
                return -1
            self.rseq = bseq
        return self.rbuf[3]

    def _write_stage(self):
        head = self.head
        lost_block = head - self.nblocks  # the block this slot held
        if lost_block >= self.tail:  # full: the oldest unsent block is overwritten
            self.dropped += self.cap - self.tidx
            self.tail = lost_block + 1
            self.tidx = 0
        if lost_block >= self.oldest:
            self.oldest = lost_block + 1
        if self.rseq == lost_block or self.rseq == head:
            self.rseq = 0
        p = self.pbuf
        n = _pack(self.stage, self.count, p, self.bsize)
        struct.pack_into("<I", p, 4, head)
        struct.pack_into("<I", p, 8, binascii.crc32(memoryview(p)[_PHDR:n], binascii.crc32(memoryview(p)[:8])) & 0xFFFFFFFF)
        if n >= self.bsize:  # packing did not pay (floats, each with its own time): the block as it is
            struct.pack_into("<HBBI", self.stage, 0, _MAGIC, _VERSION, self.count, head)
            struct.pack_into("<I", self.stage, 8, self._crc(self.stage, self.count))
            p, n = self.stage, self.bsize
        with open(self._slot_path(head % self.nblocks), "wb") as f:
            f.write(memoryview(p)[:n])
        self.writes += 1
        self.bytes_written += n
        self.dirty = False

    def _scan(self):
        seqs = [0] * self.nblocks
        newest = 0
        torn = []
        for slot in range(self.nblocks):
            if not self._load(slot, self.rbuf):
                h = self._header(slot)
                if h:
                    torn.append(h)
                continue
            bseq, _ = self._valid(self.rbuf)
            if bseq and bseq % self.nblocks == slot:
                seqs[slot] = bseq
                if bseq > newest:
                    newest = bseq
        self.rseq = 0
        # A torn block newer than every whole one is the write the power cut interrupted (with "sync": "cycle" a
        # partial block is rewritten each cycle, so it held readings that were on flash): restore() counts it.
        self._torn = [t for t in torn if t[0] > newest]
        if not newest:
            return
        oldest = newest
        while oldest > 1 and oldest - 1 > newest - self.nblocks and seqs[(oldest - 1) % self.nblocks] == oldest - 1:
            oldest -= 1
        self.oldest = self.tail = oldest
        self.tidx = 0
        count = self._read(newest)
        if count < self.cap:  # a partial block synced on an earlier cycle: keep filling it
            self.stage[:] = self.rbuf
            self.head, self.count = newest, count
        else:
            self.head, self.count = newest + 1, 0

    # ------------------------------------------------------------ state

    def cursor(self):
        return self.tail, self.tidx

    def restore(self, tail, tidx, stage=None):
        """Apply a persisted cursor, and a stage kept in RTC memory if it is newer than the flash."""
        if stage is not None and len(stage) == self.bsize:
            bseq, count = self._valid(stage)
            if bseq and bseq >= self.head:
                self.stage[:] = stage
                self.head, self.count, self.dirty = bseq, count, True
                if self.oldest > bseq:
                    self.oldest = bseq
        for bseq, count in self._torn:  # its readings not yet sent are lost: counted (birth key 11)
            if bseq == self.head and self.count == 0 and tail <= bseq:
                lost = count - (tidx if tail == bseq else 0)
                if lost > 0:
                    self.dropped += lost
        self._torn = []
        if tail > self.head or (tail == self.head and tidx > self.count):
            # cursor from another ring (file lost or reformatted): continue numbering after it
            if self.count == 0 and self.oldest >= self.head:
                self.head = self.oldest = tail
                self.tail, self.tidx = tail, 0
            return
        if tail < self.oldest:
            gone = (self.oldest - tail) * self.cap - tidx
            self.dropped += gone if gone > 0 else 0
            tail, tidx = self.oldest, 0
        self.tail, self.tidx = tail, tidx

    def stage_image(self):
        """The stage as a valid block image (header and CRC filled), for RTC memory."""
        struct.pack_into("<HBBI", self.stage, 0, _MAGIC, _VERSION, self.count, self.head)
        struct.pack_into("<I", self.stage, 8, self._crc(self.stage, self.count))
        return self.stage

    # ------------------------------------------------------------ data

    def append(self, rec):
        off = _HDR + self.count * REC
        self.stage[off : off + REC] = rec
        self.count += 1
        self.dirty = True
        if self.count == self.cap:
            self._write_stage()
            self.head += 1
            self.count = 0

    def append_batch(self, batch):
        for i in range(batch.n):
            self.append(batch.record(i))

    def sync(self):
        """Write the partial stage to its slot (one block write) if it changed."""
        if self.dirty and self.count:
            self._write_stage()

    def pending(self):
        if self.tail == self.head:
            return self.count - self.tidx
        return (self.head - self.tail) * self.cap - self.tidx + self.count

    def peek(self, batch, limit):
        """Copy up to `limit` unsent records, oldest first, into batch; returns how many."""
        got = 0
        b, i = self.tail, self.tidx
        while got < limit and not batch.full():
            if b == self.head:
                if i >= self.count:
                    break
                off = _HDR + i * REC
                batch.add_record(memoryview(self.stage)[off : off + REC])
            else:
                n = self._read(b)
                if n < 0:  # unreadable block (bit rot): its readings are lost
                    self.dropped += self.cap - i
                    self.tail, self.tidx = b + 1, 0
                    b, i = b + 1, 0
                    continue
                if i >= n:
                    b, i = b + 1, 0
                    continue
                off = _HDR + i * REC
                batch.add_record(memoryview(self.rbuf)[off : off + REC])
            i += 1
            got += 1
        return got

    def consume(self, k):
        """Mark the first k unsent records as delivered."""
        while k > 0:
            if self.tail == self.head:
                self.tidx = min(self.count, self.tidx + k)
                return
            avail = self.cap - self.tidx
            if k < avail:
                self.tidx += k
                return
            k -= avail
            self.tail += 1
            self.tidx = 0
