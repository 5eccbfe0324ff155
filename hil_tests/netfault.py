"""An in-process TCP fault proxy for network fault injection (like toxiproxy, without root or a daemon).

    async with FaultProxy(upstream=("127.0.0.1", broker_port), seed=7) as proxy:
        ...point the client at 127.0.0.1:proxy.port...
        proxy.set(latency_s=0.2, jitter_s=0.1)      # per direction: latency_up_s / latency_down_s
        proxy.set(bandwidth_bps=20_000)             # bytes per second, each direction of each connection
        proxy.drop()                                # every live connection closed abruptly (RST)
        proxy.set(reset_rate=0.5)                   # random resets: 0.5 per second on average (Poisson)
        await proxy.half_open(12.0)                 # nothing forwarded, nothing answered; then the dead links RST
        await proxy.blackhole(8.0)                  # existing links stall, new ones wait; then all resume
        proxy.reset_all()                           # back to a clean link
        proxy.events                                # what was applied, with time.monotonic() stamps

"up" is client → upstream, "down" is upstream → client. Every random choice (jitter, the reset schedule, which
connection a random reset hits) comes from one `random.Random(seed)`, so a seed replays the same fault
sequence. Memory is bounded: each direction of each connection holds at most `buffer_chunks` chunks of at most
`chunk_bytes` bytes; when full, the proxy stops reading and TCP flow control pushes back on the sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

CHUNK = 16 * 1024


@dataclass(frozen=True)
class Faults:
    """The faults in force. Every field may be changed while connections are open."""

    latency_up_s: float = 0.0
    latency_down_s: float = 0.0
    jitter_s: float = 0.0  # each chunk's delay gets uniform(0, jitter_s) more (order is kept, as TCP keeps it)
    bandwidth_bps: float = 0.0  # bytes per second per direction per connection; 0: unlimited
    reset_rate: float = 0.0  # random abrupt resets per second (Poisson), each of one live connection


@dataclass(frozen=True)
class FaultEvent:
    t: float  # time.monotonic()
    kind: str  # set, drop, reset, half_open, half_open_end, blackhole, blackhole_end, clear
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, t0: float = 0.0) -> dict[str, Any]:
        return {"t": round(self.t - t0, 3), "kind": self.kind, **self.detail}


class _Conn:
    def __init__(self, cid: int, client_w: asyncio.StreamWriter) -> None:
        self.id = cid
        self.client_w = client_w
        self.upstream_w: asyncio.StreamWriter | None = None
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.half_open = False  # frozen by a half-open period: reset when it ends
        self.closed = False
        self.buffered = 0
        self.tasks: set[asyncio.Task[Any]] = set()

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client_w, self.upstream_w) if w is not None]


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close abruptly: SO_LINGER 0 makes the close send RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], *, seed: int = 0, listen: tuple[str, int] = ("127.0.0.1", 0),
                 chunk_bytes: int = CHUNK, buffer_chunks: int = 16) -> None:
        self.upstream = upstream
        self.seed = seed
        self.rng = random.Random(seed)
        # Sub-streams of the one seed, so that the reset schedule does not depend on how much traffic drew
        # jitter: the same seed gives the same reset intervals and choices whatever the timing.
        self._jitter_rng = random.Random(self.rng.getrandbits(64))
        self._reset_rng = random.Random(self.rng.getrandbits(64))
        self.listen = listen
        self.chunk_bytes = chunk_bytes
        self.buffer_chunks = buffer_chunks
        self.faults = Faults()
        self.events: list[FaultEvent] = []
        self.connections_total = 0
        self.buffered = 0  # bytes read and not yet written, over every connection
        self.buffered_peak = 0
        self.t0 = time.monotonic()
        self._server: asyncio.base_events.Server | None = None
        self._conns: dict[int, _Conn] = {}
        self._next_id = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._new_held = asyncio.Event()  # cleared: new connections wait (blackhole or half-open)
        self._new_held.set()
        self._new_half_open = False
        self._reset_task: asyncio.Task[None] | None = None
        self.port = 0

    # -- life cycle -------------------------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        self.t0 = time.monotonic()
        return self

    async def aclose(self) -> None:
        if self._reset_task is not None:
            self._reset_task.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            self._abort(conn)
        tasks = list(self._tasks) + ([self._reset_task] if self._reset_task else [])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def live(self) -> int:
        return len(self._conns)

    def _log(self, kind: str, **detail: Any) -> None:
        self.events.append(FaultEvent(time.monotonic(), kind, detail))

    def report(self) -> list[dict[str, Any]]:
        """The events as JSON-ready dicts, `t` in seconds since the proxy started."""
        return [e.as_dict(self.t0) for e in self.events]

    # -- the fault controls ----------------------------------------------------------------------------------

    def set(self, *, latency_s: float | None = None, **changes: float) -> Faults:
        """Change faults; `latency_s` sets both directions. Unnamed fields keep their value."""
        if latency_s is not None:
            changes.setdefault("latency_up_s", latency_s)
            changes.setdefault("latency_down_s", latency_s)
        for k, v in changes.items():
            if not hasattr(self.faults, k):
                raise TypeError(f"unknown fault {k!r}")
            if v < 0:
                raise ValueError(f"{k} = {v}: must be >= 0")
        self.faults = replace(self.faults, **changes)
        self._log("set", **{k: v for k, v in asdict(self.faults).items() if v})
        self._schedule_resets()
        return self.faults

    def reset_all(self) -> None:
        """Back to a clean link: no latency, no limit, no random resets; stalled connections flow again (those
        frozen by a half-open period are reset, as their peer is gone)."""
        self.faults = Faults()
        self._schedule_resets()
        self._end_hold()
        self._log("clear")

    def drop(self) -> int:
        """Close every live connection abruptly (RST to both sides). Returns how many."""
        conns = list(self._conns.values())
        for conn in conns:
            self._abort(conn)
        self._log("drop", connections=len(conns))
        return len(conns)

    def start_half_open(self) -> None:
        """From now on nothing is forwarded in either direction and nothing is answered, but every socket stays
        open (a NAT mapping that died, a peer that lost power): only keepalives can find out."""
        for conn in self._conns.values():
            conn.flowing.clear()
            conn.half_open = True
        self._new_held.clear()
        self._new_half_open = True
        self._log("half_open", connections=len(self._conns))

    async def half_open(self, seconds: float) -> None:
        self.start_half_open()
        await asyncio.sleep(seconds)
        self._end_hold()

    def start_blackhole(self) -> None:
        """From now on existing connections stall (nothing forwarded) and new ones are accepted but not served;
        at the end all of them go on as if nothing happened (a link that went away and came back)."""
        for conn in self._conns.values():
            conn.flowing.clear()
        self._new_held.clear()
        self._new_half_open = False
        self._log("blackhole", connections=len(self._conns))

    async def blackhole(self, seconds: float) -> None:
        self.start_blackhole()
        await asyncio.sleep(seconds)
        self._end_hold()

    def _end_hold(self) -> None:
        if self._new_held.is_set() and all(c.flowing.is_set() for c in self._conns.values()):
            return
        reset = 0
        for conn in list(self._conns.values()):
            if conn.half_open:
                self._abort(conn)
                reset += 1
            else:
                conn.flowing.set()
        kind = "half_open_end" if self._new_half_open else "blackhole_end"
        self._new_half_open = False
        self._new_held.set()
        self._log(kind, reset=reset, resumed=len(self._conns))

    # -- random resets ---------------------------------------------------------------------------------------

    def _schedule_resets(self) -> None:
        rate = self.faults.reset_rate
        if self._reset_task is not None:
            if rate > 0:
                return  # the running schedule reads the current rate at each step
            self._reset_task.cancel()
            self._reset_task = None
        if rate > 0:
            self._reset_task = asyncio.get_running_loop().create_task(self._resets())

    async def _resets(self) -> None:
        while self.faults.reset_rate > 0:
            after = self._reset_rng.expovariate(self.faults.reset_rate)
            pick = self._reset_rng.random()  # drawn whether or not a connection is there: the stream stays aligned
            await asyncio.sleep(after)
            if self.faults.reset_rate <= 0:
                break
            live = sorted(c for c, conn in self._conns.items() if conn.upstream_w is not None)
            if not live:
                self._log("reset", after_s=round(after, 6), connection=None)
                continue
            cid = live[int(pick * len(live))]
            self._abort(self._conns[cid])
            self._log("reset", after_s=round(after, 6), connection=cid)

    # -- forwarding --------------------------------------------------------------------------------------------

    def _forget(self, conn: _Conn) -> None:
        self._conns.pop(conn.id, None)
        self.buffered -= conn.buffered
        conn.buffered = 0

    def _abort(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        for w in conn.writers():
            _rst(w)
        for t in conn.tasks:
            t.cancel()
        self._forget(conn)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)
        self._next_id += 1
        self.connections_total += 1
        conn = _Conn(self._next_id, client_w)
        self._conns[conn.id] = conn
        try:
            if not self._new_held.is_set():
                conn.flowing.clear()
                conn.half_open = self._new_half_open
                await self._new_held.wait()
                if conn.closed:
                    return
            try:
                up_r, up_w = await asyncio.open_connection(*self.upstream)
            except OSError:
                self._abort(conn)  # upstream refuses: so does the proxy
                return
            if conn.closed:
                _rst(up_w)
                return
            conn.upstream_w = up_w
            pumps = [self._pump(conn, client_r, up_w, "up"), self._pump(conn, up_r, client_w, "down")]
            conn.tasks = {asyncio.get_running_loop().create_task(p) for p in pumps}
            await asyncio.gather(*conn.tasks, return_exceptions=True)
            if not conn.closed:
                conn.closed = True
                for w in conn.writers():
                    w.close()
        except asyncio.CancelledError:
            pass
        finally:
            self._forget(conn)
            if not conn.closed:
                conn.closed = True
                for w in conn.writers():
                    w.transport.abort()
            for t in conn.tasks:
                t.cancel()
            if me is not None:
                self._tasks.discard(me)

    async def _pump(self, conn: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
        """One direction: a reader that stamps each chunk with its delivery time, and a writer that waits until
        then (and for the bandwidth budget). A bounded queue between them."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(self.buffer_chunks)

        async def read() -> None:
            due = 0.0
            while True:
                await conn.flowing.wait()
                try:
                    data = await src.read(self.chunk_bytes)
                except (ConnectionError, OSError):
                    self._abort(conn)
                    return
                if not data:
                    await queue.put((0.0, b""))
                    return
                f = self.faults
                delay = f.latency_up_s if direction == "up" else f.latency_down_s
                if f.jitter_s > 0:
                    delay += self._jitter_rng.uniform(0.0, f.jitter_s)
                due = max(time.monotonic() + delay, due)  # never reorder
                await queue.put((due, data))
                conn.buffered += len(data)
                self.buffered += len(data)
                self.buffered_peak = max(self.buffered_peak, self.buffered)

        async def write() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    await conn.flowing.wait()
                    if dst.can_write_eof():
                        with contextlib.suppress(OSError, RuntimeError):
                            dst.write_eof()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                view = memoryview(data)
                conn.buffered -= len(data)
                self.buffered -= len(data)  # (counted out when taken: at most one chunk more per direction)
                while view:
                    await conn.flowing.wait()
                    bps = self.faults.bandwidth_bps
                    n = len(view) if bps <= 0 else max(1, min(len(view), int(bps / 20)))
                    dst.write(view[:n])
                    await dst.drain()
                    view = view[n:]
                    if bps > 0:
                        await asyncio.sleep(n / bps)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            await write()
        except (ConnectionError, OSError):
            self._abort(conn)  # one side reset: so is the other (what a real middlebox passes on)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await reader
