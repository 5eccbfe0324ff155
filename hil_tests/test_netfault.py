"""The fault proxy itself (hil_tests/netfault.py), against a real echo server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from .netfault import FaultProxy

pytestmark = pytest.mark.hil


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    writers: set[asyncio.StreamWriter] = set()

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.add(w)
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()
            writers.discard(w)

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in list(writers):
            w.transport.abort()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def proxied(seed: int = 1) -> AsyncIterator[FaultProxy]:
    async with echo_server() as port, FaultProxy(upstream=("127.0.0.1", port), seed=seed) as proxy:
        yield proxy


async def roundtrip(r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes = b"ping", timeout: float = 5.0) -> float:
    began = time.monotonic()
    w.write(data)
    await w.drain()
    got = await asyncio.wait_for(r.readexactly(len(data)), timeout)
    assert got == data
    return time.monotonic() - began


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def closed_by_peer(r: asyncio.StreamReader, timeout: float = 3.0) -> bool:
    """True when the connection was reset or closed by the other side within `timeout`."""
    try:
        data = await asyncio.wait_for(r.read(100), timeout)
    except ConnectionResetError:
        return True
    return data == b""


async def test_forwards_both_ways_unchanged() -> None:
    async with proxied() as proxy:
        r, w = await connect(proxy)
        payload = bytes(range(256)) * 400
        await roundtrip(r, w, payload)
        w.close()


async def test_latency_adds_at_least_what_it_says() -> None:
    async with proxied() as proxy:
        r, w = await connect(proxy)
        await roundtrip(r, w)
        proxy.set(latency_up_s=0.15, latency_down_s=0.1, jitter_s=0.05)
        rtts = [await roundtrip(r, w) for _ in range(3)]
        assert min(rtts) >= 0.25, rtts
        proxy.reset_all()
        assert await roundtrip(r, w) < 0.25
        w.close()


async def test_bandwidth_limit_slows_a_transfer_to_about_the_rate() -> None:
    size, rate = 200_000, 100_000
    async with proxied() as proxy:
        proxy.set(bandwidth_bps=rate)
        r, w = await connect(proxy)
        payload = b"x" * size
        began = time.monotonic()

        async def send() -> None:
            w.write(payload)
            await w.drain()

        _, got = await asyncio.gather(send(), asyncio.wait_for(r.readexactly(size), 30))
        took = time.monotonic() - began
        assert got == payload
        assert took >= 0.8 * size / rate, f"{size} bytes at {rate} B/s took only {took:.2f} s"
        w.close()


async def test_drop_resets_the_client_connection() -> None:
    async with proxied() as proxy:
        r, w = await connect(proxy)
        await roundtrip(r, w)
        assert proxy.drop() == 1
        assert await closed_by_peer(r)
        assert proxy.live == 0
        r2, w2 = await connect(proxy)  # a new connection works at once
        await roundtrip(r2, w2)
        w2.close()
        assert [e.kind for e in proxy.events] == ["drop"]


async def test_random_resets_close_connections() -> None:
    async with proxied(seed=5) as proxy:
        r, w = await connect(proxy)
        await roundtrip(r, w)
        proxy.set(reset_rate=10.0)
        assert await closed_by_peer(r, timeout=5.0)
        proxy.reset_all()
        assert any(e.kind == "reset" and e.detail["connection"] is not None for e in proxy.events)


async def test_half_open_leaves_the_client_hanging() -> None:
    async with proxied() as proxy:
        r, w = await connect(proxy)
        await roundtrip(r, w)
        proxy.start_half_open()
        with pytest.raises(TimeoutError):
            await roundtrip(r, w, timeout=1.0)
        r2, w2 = await connect(proxy)  # a new connection is accepted, and never answered either
        with pytest.raises(TimeoutError):
            await roundtrip(r2, w2, timeout=0.5)
        assert not w.is_closing()
        proxy.reset_all()  # the path is back, but the peer forgot these connections: they are reset
        assert await closed_by_peer(r)
        assert await closed_by_peer(r2)
        r3, w3 = await connect(proxy)
        await roundtrip(r3, w3)
        w3.close()


async def test_blackhole_stalls_then_resumes() -> None:
    async with proxied() as proxy:
        r, w = await connect(proxy)
        await roundtrip(r, w)
        hole = asyncio.create_task(proxy.blackhole(1.0))
        await asyncio.sleep(0)
        r2, w2 = await connect(proxy)  # made during the blackhole: served after it
        rtt, rtt2 = await asyncio.gather(roundtrip(r, w, b"stalled"), roundtrip(r2, w2, b"new"))
        await hole
        assert rtt >= 0.9 and rtt2 >= 0.9, (rtt, rtt2)
        assert await roundtrip(r, w) < 0.5  # and the same connection goes on
        w.close()
        w2.close()
        assert [e.kind for e in proxy.events] == ["blackhole", "blackhole_end"]


async def test_the_same_seed_gives_the_same_fault_sequence() -> None:
    async def schedule(seed: int) -> list[float]:
        async with proxied(seed) as proxy:
            proxy.set(reset_rate=40.0)
            await asyncio.sleep(0.4)
            proxy.reset_all()
            return [e.detail["after_s"] for e in proxy.events if e.kind == "reset"]

    a, b, c = await asyncio.gather(schedule(11), schedule(11), schedule(12))
    n = min(len(a), len(b))
    assert n >= 3
    assert a[:n] == b[:n]
    assert a[:3] != c[:3]


async def test_memory_is_bounded_when_upstream_does_not_read() -> None:
    started = asyncio.Event()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        started.set()
        await asyncio.sleep(30)  # never reads

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FaultProxy(upstream=("127.0.0.1", port), chunk_bytes=4096, buffer_chunks=4) as proxy:
        r, w = await connect(proxy)
        w.write(b"y" * 64_000_000)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(w.drain(), 1.5)  # the proxy pushes back: the client cannot get rid of it all
        assert proxy.buffered_peak <= 4 * 4096, proxy.buffered_peak
        w.transport.abort()
    server.close()


async def test_close_leaves_no_tasks_and_closes_clients() -> None:
    before = asyncio.all_tasks()
    async with echo_server() as port:
        proxy = await FaultProxy(upstream=("127.0.0.1", port), seed=3).start()
        conns = [await connect(proxy) for _ in range(3)]
        for r, w in conns:
            await roundtrip(r, w)
        proxy.set(latency_s=0.05, reset_rate=0.1)
        proxy.start_blackhole()
        await proxy.aclose()
        for r, _ in conns:
            assert await closed_by_peer(r)
        await asyncio.sleep(0.05)
        leaked = [t for t in asyncio.all_tasks() - before if "FaultProxy" in repr(t.get_coro())]
        assert not leaked, leaked
