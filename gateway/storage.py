"""The storage stage: the spool and the gateway's state files, on a thread of their own.

    poll path ─append()─▶ memory (bounded) ─▶ storage thread: one write per batch ─▶ spool (segment log)
    alarm desk ─append_events()─▶                  (events first)     └─▶ on_stored() wakes the uplink
    uplink ─await call(fn)─▶ the same thread, in order (seal, unsent, delivered …)
    every `power_cut_window_s`, and at once after alarm events ─▶ spool.sync() (fsync)

Nothing on the poll path waits for the disk: an SD card that stalls for seconds on fsync, a full disk
or a corrupt file delay only storing and publishing, never a siren. A batch the disk refuses stays in
memory (bounded: past `max_pending_readings` the oldest routine readings go, counted; alarm events are
kept up to `max_pending_events`) and is written when the disk takes it again: the stage retries with
backoff and, when the disk is full, first makes room by dropping the oldest routine readings inside the
file. A corrupt spool (at start or at any later statement) is moved aside and replaced by a fresh one,
and the session and its sequence numbers carry on above anything issued. Every such event is reported
through `on_fault`/`on_ok`, which the gateway turns into gateway_fault/gateway_ok alarm events.

A reading is accepted when `append` returns; it is in the kernel (safe from `kill -9`) when its batch is
written, a few milliseconds later (or when the disk takes it again), and on the card (safe from a power
cut) at the next sync: within `power_cut_window_s`, at once for alarm events. The window is what a power
cut may take, traded for what the card is spared: docs/design/spool.md has the figures.

A spool of an older release (one SQLite file where the log's directory goes) is carried into the log at
start, message for message, and then removed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import storefiles, wire
from .model import PointInfo, Reading
from .spool import Spool, SpoolError

log = logging.getLogger("yujing.storage")

R = TypeVar("R")
SOURCE = "storage"
LEGACY_COMPANIONS = ("-wal", "-shm")


@dataclass
class Startup:
    """What opening the state found: the session this boot runs as, and what had to be set aside."""

    session: int
    notes: list[str] = field(default_factory=list)  # faults to report once the alarm desk is up


class BootCounter:
    """The session counter kept outside the spool (state/session.json), so a replaced spool never
    restarts the numbering."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self, notes: list[str]) -> int:
        try:
            raw = storefiles.read_json(self.path)
        except ValueError as exc:
            aside = storefiles.quarantine(self.path)
            notes.append(f"session counter unreadable ({exc}); moved to {aside.name}")
            return 0
        except OSError as exc:
            notes.append(f"session counter {self.path}: cannot read: {exc.strerror}")
            return 0
        if raw is None:
            return 0
        if not (isinstance(raw, dict) and isinstance(raw.get("session"), int) and raw["session"] >= 0):
            aside = storefiles.quarantine(self.path)
            notes.append(f"session counter {self.path} malformed; moved to {aside.name}")
            return 0
        return int(raw["session"])

    def write(self, session: int) -> None:
        storefiles.write_json_atomic(self.path, {"session": session})


