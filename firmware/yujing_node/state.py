"""The node's persistent counters: session, sequence number, ring cursor, dropped count, and what a
deep sleep must carry (pulse counts, alarm levels and delay counts, the partial ring block, when
it is due back).

Two homes, chosen for flash wear:
- RTC memory (survives deep sleep and resets, not a power cut), rewritten every cycle: a fixed
  binary image with a CRC, in a buffer allocated once;
- a small JSON file on flash, written only on a cold start (new session), when the sequence
  reservation runs out, and after the ring was flushed. The file stores a sequence number no
  message has used yet (`seq_reserved`): after a power cut the node continues from there, so a
  number is never reused; the numbers skipped are at most SEQ_RESERVE.
Writes go to a temporary file renamed over the old one, so a power cut leaves one or the other.
"""

import binascii
import json
import os
import struct

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


SEQ_RESERVE = const(64)
_MAGIC = const(0x4A59)
_VERSION = const(2)  # 2: 12 bytes of rule state per rule (latch: condition level, acked)
# magic ver nsensors session seq seq_reserved session_start back_at retry_at tail tidx fails dropped
_HEAD = "<HBBIIIQQQIHHI"
_HEAD_SIZE = const(52)


class State:
    def __init__(self, nsensors, nrules, stage_bytes):
        self.session = 0
        self.seq = 1  # the next data message's seq
        self.seq_reserved = 1  # seqs below this may have been used
        self.session_start = 0
        self.back_at = 0
        self.retry_at = 0  # no connect attempt before this (backoff across deep sleeps)
        self.tail = 1
        self.tidx = 0
        self.fails = 0  # consecutive failed connects, for the backoff
        self.dropped = 0
        self.counters = [0] * nsensors
        self.levels = bytearray(12 * nrules)  # rules.STATE_BYTES per rule
        self.stage_bytes = stage_bytes
        self._off_levels = _HEAD_SIZE + 4 * nsensors
        self._off_stage = self._off_levels + len(self.levels)
        self.blob = bytearray(self._off_stage + stage_bytes + 4)

    # ------------------------------------------------------------ RTC memory

    def pack(self, stage):
        """The RTC image (the preallocated blob) including the ring's stage block."""
        b = self.blob
        struct.pack_into(
            _HEAD,
            b,
            0,
            _MAGIC,
            _VERSION,
            len(self.counters),
            self.session,
            self.seq,
            self.seq_reserved,
            self.session_start,
            self.back_at,
            self.retry_at,
            self.tail,
            self.tidx,
            self.fails,
            self.dropped,
        )
        for i, c in enumerate(self.counters):
            struct.pack_into("<I", b, _HEAD_SIZE + 4 * i, c)
        b[self._off_levels : self._off_stage] = self.levels
        b[self._off_stage : self._off_stage + self.stage_bytes] = stage
        end = len(b) - 4
        struct.pack_into("<I", b, end, binascii.crc32(memoryview(b)[:end]) & 0xFFFFFFFF)
        return b

    def unpack(self, blob):
        """Load an RTC image; returns the stage bytes, or None when the image is not ours or torn."""
        if blob is None or len(blob) != len(self.blob):
            return None
        end = len(blob) - 4
        if struct.unpack_from("<I", blob, end)[0] != binascii.crc32(memoryview(blob)[:end]) & 0xFFFFFFFF:
            return None
        h = struct.unpack_from(_HEAD, blob, 0)
        if h[0] != _MAGIC or h[1] != _VERSION or h[2] != len(self.counters):
            return None
        (
            self.session,
            self.seq,
            self.seq_reserved,
            self.session_start,
            self.back_at,
            self.retry_at,
            self.tail,
            self.tidx,
            self.fails,
            self.dropped,
        ) = h[3:]
        for i in range(len(self.counters)):
            self.counters[i] = struct.unpack_from("<I", blob, _HEAD_SIZE + 4 * i)[0]
        self.levels[:] = blob[self._off_levels : self._off_stage]
        return blob[self._off_stage : self._off_stage + self.stage_bytes]

    # ------------------------------------------------------------ flash

    def load_file(self, path):
        """Read the flash copy; False when there is none (first start) or it is unreadable."""
        return self._load(path) or self._load(path + ".tmp")

    def _load(self, path):
        try:
            with open(path) as f:
                d = json.loads(f.read())
            self.session = int(d["session"])
            self.seq = self.seq_reserved = int(d["seq_reserved"])
            self.tail = int(d["tail"])
            self.tidx = int(d["tidx"])
            self.dropped = int(d["dropped"])
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def save_file(self, path):
        write_json(
            path,
            {
                "session": self.session,
                "seq_reserved": self.seq_reserved,
                "tail": self.tail,
                "tidx": self.tidx,
                "dropped": self.dropped,
            },
        )

    def next_seq(self, path):
        """Take a sequence number, extending the flash reservation first when it runs out."""
        if self.seq >= self.seq_reserved:
            self.seq_reserved = self.seq + SEQ_RESERVE
            self.save_file(path)
        s = self.seq
        self.seq += 1
        return s


def write_json(path, d):
    """Replace a small JSON file through a temporary file renamed over it (the node's /alarms.json and
    /commands.json too)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(d))
    try:
        os.rename(tmp, path)  # atomic over the old file on LittleFS
    except OSError:  # FAT cannot rename over a file: load_file() falls back to the .tmp copy
        os.remove(path)
        os.rename(tmp, path)
