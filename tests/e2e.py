"""Shared pieces for end-to-end tests: run a gateway in-process, collect what reaches the broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from gateway.app import Gateway
from gateway.config import Config, parse
from gateway.consumer import Decoder


def site(broker_port: int, tmp: Path, body: str, *, uplink_extra: str = "", reconnect_s: float = 0.1) -> Config:
    """A site on the test broker. `reconnect_s` is the shortest reconnect backoff: tests that restart the
    broker and then subscribe use 1 s, so their subscriber is on the broker before the gateway is back."""
    text = f"""
[site]
id = "TEST-01"
gateway = "gw1"

[uplink]
host = "127.0.0.1"
port = {broker_port}
tls = false
batch_delay_s = 0.05
backoff_min_s = {reconnect_s}
backoff_max_s = {max(0.5, reconnect_s * 2)}
{uplink_extra}

[spool]
path = "{tmp / 'spool'}"

{body}
"""
    if "[status]" not in body:  # a port of its own per test gateway (several may run at once)
        text += '\n[status]\nlisten = "127.0.0.1:0"\n'
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "site.toml").write_text(text)  # for the CLI commands a test runs against the same site
    (tmp / "site.toml").chmod(0o600)  # it sits in the state directory here, where every file is private
    return parse(text, str(tmp / "site.toml"), base=tmp)


@dataclass
class Collector:
    """A subscriber on the real broker that keeps raw payloads and decoded records."""

    port: int
    topic: str = "yujing/v1/#"
    client_id: str | None = None  # with an id, a persistent session: the broker queues what arrives while away
    payloads: list[tuple[str, bytes]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    decoder: Decoder = field(default_factory=Decoder)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        persistent = self.client_id is not None
        async with aiomqtt.Client("127.0.0.1", self.port, identifier=self.client_id or f"collector-{id(self)}",
                                  clean_session=not persistent) as client:
            await client.subscribe(self.topic, qos=1)
            self.ready.set()
            async for m in client.messages:
                payload = bytes(m.payload)
                self.payloads.append((str(m.topic), payload))
                res = self.decoder.feed(str(m.topic), payload)
                self.records.extend(res.records)
                self.notices.extend(res.notices)

    def latest(self, device: str, point: str) -> dict[str, Any] | None:
        for rec in reversed(self.records):
            if rec["device"] == device and rec["point"] == point:
                return rec
        return None

    async def wait_for(self, predicate: Callable[["Collector"], bool], timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out; last records: {self.records[-5:]}, notices: {self.notices[-5:]}")
            await asyncio.sleep(0.05)


async def register(port: int, client_id: str, topic: str = "yujing/v1/#") -> None:
    """Open a persistent session and subscribe, then leave: the broker keeps the subscriber's messages."""
    async with aiomqtt.Client("127.0.0.1", port, identifier=client_id, clean_session=False) as client:
        await client.subscribe(topic, qos=1)


@contextlib.asynccontextmanager
async def collecting(port: int, topic: str = "yujing/v1/#", *, client_id: str | None = None) -> AsyncIterator[Collector]:
    c = Collector(port, topic, client_id)
    task = asyncio.create_task(c.run())
    await asyncio.wait_for(c.ready.wait(), 5)
    try:
        yield c
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task


@contextlib.asynccontextmanager
async def running(gateway: Gateway) -> AsyncIterator[Gateway]:
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        yield gateway
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


class FastClock:
    """Virtual time for one sleeping task (the bus scheduler): sleep() moves time forward at once.

    Real devices still answer in real time; only the waiting between polls is skipped, so 72 hours
    of one-minute polls take seconds. (A fake for the clock only: everything else is real.)
    """

    def __init__(self, start_ms: int) -> None:
        self.t = 0.0
        self.start_ms = start_ms

    def time_ms(self) -> int:
        return self.start_ms + int(self.t * 1000)

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)
        await asyncio.sleep(0)


async def until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Wait until `predicate()` holds, looking every 20 ms; AssertionError after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
