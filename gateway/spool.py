"""The durable spool: an append-only log in segment files. Every poll and alarm event reaches the kernel
here before anything is published; what the broker acknowledged is forgotten, a segment at a time.

    <spool dir>/seg-00000001.log …   records: poll, events, message (sealed, wire bytes), acks, refusal
    <spool dir>/state.json            sessions (catalogue, start, reserved sequence numbers), counters
    <spool dir>/dead-letters.log      messages the broker refused for good, with the reason (bounded)
    <spool dir>/lock                  one gateway per spool (flock)

Why a log and not SQLite: an SD card wears by the pages written to it, and a SQLite transaction writes a
few 4 KB pages (WAL frames, then their checkpoint) however small the poll. Here a poll costs its own bytes
plus a 10-byte header, appended; the card sees a page when the power-cut window's fsync comes
(`sync()`, called by gateway.storage: at once for alarm events, every `spool.power_cut_window_s`
otherwise). What `kill -9` cannot lose is what reached the kernel: every write is an `os.write` before
the call returns.

How records live and die. A poll is sealed into a data message (one sequence number of its session) by
the uplink while it is connected, or — if it is still unsealed when it turns `historical_after_ms` old,
the uplink being away — into a *historical* message here, many polls to a message. Unsent messages wait
in two lanes: alarm messages and live data (sent first, after a reconnect or restart too), and the
historical backlog (handed out in order, at the uplink's drain rate). An acknowledgement is one more
record; when the oldest segment holds nothing alive any more it is deleted. Past `max_bytes` the oldest
segment goes anyway: its routine readings (historical messages, unsealed polls) are dropped and counted,
what else is alive in it (alarm events and messages, data messages on their way) is copied forward first. Alarm events are never dropped.

Sequence numbers never repeat. Sessions only grow (gateway.storage keeps the counter in a second place).
Within a session, a sequence number is taken from a block reserved in state.json (fsync'd) before it is
used. After `kill -9` the log is complete (the kernel kept it) and numbering resumes right after the last
message; after a power cut (the OS booted again without a clean stop), messages of the last window may be
gone from the log although they were published, so numbering resumes above the reservation: the platform
may see a gap of up to `SEQ_BLOCK` that never fills, and readings of the lost window are re-sent under new
numbers (store readings idempotently by point and time). Every record carries a CRC; a power cut's torn
tail is cut off at the last whole record, damage elsewhere is skipped and reported.

Not thread-safe by design, but guarded: gateway.storage calls it from its storage thread only; the lock
lets a test or a status probe read it from elsewhere.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import functools
import logging
import os
import struct
import threading
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import cbor2

from . import storefiles, wire
from .clockcheck import clock_unset
from .model import PointInfo, Reading

log = logging.getLogger("yujing.spool")

ALARM, DATA = "alarm", "data"
MAX_DEAD_LETTERS = 10_000  # the oldest go past this (each is counted in state 'rejected')
SEGMENT_BYTES = 1 << 20
SEQ_BLOCK = 64  # sequence numbers reserved at a time: the largest gap a power cut can leave
CACHED_POLLS = 64  # the newest unsealed polls keep their readings in memory
MAX_RECORD = 16 << 20

MAGIC = 0xA7
HEAD = struct.Struct("<BBII")  # magic, type, payload length, crc32 of type + length + payload
POLL, EVENTS, MESSAGE, ACKS, REFUSED = b"PEMKX"
POLL_HEAD = struct.Struct("<qiqI")  # id, session, newest ts, readings; then CBOR [[point, newest ts - ts, value(, quality)], …]
EVENT_HEAD = struct.Struct("<qiq")  # id, session, ts; then the event's CBOR
MSG_HEAD = struct.Struct("<qBiIII")  # id, flags (alarm 1, historical 2), session, seq, count, consumed bytes
F_ALARM, F_HISTORICAL = 1, 2


class SpoolError(Exception):
    """The spool cannot store (disk full, read-only filesystem, damaged files); the message says which.

    `corrupt`: the spool itself is damaged beyond reading; `full`: the disk or the file system is full.
    """

    def __init__(self, message: str, *, corrupt: bool = False, full: bool = False) -> None:
        super().__init__(message)
        self.corrupt = corrupt
        self.full = full


def _os_error(path: Path, exc: OSError, what: str) -> SpoolError:
    return SpoolError(f"spool {path}: {what}: {exc.strerror or exc}", full=exc.errno in (28, 122))  # ENOSPC, EDQUOT


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    kind: str  # ALARM or DATA: the MQTT topic it goes to
    seq: int
    session: int
    payload: bytes
    count: int = 0  # readings or events in it


@dataclass(slots=True)
class _Poll:
    id: int
    session: int
    ts: int
    n: int
    seg: int
    off: int
    length: int
    readings: Sequence[Reading] | None = None  # kept while young: sealing it then reads nothing back


@dataclass(slots=True)
class _Event:
    id: int
    session: int
    ts: int
    seg: int
    off: int
    length: int


@dataclass(slots=True)
class _Segment:
    no: int
    path: Path
    size: int = 0
    alive: int = 0  # records in it that still matter: unsealed polls and events, unacknowledged messages


class _Backlog:
    """The historical messages waiting, oldest first, in compact arrays (a long outage can hold tens of
    thousands): id, session, segment, offset, length, readings."""

    FIELDS = ("ids", "sessions", "segs", "offs", "lens", "counts")

    def __init__(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, array("q"))
        self.head = 0
        self.gone: set[int] = set()  # acknowledged, refused or dropped out of order: skipped
        self.readings = 0

    def append(self, mid: int, session: int, seg: int, off: int, length: int, count: int) -> None:
        for name, v in zip(self.FIELDS, (mid, session, seg, off, length, count)):
            getattr(self, name).append(v)
        self.readings += count

    def __len__(self) -> int:
        return len(self.ids) - self.head - len(self.gone)

    def position(self, mid: int) -> int | None:
        i = bisect.bisect_left(self.ids, mid, self.head)
        return i if i < len(self.ids) and self.ids[i] == mid and mid not in self.gone else None

    def remove(self, mid: int) -> tuple[int, int] | None:
        """Forget one message; (its segment, its readings), or None when it is not here."""
        i = self.position(mid)
        if i is None:
            return None
        found = self.segs[i], self.counts[i]
        self.gone.add(mid)
        self.readings -= self.counts[i]
        while self.head < len(self.ids) and self.ids[self.head] in self.gone:
            self.gone.discard(self.ids[self.head])
            self.head += 1
        if self.head > 4096 and self.head * 2 > len(self.ids):
            for name in self.FIELDS:
                del getattr(self, name)[: self.head]
            self.head = 0
        return found

    def entries(self, start: int = 0) -> Iterator[tuple[int, int, int, int, int, int, int]]:
        """(index, id, session, segment, offset, length, readings) from index `start` on."""
        for i in range(max(self.head, start), len(self.ids)):
            if self.ids[i] not in self.gone:
                yield i, self.ids[i], self.sessions[i], self.segs[i], self.offs[i], self.lens[i], self.counts[i]


@dataclass(slots=True)
class _Live:
    """An unacknowledged alarm message or live data message."""

    kind: str
    session: int
    seg: int
    off: int
    length: int
    count: int


@dataclass
class _Session:
    catalogue: list[list[Any]]
    started_ms: int
    reserved: dict[str, int] = field(default_factory=dict)  # kind → first seq not yet reserved


P = ParamSpec("P")
R = TypeVar("R")


def _guarded(method: Callable[P, R]) -> Callable[P, R]:
    """Serialise a public method and turn any OS error into SpoolError naming the spool."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        self: Spool = args[0]  # type: ignore[assignment]
        with self._lock:
            if self._closed:
                raise SpoolError(f"spool {self.path} is closed")
            try:
                return method(*args, **kwargs)
            except SpoolError:
                raise
            except OSError as exc:
                raise _os_error(self.path, exc, method.__name__) from exc

    return wrapper