class Storage:
    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 256 * 1024 * 1024,
        max_pending_readings: int = 200_000,
        max_pending_events: int = 10_000,
        on_fault: Callable[[str, str], None] | None = None,
        on_ok: Callable[[str, str], None] | None = None,
        on_stored: Callable[[], None] | None = None,
        retry_min_s: float = 1.0,
        retry_max_s: float = 30.0,
        liveness: Callable[[], float] = time.monotonic,
        power_cut_window_s: float = 5.0,
        historical_after_ms: int = 60_000,
        batch_max: int = 500,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.power_cut_window_s = power_cut_window_s
        self.historical_after_ms = historical_after_ms
        self.batch_max = batch_max
        self.clock_ms = clock_ms
        self._synced_at = -math.inf  # liveness time of the last sync
        self.max_pending_readings = max_pending_readings
        self.max_pending_events = max_pending_events
        self.on_fault = on_fault or (lambda source, message: None)
        self.on_ok = on_ok or (lambda source, message: None)
        self.on_stored = on_stored or (lambda: None)
        self.retry_min_s, self.retry_max_s = retry_min_s, retry_max_s
        self.liveness = liveness  # real seconds: a stalled disk is a fact of the world, not of a test's virtual clock
        self.spool: Spool | None = None
        self.session = 0
        self.catalogue: tuple[PointInfo, ...] = ()
        self.started_ms = 0
        self.boot = BootCounter(path.parent / "session.json")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="yujing-storage")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mem = threading.Lock()  # what is held in memory is shared by the event loop and the storage thread
        self._polls: deque[tuple[int, Sequence[Reading]]] = deque()
        self._events: deque[tuple[int, wire.Event]] = deque()
        self._pending_readings = 0
        self._unstored_dropped = 0  # readings dropped from memory, not yet counted in the spool
        self._flushing = False
        self._failure: SpoolError | None = None
        self._failures = 0
        self._retry_at = -math.inf
        self._poke = asyncio.Event()
        self._state_saves: dict[str, tuple[Callable[[Any], None], Any]] = {}  # latest pending save per file
        self._busy_since: float | None = None  # monotonic start of the job on the storage thread now
        self._state_failed: set[str] = set()
        self.stats = {"polls_stored": 0, "events_stored": 0, "dropped_in_memory": 0, "replaced": 0, "syncs": 0}

    # ---------------------------------------------------------- start and stop

    def open(self, catalogue: Sequence[PointInfo], now_ms: int) -> Startup:
        """Open (or replace) the spool and start this boot's session. Synchronous: called once at start,
        before polling. Never raises for the spool itself: a spool that cannot be opened is retried later
        while polling and alarms run. Raises OSError only when the state directory cannot be created."""
        notes: list[str] = []
        tightened = storefiles.secure_dir(self.path.parent)
        if tightened:
            log.warning("%s", tightened)
        self.catalogue, self.started_ms = tuple(catalogue), now_ms
        after = self.boot.read(notes)
        try:
            before = len(notes)
            spool = self._open_spool(notes)
            if spool.created and after > 0 and len(notes) == before:  # (a file set aside was reported already)
                notes.append(f"spool {self.path} was empty although this gateway had run {after} sessions before: "
                             "whatever it held is lost")
            self.session = spool.start_session(self.catalogue, now_ms, after=after)
            self.spool = spool
        except SpoolError as exc:
            self.session = after + 1
            self._fail(exc)
        try:
            self.boot.write(self.session)
        except OSError as exc:
            notes.append(f"session counter {self.boot.path}: cannot write: {exc.strerror}")
        return Startup(self.session, notes)

    def _new_spool(self) -> Spool:
        # Segments small enough that the budget holds several (a segment goes whole), at most 1 MiB.
        segment = max(64 * 1024, min(1 << 20, self.max_bytes // 8))
        return Spool(self.path, max_bytes=self.max_bytes, segment_bytes=segment, historical_after_ms=self.historical_after_ms,
                     batch_max=self.batch_max)

    def _legacy(self) -> Path | None:
        """A SQLite spool of an older release still to be carried over: at the configured path (a site file
        that names `spool.db`), under its old default name next to the log, or part-carried (renamed)."""
        for candidate in (self.path, self.path.with_name("spool.db")):
            if candidate.is_file():
                return candidate
            aside = candidate.with_name(candidate.name + ".sqlite-old")
            if aside.is_file():
                return aside
        return None

    def _open_spool(self, notes: list[str]) -> Spool:
        legacy = self._legacy()
        if legacy is not None:
            return self._carry_over(legacy, notes)
        try:
            spool = self._new_spool()
        except SpoolError as exc:
            if not exc.corrupt:
                raise
            aside = storefiles.quarantine(self.path)
            self.stats["replaced"] += 1
            notes.append(f"{exc}; moved to {aside.name} and started a fresh spool: its unsent readings and alarm events are lost")
            return self._new_spool()
        notes.extend(spool.notes)  # damage the log could read around: said once, the rest is kept
        return spool

    def _carry_over(self, found: Path, notes: list[str]) -> Spool:
        """Into a scratch directory, renamed to the spool's path only when complete: a gateway killed half way
        (power, kill -9) finds the old file again at its next start and carries it over from the beginning,
        never into a log that already holds half of it."""
        from .spool_migrate import carry_over

        legacy = found if found.name.endswith(".sqlite-old") else found.with_name(found.name + ".sqlite-old")
        if found != legacy:
            os.replace(found, legacy)
            for suffix in LEGACY_COMPANIONS:
                extra = found.with_name(found.name + suffix)
                if extra.exists():
                    os.replace(extra, legacy.with_name(legacy.name + suffix))
        scratch = self.path.with_name(self.path.name + ".carrying")
        shutil.rmtree(scratch, ignore_errors=True)
        if self.path.is_dir() and not any(self.path.glob("seg-*.log")):
            shutil.rmtree(self.path)  # an empty log made before the old file was seen: nothing in it yet
        if self.path.exists():
            notes.append(f"spool {legacy}: an older release's spool next to the log {self.path}, which holds data; "
                         "both are kept, the old one is not carried over (move one away and restart to choose)")
            return self._new_spool()
        try:
            spool = Spool(scratch, max_bytes=1 << 62)
            try:
                notes.extend(carry_over(legacy, spool))
            finally:
                spool.close()
            os.replace(scratch, self.path)
        except Exception as exc:  # what cannot be read stays aside for a person to look at
            shutil.rmtree(scratch, ignore_errors=True)
            notes.append(f"spool {legacy}: could not carry it over ({type(exc).__name__}: {exc}); it stays there, and the "
                         "gateway goes on with a fresh spool")
            return self._new_spool()
        for suffix in ("", *LEGACY_COMPANIONS):
            with contextlib.suppress(FileNotFoundError):
                legacy.with_name(legacy.name + suffix).unlink()
        return self._new_spool()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def flush(self, *, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until what is in memory is committed; quietly gives up on a failing disk."""
        if self._failure is not None or self._loop is None:
            return
        try:
            await asyncio.wait_for(self._loop.run_in_executor(self._executor, self._job, self._flush), timeout_s)
        except Exception:  # the retry loop has it in hand; a stop does not wait for a failing disk
            return
        self.on_stored()

    async def close(self) -> None:
        """Write what is still in memory (best effort, bounded) and close the spool."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._executor, self._job, self._close), 5.0)
        except Exception as exc:  # a stop must complete whatever the disk does
            log.warning("storage did not close cleanly: %s", exc)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _close(self) -> None:
        try:
            self._flush()
            self._save_states()
        except Exception as exc:
            log.warning("%s: %d readings and %d alarm events in memory are lost at stop", exc, self._pending_readings, len(self._events))
        if self.spool is not None:
            self.spool.close()

    # ---------------------------------------------------------- the poll path (never blocks, never raises)

    def append(self, readings: Sequence[Reading]) -> None:
        """Accept one poll of this session. Returns at once; the storage thread commits it."""
        if not readings:
            return
        with self._mem:
            self._polls.append((self.session, readings))
            self._pending_readings += len(readings)
            if self._pending_readings > self.max_pending_readings:
                self._drop_oldest_in_memory()
        self._kick()

    def append_events(self, events: Sequence[wire.Event]) -> None:
        """Accept alarm events of this session; committed before any reading waiting with them."""
        with self._mem:
            for e in events:
                self._events.append((self.session, e))
            over = len(self._events) - self.max_pending_events
            for _ in range(max(0, over)):
                self._events.popleft()
        if over > 0:
            log.error("storage: %d alarm events could not be kept in memory while the disk refuses them (oldest lost)", over)
        self._kick()

    def save_state(self, name: str, save: Callable[[Any], None], state: Any) -> None:
        """Write a small state file (alarm state, command counters) on the storage thread; only the latest
        state per name is written. Failures are reported and retried."""
        with self._mem:
            self._state_saves[name] = (save, state)
        self._kick()

    def _drop_oldest_in_memory(self) -> None:
        dropped = 0
        while self._pending_readings > self.max_pending_readings and len(self._polls) > 1:
            _, poll = self._polls.popleft()
            self._pending_readings -= len(poll)
            dropped += len(poll)
        self._unstored_dropped += dropped
        self.stats["dropped_in_memory"] += dropped
        if dropped:
            log.error("storage: memory bound of %d readings reached while the disk refuses writes: dropped the oldest %d "
                      "(%d in all)", self.max_pending_readings, dropped, self.stats["dropped_in_memory"])

    def _kick(self) -> None:
        if self._flushing or self._failure is not None or self._loop is None:
            return
        self._flushing = True
        future = self._loop.run_in_executor(self._executor, self._job, self._flush)
        future.add_done_callback(self._flushed)

    # ---------------------------------------------------------- the storage thread

    def _flush(self) -> tuple[int, int]:
        """Commit everything pending in one transaction. On failure nothing pending is lost."""
        self._save_states()
        spool = self.spool
        if spool is None:
            spool = self._reopen()
        with self._mem:
            polls, events = list(self._polls), list(self._events)
            self._polls.clear()
            self._events.clear()
            dropped, self._unstored_dropped = self._unstored_dropped, 0
        if not polls and not events and not dropped:
            self._sync_if_due(spool)
            return 0, 0
        try:
            spool.store(polls, _by_session(events), dropped=dropped, now_ms=self.clock_ms())
            if events:  # alarm events are on the card before anything else happens
                self._sync(spool)
            else:
                self._sync_if_due(spool)
        except BaseException:
            with self._mem:  # back to the front, in order: what arrived meanwhile is newer
                self._polls.extendleft(reversed(polls))
                self._events.extendleft(reversed(events))
                self._unstored_dropped += dropped
            raise
        with self._mem:
            self._pending_readings -= sum(len(p) for _, p in polls)
        return len(polls), len(events)

    def _sync(self, spool: Spool) -> None:
        spool.sync()
        self._synced_at = self.liveness()
        self.stats["syncs"] += 1

    def _sync_if_due(self, spool: Spool) -> None:
        if spool.unsynced and self.liveness() - self._synced_at >= self.power_cut_window_s:
            self._sync(spool)

    def _sync_job(self) -> None:
        if self.spool is not None:
            self._sync_if_due(self.spool)

    def _reopen(self) -> Spool:
        """Open the spool after it failed to open (or was set aside), carrying this boot's session on."""
        notes: list[str] = []
        spool = self._open_spool(notes)
        for note in notes:
            log.error("%s", note)
        spool.adopt_session(self.session, self.catalogue, self.started_ms)
        self.spool = spool
        return spool

    def _replace(self, error: SpoolError) -> None:
        """A statement found the spool corrupt: set it aside and go on in a fresh one, same session,
        sequence numbers above every one this process issued."""
        old = self.spool
        issued = old.issued() if old is not None else {}
        if old is not None:
            old.close()
        self.spool = None
        aside = storefiles.quarantine(self.path)
        self.stats["replaced"] += 1
        spool = self._new_spool()
        spool.adopt_session(self.session, self.catalogue, self.started_ms, issued=issued.get(self.session, {}))
        self.spool = spool
        message = f"{error}; moved to {aside.name} and started a fresh spool: its unsent readings and alarm events are lost"
        log.error("%s", message)
        self._call_soon(self.on_fault, SOURCE + ".replaced", message)

    def _save_states(self) -> None:
        while True:
            with self._mem:
                if not self._state_saves:
                    return
                name, (save, state) = self._state_saves.popitem()
            try:
                save(state)
            except OSError as exc:
                with self._mem:
                    self._state_saves.setdefault(name, (save, state))
                if name not in self._state_failed:
                    self._state_failed.add(name)
                    self._call_soon(self.on_fault, f"{SOURCE}.{name}", f"{name}: cannot save: {exc.strerror or exc}")
                return
            if name in self._state_failed:
                self._state_failed.discard(name)
                self._call_soon(self.on_ok, f"{SOURCE}.{name}", f"{name}: saved again")

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(fn, *args)

    # ---------------------------------------------------------- back on the event loop

    def _flushed(self, future: asyncio.Future[tuple[int, int]]) -> None:
        self._flushing = False
        exc = future.exception() if not future.cancelled() else None
        if exc is None and not future.cancelled():
            polls, events = future.result()
            self.stats["polls_stored"] += polls
            self.stats["events_stored"] += events
            if self._failure is not None:
                self._recovered()
            if polls or events:
                self.on_stored()
            if self._polls or self._events or self._state_saves:
                self._kick()
            return
        if isinstance(exc, SpoolError):
            self._fail(exc)
        elif exc is not None:
            self._fail(SpoolError(f"spool {self.path}: {type(exc).__name__}: {exc}"))
            log.error("storage: unexpected error", exc_info=exc)

    def _fail(self, exc: SpoolError) -> None:
        first = self._failure is None
        self._failure = exc
        self._failures += 1
        delay = min(self.retry_min_s * 2 ** min(self._failures - 1, 10), self.retry_max_s)
        self._retry_at = self.liveness() + delay
        self._poke.set()
        if first:
            message = f"{exc}; polling and alarms go on, readings wait in memory (up to {self.max_pending_readings})"
            log.error("%s", message)
            self.on_fault(SOURCE, message)

    def _recovered(self) -> None:
        message = f"spool {self.path} writes again after {self._failures} failed attempts"
        self._failure, self._failures = None, 0
        log.warning("%s", message)
        self.on_ok(SOURCE, message)

    @property
    def failing(self) -> SpoolError | None:
        return self._failure

    @property
    def pending_readings(self) -> int:
        return self._pending_readings

    @property
    def oldest_pending_ms(self) -> int | None:
        """The time of the oldest reading held in memory, not yet written to the spool (None when none is)."""
        with self._mem:
            poll = self._polls[0][1] if self._polls else None
        return min((r.ts_ms for r in poll), default=None) if poll else None

    @property
    def events_waiting(self) -> int:
        return len(self._events) + (self.spool.events_waiting if self.spool is not None else 0)

    async def run(self) -> None:
        """Retry a failed disk with backoff; make room when it is full; replace a corrupt spool."""
        loop = asyncio.get_running_loop()
        self.bind(loop)
        self._kick()
        while True:
            self._poke.clear()
            if self._failure is None:
                # Written but not yet synced (the uplink's seals and acks, a quiet poll): the window bounds it.
                due = self._synced_at + self.power_cut_window_s - self.liveness()
                spool = self.spool
                if spool is not None and spool.unsynced and due <= 0:
                    try:
                        await loop.run_in_executor(self._executor, self._job, self._sync_job)
                    except SpoolError as exc:
                        self._fail(exc)
                    except Exception as exc:
                        log.error("storage: unexpected error", exc_info=exc)
                        self._fail(SpoolError(f"spool {self.path}: {type(exc).__name__}: {exc}"))
                    continue
                try:
                    await asyncio.wait_for(self._poke.wait(), max(due, 0.05) if spool is not None and spool.unsynced
                                           else self.power_cut_window_s or 1.0)
                except TimeoutError:
                    pass
                continue
            wait = self._retry_at - self.liveness()
            if wait > 0:
                try:
                    await asyncio.wait_for(self._poke.wait(), wait)
                except TimeoutError:
                    pass
                continue
            failure = self._failure
            try:
                await loop.run_in_executor(self._executor, self._job, self._repair, failure)
                polls, events = await loop.run_in_executor(self._executor, self._job, self._flush)
            except SpoolError as exc:
                self._fail(exc)
                continue
            except Exception as exc:  # not the disk: a bug; held data stays in memory and is tried again
                log.error("storage: unexpected error", exc_info=exc)
                self._fail(SpoolError(f"spool {self.path}: {type(exc).__name__}: {exc}"))
                continue
            self.stats["polls_stored"] += polls
            self.stats["events_stored"] += events
            self._recovered()
            if polls or events:
                self.on_stored()
            self._kick()

    def _repair(self, failure: SpoolError) -> None:
        if failure.corrupt and self.spool is not None:
            self._replace(failure)
        elif failure.full and self.spool is not None:
            try:
                dropped = self.spool.make_room()
            except SpoolError:
                return  # no room even to delete: wait for space
            if dropped:
                log.warning("spool %s: disk full; dropped the %d oldest routine readings to make room", self.path, dropped)

    # ---------------------------------------------------------- for the uplink

    async def call(self, fn: Callable[[Spool], R]) -> R:
        """Run `fn(spool)` on the storage thread, after everything appended before it. Raises SpoolError
        (the spool is not open, or the statement failed; a corrupt file is replaced before this returns)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._job, self._call, fn)

    def _call(self, fn: Callable[[Spool], R]) -> R:
        spool = self.spool
        if spool is None:
            raise SpoolError(f"spool {self.path} is not open ({self._failure})")
        try:
            return fn(spool)
        except SpoolError as exc:
            if exc.corrupt:
                self._replace(exc)
            raise

    def query(self, fn: Callable[[Spool], R]) -> concurrent.futures.Future[R]:
        """`fn(spool)` on the storage thread, in order, without waiting for it (from any thread): for a status
        probe or metrics, which must never make the event loop wait on the spool's lock or a disk. The future
        raises SpoolError when the spool is not open; a failure here never replaces the spool (the uplink's
        calls do that). Raises RuntimeError once storage is closed."""
        return self._executor.submit(self._job, self._query, fn)

    def _query(self, fn: Callable[[Spool], R]) -> R:
        spool = self.spool
        if spool is None:
            raise SpoolError(f"spool {self.path} is not open ({self._failure})")
        return fn(spool)

    def delivered(self, message_id: int) -> None:
        """The broker acknowledged a message (from the event loop; recorded in order on the thread)."""
        if self._loop is not None:
            self._loop.run_in_executor(self._executor, self._job, self._delivered, message_id)

    def rejected(self, message_id: int, reason: str) -> None:
        """The broker refused a message for good (recorded in order on the storage thread)."""
        if self._loop is not None:
            self._loop.run_in_executor(self._executor, self._job, self._rejected, message_id, reason)

    def _rejected(self, message_id: int, reason: str) -> None:
        try:
            if self.spool is not None:
                self.spool.rejected(message_id, reason)
        except SpoolError as exc:
            log.warning("%s (the refused message stays and will be sent again)", exc)

    def _delivered(self, message_id: int) -> None:
        try:
            if self.spool is not None:
                self.spool.delivered(message_id)
        except SpoolError as exc:
            log.warning("%s (the message will be sent again)", exc)

    async def run_io(self, fn: Callable[..., R], *args: Any) -> R:
        """Any other small file operation, on the storage thread (so the event loop never waits on a disk)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._job, fn, *args)

    def _job(self, fn: Callable[..., R], *args: Any) -> R:
        self._busy_since = self.liveness()
        try:
            return fn(*args)
        finally:
            self._busy_since = None

    def busy_s(self) -> float:
        """How long the storage thread has been in its current job (0 when idle): a stalled disk shows here."""
        since = self._busy_since
        return 0.0 if since is None else self.liveness() - since


def _by_session(events: list[tuple[int, wire.Event]]) -> list[tuple[int, list[wire.Event]]]:
    out: list[tuple[int, list[wire.Event]]] = []
    for session, e in events:
        if out and out[-1][0] == session:
            out[-1][1].append(e)
        else:
            out.append((session, [e]))
    return out