def boot_id() -> str:
    """This boot of the operating system: the page cache survives a process, not a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Spool:
    def __init__(self, path: Path, *, max_bytes: int = 256 * 1024 * 1024, segment_bytes: int = SEGMENT_BYTES,
                 historical_after_ms: int = 60_000, batch_max: int = 500) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.historical_after_ms = historical_after_ms
        self.batch_max = batch_max
        self._lock = threading.RLock()
        self._closed = False
        self._lock_fd: int | None = None
        self.notes: list[str] = []  # what opening found damaged or lost, for gateway faults
        self._segments: dict[int, _Segment] = {}
        self._fds: dict[int, int] = {}  # open for appending: the active segment
        self._rfds: dict[int, int] = {}  # open for reading
        self._polls: deque[_Poll] = deque()  # unsealed polls, oldest first (young ones: see the module text)
        self._events: deque[_Event] = deque()
        self._live: dict[int, _Live] = {}  # unacknowledged alarm and live data messages by id
        self._backlog = _Backlog()
        self._handed = 0  # the backlog lane hands out from this index on (reset at each connection)
        self._next_id = 1
        self._next_seq: dict[tuple[int, str], int] = {}
        self._sessions: dict[int, _Session] = {}
        self._counters = {"session": 0, "dropped": 0, "rejected": 0}
        self._pending = bytearray()  # records queued by the current call, written with one os.write
        self._pending_seg: int | None = None
        self._acks: list[int] = []
        self._t0_cache: dict[int, int] = {}  # message id → its oldest reading's time (summary())
        self._unsynced: set[int] = set()  # segments written since the last sync; -1: the directory
        self._state_dirty = False
        self.created = False
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    # ---------------------------------------------------------- opening

    def _open(self) -> None:
        path = self.path
        try:
            if path.exists() and not path.is_dir():
                raise SpoolError(f"spool {path} is a file, not a directory (a spool of an older release is carried "
                                 "over by the gateway at start)")
            self.created = not path.exists() or not any(path.glob("seg-*.log"))
            storefiles.secure_dir(path)
            self._lock_fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise _os_error(path, exc, "cannot open") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise SpoolError(f"spool {path}: in use by another process (is another yujing running with this site file?)") from exc
        try:
            state = self._read_state()
            complete = state.get("clean") is True or (bool(state.get("boot")) and state.get("boot") == boot_id())
            self._scan()
            if not complete:
                for session, s in self._sessions.items():
                    for kind, reserved in s.reserved.items():
                        nxt = self._next_seq.get((session, kind), 1)
                        if reserved > nxt:
                            # The OS went down with the gateway: numbers up to the reservation may have gone out
                            # in the window the power cut took from the log.
                            self.notes.append(f"spool {path}: the gateway went down with the system (a power cut?); {kind} "
                                              f"sequence numbers of session {session} resume at {reserved}, skipping at most "
                                              f"{reserved - nxt}")
                            self._next_seq[(session, kind)] = reserved
            self._write_state(clean=False)
        except OSError as exc:
            raise _os_error(path, exc, "cannot open") from exc

    def _read_state(self) -> dict[str, Any]:
        try:
            raw = storefiles.read_json(self.path / "state.json")
        except ValueError as exc:
            aside = storefiles.quarantine(self.path / "state.json")
            self.notes.append(f"spool {self.path}: {exc}; moved to {aside.name}: session catalogues and counters are lost")
            raw = None
        if not isinstance(raw, dict):
            return {}
        for k in self._counters:
            if isinstance(raw.get(k), int):
                self._counters[k] = raw[k]
        for key, s in (raw.get("sessions") or {}).items():
            with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):
                self._sessions[int(key)] = _Session(s["catalogue"], int(s["started_ms"]),
                                                    {k: int(v) for k, v in (s.get("reserved") or {}).items()})
        return raw

    def _write_state(self, *, clean: bool) -> None:
        keep = self._pending_session_set() | {self._counters["session"]}
        state = {
            **self._counters,
            "boot": boot_id(),
            "clean": clean,
            "sessions": {str(sid): {"catalogue": s.catalogue, "started_ms": s.started_ms, "reserved": s.reserved}
                         for sid, s in sorted(self._sessions.items()) if sid in keep},
        }
        storefiles.write_json_atomic(self.path / "state.json", state)
        self._state_dirty = False

    def _scan(self) -> None:
        """Read every segment, oldest first, and rebuild what is alive. A damaged segment's readable records
        are copied forward and the segment is set aside (`.corrupt-<time>`), so damage is reported once."""
        numbers = sorted(int(p.name[4:-4]) for p in self.path.glob("seg-*.log") if p.name[4:-4].isdigit())
        damaged = []
        for i, no in enumerate(numbers):
            last = i == len(numbers) - 1
            seg = _Segment(no, self._seg_path(no))
            self._segments[no] = seg
            data = seg.path.read_bytes()
            before = len(self.notes)
            good = 0
            for off, rtype, payload in self._records(data, no, last=last):
                good = off + HEAD.size + len(payload)
                self._replay(no, off, rtype, payload)
            seg.size = good if last else len(data)
            if last and good < len(data):  # a torn tail: the write a power cut interrupted
                self.notes.append(f"spool {self.path}: segment {no} ended in an incomplete record ({len(data) - good} bytes, "
                                  "a write the power cut interrupted); it was cut off and what it held is lost")
                os.truncate(seg.path, good)
            elif not data and not last:
                self.notes.append(f"spool {self.path}: segment {no} is empty; what it held is lost")
            if len(self.notes) > before and not last and data:
                damaged.append(no)
        self._recount()
        for no in damaged:
            self._set_aside(no)
        self._delete_dead_segments()

    def _set_aside(self, no: int) -> None:
        self._copy_forward(no, self._polls)
        self._copy_forward(no, self._events)
        self._copy_forward(no, self._live.values())
        b = self._backlog
        for i, mid, session, sno, off, length, count in list(b.entries()):
            if sno == no:
                b.segs[i], b.offs[i], b.lens[i] = self._copy(no, off, length)
        self._write()
        for fds in (self._fds, self._rfds):
            fd = fds.pop(no, None)
            if fd is not None:
                os.close(fd)
        aside = storefiles.quarantine(self._segments.pop(no).path)
        self.notes = [n + f"; the segment was moved to {aside.name}, its readable records kept" if f"segment {no}:" in n else n
                      for n in self.notes]
        self._recount()

    def _records(self, data: bytes, no: int, *, last: bool) -> Iterator[tuple[int, int, bytes]]:
        off = 0
        while off + HEAD.size <= len(data):
            magic, rtype, length, crc = HEAD.unpack_from(data, off)
            end = off + HEAD.size + length
            if magic == MAGIC and length <= MAX_RECORD and end <= len(data):
                payload = data[off + HEAD.size : end]
                if zlib.crc32(payload, zlib.crc32(data[off + 1 : off + 6])) == crc:
                    yield off, rtype, payload
                    off = end
                    continue
            following = self._resync(data, off + 1)
            if following is None and last:
                return  # the newest segment's end: the write a power cut interrupted
            lost = (following if following is not None else len(data)) - off
            self.notes.append(f"spool {self.path}: segment {no}: {lost} bytes unreadable at offset {off}; what they held is lost")
            if following is None:
                return
            off = following
        if off < len(data) and not last:
            self.notes.append(f"spool {self.path}: segment {no}: {len(data) - off} bytes at its end unreadable; what they held is lost")

    @staticmethod
    def _resync(data: bytes, start: int) -> int | None:
        """The next offset where a whole record with a good CRC begins."""
        off = data.find(bytes([MAGIC]), start)
        while off >= 0 and off + HEAD.size <= len(data):
            _, _, length, crc = HEAD.unpack_from(data, off)
            end = off + HEAD.size + length
            if length <= MAX_RECORD and end <= len(data) and \
                    zlib.crc32(data[off + HEAD.size : end], zlib.crc32(data[off + 1 : off + 6])) == crc:
                return off
            off = data.find(bytes([MAGIC]), off + 1)
        return None

    def _replay(self, no: int, off: int, rtype: int, payload: bytes) -> None:
        length = HEAD.size + len(payload)
        # Polls are sealed whole, so a record copied forward (budget, damage) was alive, untouched by any
        # message before it in the log.
        if rtype == POLL:
            pid, session, ts, n = POLL_HEAD.unpack_from(payload)
            self._seen(pid)
            self._polls.append(_Poll(pid, session, ts, n, no, off, length))
        elif rtype == EVENTS:
            eid, session, ts = EVENT_HEAD.unpack_from(payload)
            self._seen(eid)
            self._events.append(_Event(eid, session, ts, no, off, length))
        elif rtype == MESSAGE:
            mid, flags, session, seq, count, clen = MSG_HEAD.unpack_from(payload)
            self._seen(mid)
            kind = ALARM if flags & F_ALARM else DATA
            key = (session, kind)
            self._next_seq[key] = max(self._next_seq.get(key, 1), seq + 1)
            taken = cbor2.loads(payload[MSG_HEAD.size : MSG_HEAD.size + clen]) if clen else []
            gone = set(taken)
            if kind == ALARM:
                self._events = deque(e for e in self._events if e.id not in gone)
            elif gone:
                self._polls = deque(p for p in self._polls if p.id not in gone)
            if flags & F_HISTORICAL and kind == DATA:
                self._backlog.append(mid, session, no, off, length, count)
            else:
                self._live[mid] = _Live(kind, session, no, off, length, count)
        elif rtype == ACKS:
            ids = array("q")
            ids.frombytes(payload)
            for mid in ids:
                if self._live.pop(mid, None) is None:
                    self._backlog.remove(mid)
        elif rtype == REFUSED:
            mid = struct.unpack_from("<q", payload)[0]
            if self._live.pop(mid, None) is None:
                self._backlog.remove(mid)

    def _seen(self, rid: int) -> None:
        self._next_id = max(self._next_id, rid + 1)

    def _seg_path(self, no: int) -> Path:
        return self.path / f"seg-{no:08d}.log"

    def _recount(self) -> None:
        for seg in self._segments.values():
            seg.alive = 0
        for p in self._polls:
            self._segments[p.seg].alive += 1
        for e in self._events:
            self._segments[e.seg].alive += 1
        for lv in self._live.values():
            self._segments[lv.seg].alive += 1
        for _, _, _, sno, _, _, _ in self._backlog.entries():
            self._segments[sno].alive += 1

    # ---------------------------------------------------------- writing

    def _active(self) -> _Segment:
        no = max(self._segments) if self._segments else 0
        seg = self._segments.get(no)
        if seg is None or seg.size >= self.segment_bytes:
            seg = _Segment(no + 1, self._seg_path(no + 1))
            self._fds[seg.no] = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._segments[seg.no] = seg
            self._unsynced.add(-1)  # its directory entry
        return seg

    def _append_fd(self, no: int) -> int:
        fd = self._fds.get(no)
        if fd is None:
            fd = self._fds[no] = os.open(self._seg_path(no), os.O_WRONLY | os.O_APPEND)
        return fd

    def _record(self, rtype: int, payload: bytes) -> tuple[int, int, int]:
        """Queue one record; (segment, offset, length) where it will be. Written by _write(), and only
        after that may the index point at it."""
        if len(payload) > MAX_RECORD:
            raise SpoolError(f"spool {self.path}: a record of {len(payload)} bytes (at most {MAX_RECORD})")
        seg = self._active()
        if self._pending_seg is not None and self._pending_seg != seg.no:
            self._write()
            seg = self._active()
        head = bytes([rtype]) + len(payload).to_bytes(4, "little")
        crc = zlib.crc32(payload, zlib.crc32(head))
        off = seg.size + len(self._pending)
        self._pending_seg = seg.no
        self._pending += HEAD.pack(MAGIC, rtype, len(payload), crc) + payload
        return seg.no, off, HEAD.size + len(payload)

    def _write(self) -> None:
        """Hand everything queued to the kernel in one write: from here on `kill -9` cannot lose it. On a
        failure nothing of it stays in the file (a torn record would hide the ones after it)."""
        if not self._pending:
            return
        no = self._pending_seg
        assert no is not None
        seg = self._segments[no]
        data = bytes(self._pending)
        self._pending.clear()
        self._pending_seg = None
        fd = self._append_fd(no)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(28, "No space left on device")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, seg.size)
            raise
        seg.size += len(data)
        self._unsynced.add(no)

    def _flush_acks(self) -> None:
        if self._acks:
            ids = array("q", self._acks)
            self._acks = []
            self._record(ACKS, ids.tobytes())

    @_guarded
    def sync(self) -> None:
        """Make everything written so far durable: what a power cut can no longer take."""
        self._flush_acks()
        self._write()
        for no in sorted(self._unsynced):
            if no == -1:
                storefiles.fsync_dir(self.path)
            elif no in self._segments:
                os.fdatasync(self._append_fd(no))
        self._unsynced.clear()
        for no in list(self._fds):  # only the active segment stays open
            if no != max(self._segments, default=None):
                os.close(self._fds.pop(no))
        if self._state_dirty:
            self._write_state(clean=False)

    @property
    def unsynced(self) -> bool:
        return bool(self._unsynced or self._pending or self._acks or self._state_dirty)

    # ---------------------------------------------------------- sessions

    @property
    def last_session(self) -> int:
        return self._counters["session"]

    @property
    def dropped(self) -> int:
        return self._counters["dropped"]

    @property
    def events_waiting(self) -> int:
        return len(self._events)

    @_guarded
    def check_integrity(self) -> str | None:
        """None when opening found everything readable; else what it found damaged (the rest is kept)."""
        return "; ".join(self.notes) if self.notes else None

    @_guarded
    def start_session(self, catalogue: Sequence[PointInfo], now_ms: int, *, after: int = 0) -> int:
        """Count a new boot and remember its catalogue; above this spool's last session and `after`."""
        session = max(self._counters["session"], after) + 1
        self._counters["session"] = session
        self._sessions[session] = _Session([[p.device, p.name, p.unit, p.type] for p in catalogue], now_ms)
        self._write_state(clean=False)
        return session

    @_guarded
    def adopt_session(self, session: int, catalogue: Sequence[PointInfo], started_ms: int,
                      *, issued: dict[str, int] | None = None) -> None:
        """Carry a running session into this (fresh) spool, numbering above `issued` (kind → next seq)."""
        self._counters["session"] = max(self._counters["session"], session)
        s = self._sessions.setdefault(session, _Session([[p.device, p.name, p.unit, p.type] for p in catalogue], started_ms))
        for kind, nxt in (issued or {}).items():
            self._next_seq[(session, kind)] = max(nxt, self._next_seq.get((session, kind), 1))
            s.reserved[kind] = max(s.reserved.get(kind, 1), nxt)
        self._write_state(clean=False)

    # ---------------------------------------------------------- carrying an older spool over (gateway.spool_migrate)

    @_guarded
    def carry_session(self, session: int, catalogue: list[list[Any]], started_ms: int, next_seqs: dict[str, int]) -> None:
        s = self._sessions.setdefault(session, _Session(catalogue, started_ms))
        for kind, nxt in next_seqs.items():
            self._next_seq[(session, kind)] = max(nxt, self._next_seq.get((session, kind), 1))
            s.reserved[kind] = max(s.reserved.get(kind, 1), nxt)
        self._counters["session"] = max(self._counters["session"], session)
        self._state_dirty = True

    @_guarded
    def carry_message(self, kind: str, session: int, seq: int, payload: bytes, count: int, *, historical: bool) -> None:
        self._message(kind, session, seq, payload, count, [], historical=historical, backlog=historical and kind == DATA)
        key = (session, kind)
        self._next_seq[key] = max(self._next_seq.get(key, 1), seq + 1)

    @_guarded
    def carry_counters(self, *, dropped: int, rejected: int, session: int) -> None:
        self._counters["dropped"] += dropped
        self._counters["rejected"] += rejected
        self._counters["session"] = max(self._counters["session"], session)
        self._state_dirty = True

    def issued(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for (session, kind), nxt in self._next_seq.items():
            out.setdefault(session, {})[kind] = nxt
        return out

    @_guarded
    def catalogue(self, session: int) -> tuple[tuple[PointInfo, ...], int] | None:
        s = self._sessions.get(session)
        if s is None:
            return None
        return tuple(PointInfo(*e) for e in s.catalogue), s.started_ms

    def _pending_session_set(self) -> set[int]:
        found = {p.session for p in self._polls} | {e.session for e in self._events} | {lv.session for lv in self._live.values()}
        if len(self._backlog):
            found |= set(self._backlog.sessions[self._backlog.head :])
        return found

    @_guarded
    def pending_sessions(self) -> list[int]:
        """Sessions that still have something waiting: their births must reach the platform first."""
        return sorted(self._pending_session_set())

    def _take_seq(self, session: int, kind: str) -> int:
        key = (session, kind)
        seq = self._next_seq.get(key, 1)
        s = self._sessions.get(session)
        if s is None:  # readings of a session the state lost: keep them sendable
            s = self._sessions[session] = _Session([], 0)
        if seq >= s.reserved.get(kind, 1):
            before = dict(s.reserved)
            s.reserved[kind] = seq + SEQ_BLOCK  # durable before the number is used
            try:
                self._write_state(clean=False)
            except BaseException:
                s.reserved = before
                raise
        self._next_seq[key] = seq + 1
        return seq

    # ---------------------------------------------------------- storing

    @_guarded
    def append(self, session: int, readings: Sequence[Reading]) -> None:
        self.store([(session, readings)], [])

    @_guarded
    def append_events(self, session: int, events: Sequence[wire.Event]) -> None:
        self.store([], [(session, events)])

    @_guarded
    def store(self, polls: Sequence[tuple[int, Sequence[Reading]]], events: Sequence[tuple[int, Sequence[wire.Event]]],
              *, dropped: int = 0, now_ms: int | None = None) -> None:
        """Append polls and alarm events (one write for all); durable at the next sync().

        `dropped` adds to the count of readings lost before they reached the spool. With `now_ms`, polls
        that have waited unsealed for `historical_after_ms` become historical messages (the uplink is away).
        """
        new_events, new_polls = [], []
        for session, evs in events:
            for e in evs:
                eid = self._new_id()  # an id burnt by a failed write is never reused
                loc = self._record(EVENTS, EVENT_HEAD.pack(eid, session, e.ts_ms) + event_blob(e))
                new_events.append(_Event(eid, session, e.ts_ms, *loc))
        for session, readings in polls:
            if not readings:
                continue
            pid = self._new_id()
            ts = max(r.ts_ms for r in readings)
            # A reading's time as its distance from the poll's newest (one byte, not nine) and a good quality
            # left out: a 10-reading poll is 120 bytes, not 200, and at 10 readings/s that is pages not written.
            body = cbor2.dumps([[r.point, ts - r.ts_ms, wire.wire_value(r.value)] if r.quality == 0 else
                                [r.point, ts - r.ts_ms, wire.wire_value(r.value), int(r.quality)] for r in readings])
            loc = self._record(POLL, POLL_HEAD.pack(pid, session, ts, len(readings)) + body)
            new_polls.append(_Poll(pid, session, ts, len(readings), *loc, readings=readings))
        self._flush_acks()
        self._write()
        for e in new_events:
            self._events.append(e)
            self._segments[e.seg].alive += 1
        for p in new_polls:
            self._polls.append(p)
            self._segments[p.seg].alive += 1
        if len(self._polls) > CACHED_POLLS:  # the uplink is away: older polls are read back when sealed
            self._polls[-CACHED_POLLS - 1].readings = None
        if dropped:
            self._counters["dropped"] += dropped
            self._state_dirty = True
        if now_ms is not None and self._polls and self._polls[0].ts < now_ms - self.historical_after_ms:
            self._seal_aged(now_ms)
        if self.size_bytes() > self.max_bytes:
            self.enforce_budget()

    def _new_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    # ---------------------------------------------------------- reading records back

    def _raw(self, no: int, off: int, length: int) -> bytes:
        seg = self._segments.get(no)
        if seg is None:
            raise SpoolError(f"spool {self.path}: segment {no} is gone", corrupt=True)
        fd = self._rfds.get(no)
        if fd is None:
            if len(self._rfds) >= 8:  # a few segments are read at a time: the backlog's, the live lane's
                os.close(self._rfds.pop(next(iter(self._rfds))))
            fd = self._rfds[no] = os.open(seg.path, os.O_RDONLY)
        raw = os.pread(fd, length, off)
        if len(raw) != length:
            raise SpoolError(f"spool {self.path}: segment {no} is shorter than its index says", corrupt=True)
        return raw

    def _read(self, no: int, off: int, length: int) -> bytes:
        return self._raw(no, off, length)[HEAD.size :]

    def _poll_readings(self, p: _Poll) -> list[Reading]:
        items: list[Any] = cbor2.loads(self._read(p.seg, p.off, p.length)[POLL_HEAD.size :])
        return [Reading(x[0], p.ts - x[1], wire.decode_value(x[2]), x[3] if len(x) > 3 else 0) for x in items]

    # ---------------------------------------------------------- sealing

    def _message(self, kind: str, session: int, seq: int, payload: bytes, count: int, taken: list[Any],
                 *, historical: bool, backlog: bool) -> Message:
        """Write one sealed message and record it in its lane; the caller then marks what it consumed."""
        mid = self._new_id()
        consumed = cbor2.dumps(taken)
        flags = (F_ALARM if kind == ALARM else 0) | (F_HISTORICAL if historical else 0)
        no, off, length = self._record(MESSAGE, MSG_HEAD.pack(mid, flags, session, seq, count, len(consumed)) + consumed + payload)
        self._write()
        self._segments[no].alive += 1
        if backlog:
            self._backlog.append(mid, session, no, off, length, count)
        else:
            self._live[mid] = _Live(kind, session, no, off, length, count)
        return Message(mid, kind, seq, session, payload, count)

    def _seal_polls(self, polls: Sequence[_Poll], max_readings: int, *, historical: bool, backlog: bool) -> Message | None:
        """Whole polls of one session, in order, up to `max_readings`, into one data message. A poll is never
        split (one larger than `max_readings` is a message of its own), so a record is either untouched or
        sealed: nothing half-consumed has to survive a restart or a copy."""
        if not polls:
            return None
        session = polls[0].session
        unset = clock_unset(polls[0].ts)
        readings: list[Reading] = []
        taken: list[_Poll] = []
        newest: dict[int, int] = {}  # point → its latest time in this message
        for p in polls:
            if p.session != session or (taken and len(readings) + p.n > max_readings):
                break
            if taken and clock_unset(p.ts) != unset:
                break  # stamped before and after the clock was set: never one message (the flag is per message)
            rs = p.readings if p.readings is not None else self._poll_readings(p)
            if taken and any(newest.get(r.point, r.ts_ms) > r.ts_ms for r in rs):
                break  # the clock stepped back: a message orders by time, so this poll would come out first
            for r in rs:
                newest[r.point] = r.ts_ms
            readings += rs
            taken.append(p)
        seq = self._take_seq(session, DATA)
        payload = wire.encode_data(session, seq, readings, historical=historical, clock_unset=unset)
        m = self._message(DATA, session, seq, payload, len(readings), [p.id for p in taken], historical=historical, backlog=backlog)
        gone = {p.id for p in taken}
        self._polls = deque(p for p in self._polls if p.id not in gone)
        for p in taken:
            self._dead(p.seg)
        return m

    def _seal_aged(self, now_ms: int) -> None:
        cutoff = now_ms - self.historical_after_ms
        while self._polls and self._polls[0].ts < cutoff:
            aged = list(_prefix(self._polls, lambda p: p.ts < cutoff))
            if self._seal_polls(aged, self.batch_max, historical=True, backlog=True) is None:
                break

    @_guarded
    def seal_aged(self, now_ms: int) -> None:
        """Polls unsealed for `historical_after_ms` (the uplink is away) become historical messages, many
        polls to one: a long outage costs the log its readings' bytes, and the index an entry per message."""
        self._seal_aged(now_ms)

    @_guarded
    def seal_alarms(self, max_events: int, *, now_ms: int, historical_after_ms: int) -> Message | None:
        """The oldest pending events (of one session, all historical or all live) into the next alarm message."""
        if not self._events:
            return None
        session = self._events[0].session
        events: list[wire.Event] = []
        taken: list[_Event] = []
        late: bool | None = None
        unset = clock_unset(self._events[0].ts)
        for e in list(self._events)[:max_events]:
            if e.session != session:
                break
            old = now_ms - e.ts > historical_after_ms
            if late is None:
                late = old
            elif old != late:  # a message is all historical or all live: the flag is exact per event
                break
            if clock_unset(e.ts) != unset:
                break  # stamped before and after the clock was set (events keep their order whatever their times)
            events.append(event_from_blob(self._read(e.seg, e.off, e.length)[EVENT_HEAD.size :]))
            taken.append(e)
        seq = self._take_seq(session, ALARM)
        payload = wire.encode_alarm(session, seq, events, historical=bool(late), clock_unset=unset)
        m = self._message(ALARM, session, seq, payload, len(events), [e.id for e in taken], historical=bool(late), backlog=False)
        for e in taken:
            self._events.remove(e)
            self._dead(e.seg)
        return m

    @_guarded
    def seal(self, max_readings: int, *, now_ms: int, historical_after_ms: int, live: bool = False) -> Message | None:
        """`live=True`: unsealed polls, oldest first, into the next data message of their session, sent now
        (historical when its polls are older than `historical_after_ms`; polls on both sides of that line go
        in separate messages). `live=False`: the next message of the historical backlog, in order, each
        handed out once per connection (mark_backlog starts the lane again); when it is empty, unsealed
        polls as with `live=True`."""
        if live:
            if not self._polls:
                return None
            late = self._polls[0].ts < now_ms - historical_after_ms
            group = list(_prefix(self._polls, lambda p: (p.ts < now_ms - historical_after_ms) == late))
            return self._seal_polls(group, max_readings, historical=late, backlog=False)
        for i, mid, session, no, off, length, count in self._backlog.entries(self._handed):
            self._handed = i + 1
            return self._as_message(mid, no, off, length, count)
        return self.seal(max_readings, now_ms=now_ms, historical_after_ms=historical_after_ms, live=True)

    def _as_message(self, mid: int, no: int, off: int, length: int, count: int) -> Message:
        body = self._read(no, off, length)
        _, flags, session, seq, _, clen = MSG_HEAD.unpack_from(body)
        return Message(mid, ALARM if flags & F_ALARM else DATA, seq, session, body[MSG_HEAD.size + clen :], count)

    # ---------------------------------------------------------- draining

    @_guarded
    def backlog(self) -> int:
        """Readings waiting: unsealed polls and historical messages."""
        return sum(p.n for p in self._polls) + self._backlog.readings

    @_guarded
    def summary(self) -> dict[str, int | None]:
        """What waits to be sent, for metrics and a status page: `messages` sealed and not acknowledged,
        `readings` in unsealed polls and unacknowledged data messages, `events` not yet sealed, the log's
        `bytes`, and `oldest_ms`, the time of the oldest reading waiting (None when none waits). Reads at
        most two message heads from the log; one it cannot read is left out (the uplink will meet it)."""
        live = {mid: lv for mid, lv in self._live.items() if lv.kind == DATA}
        candidates: list[int] = [self._polls[0].ts] if self._polls else []  # a poll's newest time: close enough
        heads: list[tuple[int, int, int, int]] = []
        if live:  # ids grow as messages are sealed: the smallest holds the oldest readings
            first = min(live)
            heads.append((first, live[first].seg, live[first].off, live[first].length))
        for _, mid, _, no, off, length, _ in self._backlog.entries():
            heads.append((mid, no, off, length))
            break
        for mid, no, off, length in heads:
            t0 = self._t0_cache.get(mid)
            if t0 is None:
                try:
                    body = self._read(no, off, length)
                    _, _, _, _, _, clen = MSG_HEAD.unpack_from(body)
                    t0 = cbor2.loads(body[MSG_HEAD.size + clen :])[wire.K_T0]
                except (SpoolError, OSError, ValueError, LookupError, TypeError, struct.error):
                    continue
                self._t0_cache = {m: t for m, t in self._t0_cache.items() if m in {h[0] for h in heads}}
                self._t0_cache[mid] = t0
            candidates.append(t0)
        return {
            "messages": len(self._live) + len(self._backlog),
            "readings": sum(p.n for p in self._polls) + self._backlog.readings + sum(lv.count for lv in live.values()),
            "events": len(self._events),
            "bytes": sum(s.size for s in self._segments.values()) + len(self._pending),
            "oldest_ms": min(candidates) if candidates else None,
        }

    @_guarded
    def mark_backlog(self, *, older_than_ms: int | None = None) -> int:
        """The uplink just connected: the backlog lane starts again from its oldest message (what was handed
        out on the last connection and not acknowledged goes again). Returns the readings waiting in it.
        (`older_than_ms` is accepted for the uplink's sake: young polls are unsealed and go live anyway.)"""
        self._handed = 0
        return self._backlog.readings

    @_guarded
    def unsent(self, limit: int = 100, *, exclude: Collection[int] = ()) -> list[Message]:
        """Alarm messages, then live data messages not yet acknowledged, each oldest first."""
        order = sorted(self._live.items(), key=lambda kv: (kv[1].kind != ALARM, kv[0]))
        out = []
        for mid, lv in order:
            if mid in exclude:
                continue
            out.append(self._as_message(mid, lv.seg, lv.off, lv.length, lv.count))
            if len(out) >= limit:
                break
        return out

    @_guarded
    def delivered(self, message_id: int) -> None:
        """The broker acknowledged this message: forget it (its ack record goes with the next write)."""
        if self._forget(message_id):
            self._acks.append(message_id)
            if len(self._acks) >= 256:
                self._flush_acks()
                self._write()
            self._delete_dead_segments()

    def _forget(self, mid: int) -> bool:
        lv = self._live.pop(mid, None)
        if lv is not None:
            self._dead(lv.seg)
            return True
        found = self._backlog.remove(mid)
        if found is not None:
            self._dead(found[0])
            return True
        return False

    def _find(self, mid: int) -> Message | None:
        lv = self._live.get(mid)
        if lv is not None:
            return self._as_message(mid, lv.seg, lv.off, lv.length, lv.count)
        i = self._backlog.position(mid)
        if i is None:
            return None
        b = self._backlog
        return self._as_message(mid, b.segs[i], b.offs[i], b.lens[i], b.counts[i])

    @_guarded
    def rejected(self, message_id: int, reason: str) -> None:
        """The broker refused this message for good: into the dead-letter file, with the reason."""
        m = self._find(message_id)
        if m is None:
            return
        self._dead_letter(m, reason[:500])
        self._record(REFUSED, struct.pack("<q", message_id) + reason[:500].encode())
        self._write()
        self._forget(message_id)
        self._counters["rejected"] += 1
        self._state_dirty = True
        self._delete_dead_segments()

    def _dead_letter(self, m: Message, reason: str) -> None:
        path = self.path / "dead-letters.log"
        entry = cbor2.dumps([m.kind, m.session, m.seq, reason, m.payload])
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, len(entry).to_bytes(4, "little") + entry)
        finally:
            os.close(fd)
        if self._counters["rejected"] % 1000 == 999:  # now and then, keep the newest
            letters = self.dead_letters(MAX_DEAD_LETTERS + 1, payloads=True)
            if len(letters) > MAX_DEAD_LETTERS:
                keep = list(reversed(letters[:MAX_DEAD_LETTERS]))
                data = b"".join(len(e).to_bytes(4, "little") + e for e in (cbor2.dumps(list(x)) for x in keep))
                tmp = path.with_suffix(".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                os.replace(tmp, path)

    def dead_letters(self, limit: int = 100, *, payloads: bool = False) -> list[Any]:
        """The newest refused messages: (kind, session, seq, reason[, payload])."""
        return read_dead_letters(self.path, limit, payloads=payloads)

    # ---------------------------------------------------------- segments and the budget

    def _dead(self, no: int) -> None:
        seg = self._segments.get(no)
        if seg is not None:
            seg.alive -= 1

    def _delete_dead_segments(self) -> None:
        """Oldest first (acks in a newer segment must not outlive the messages they acknowledge): a segment
        goes when nothing in it is alive, never the one being written."""
        active = max(self._segments) if self._segments else None
        for no in sorted(self._segments):
            if no == active or self._segments[no].alive > 0:
                return
            self._drop_file(no)

    def _drop_file(self, no: int) -> None:
        for fds in (self._fds, self._rfds):
            fd = fds.pop(no, None)
            if fd is not None:
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self._segments[no].path.unlink()
        del self._segments[no]
        self._unsynced.discard(no)
        self._unsynced.add(-1)

    @_guarded
    def size_bytes(self) -> int:
        return sum(s.size for s in self._segments.values()) + len(self._pending)

    @_guarded
    def enforce_budget(self) -> int:
        """Past `max_bytes`, drop the oldest segment's routine readings (historical messages and unsealed
        polls, counted), after copying forward what else in it is alive: alarm events and messages, and data
        messages already on their way. Returns how many readings were dropped."""
        dropped = 0
        while self.size_bytes() > self.max_bytes and len(self._segments) > 1:
            before = self.size_bytes()
            dropped += self._evict_oldest()
            if self.size_bytes() >= before:
                break  # everything left is alarms, live data or young polls, which are never dropped
        if dropped:
            log.warning("spool %s over its budget of %d bytes: dropped the %d oldest readings (%d in all)",
                        self.path, self.max_bytes, dropped, self._counters["dropped"])
        return dropped

    @_guarded
    def make_room(self) -> int:
        """The disk is full: drop the oldest segment, if nothing alive in it needs a copy (that needs room).
        Returns how many readings were dropped."""
        if len(self._segments) < 2:
            return 0
        no = min(self._segments)
        if any(e.seg == no for e in self._events) or any(lv.seg == no for lv in self._live.values()):
            return 0
        return self._evict_oldest()

    def _evict_oldest(self) -> int:
        no = min(self._segments)
        dropped = 0
        for _, mid, _, sno, _, _, count in list(self._backlog.entries()):
            if sno == no:
                self._backlog.remove(mid)
                dropped += count
        for p in [p for p in self._polls if p.seg == no]:  # unsealed polls are routine readings too
            self._polls.remove(p)
            dropped += p.n
        self._copy_forward(no, self._events)
        self._copy_forward(no, self._live.values())
        self._write()
        self._counters["dropped"] += dropped
        self._state_dirty = True
        self._drop_file(no)
        self._recount()
        self._handed = 0
        return dropped

    def _copy_forward(self, no: int, items: Iterable[_Poll | _Event | _Live]) -> None:
        """Records of segment `no` that are still alive, appended again (they move before it goes)."""
        for x in items:
            if x.seg == no:
                x.seg, x.off, x.length = self._copy(no, x.off, x.length)

    def _copy(self, no: int, off: int, length: int) -> tuple[int, int, int]:
        raw = self._raw(no, off, length)  # the same record, byte for byte, at the end of the log
        return self._record(raw[1], raw[HEAD.size :])

    # ---------------------------------------------------------- closing

    def checkpoint(self) -> None:
        self.sync()

    def close(self) -> None:
        """Write and sync what is queued and mark the stop clean (numbering then resumes exactly)."""
        with self._lock:
            if self._closed:
                return
            try:
                self.sync()
                self._write_state(clean=True)
            except (OSError, SpoolError) as exc:
                log.warning("spool %s: %s (closing anyway; what was acknowledged may be sent again)", self.path, exc)
            finally:
                self._release()

    def _release(self) -> None:
        self._closed = True
        for fds in (self._fds, self._rfds):
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            fds.clear()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None



def read_dead_letters(spool_dir: Path, limit: int = 100, *, payloads: bool = False) -> list[Any]:
    """The newest messages the broker refused for good, newest first: (kind, session, seq, reason[, payload]).

    Needs no lock: entries are appended whole and the file is only ever replaced, so `yujing dead-letters`
    reads it while the gateway runs.
    """
    try:
        data = (spool_dir / "dead-letters.log").read_bytes()
    except FileNotFoundError:
        return []
    out = []
    off = 0
    while off + 4 <= len(data):
        n = int.from_bytes(data[off : off + 4], "little")
        if off + 4 + n > len(data):
            break
        with contextlib.suppress(ValueError, cbor2.CBORDecodeError):
            kind, session, seq, reason, payload = cbor2.loads(data[off + 4 : off + 4 + n])
            out.append((kind, session, seq, reason, payload) if payloads else (kind, session, seq, reason))
        off += 4 + n
    return list(reversed(out))[:limit]

def _prefix(items: Sequence[Any] | deque[Any], keep: Callable[[Any], bool]) -> Iterator[Any]:
    for item in items:
        if not keep(item):
            return
        yield item


def event_blob(e: wire.Event) -> bytes:
    return cbor2.dumps([wire.EVENT_KINDS.index(e.kind), e.rule, e.old_level, e.new_level, e.ts_ms,
                        {k: wire.wire_value(v) for k, v in e.values.items()}, e.message, e.by or ""], canonical=True)


def event_from_blob(blob: bytes) -> wire.Event:
    kind, rule, old, new, ts, values, message, by = cbor2.loads(blob)
    return wire.Event(wire.EVENT_KINDS[kind], rule, old, new, ts, {k: wire.decode_value(v) for k, v in values.items()}, message, by or None)
