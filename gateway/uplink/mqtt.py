"""The MQTT uplink: drains the spool to the broker. It never reads devices and never decides alarms.

Each connection starts with the births (older sessions that still have data waiting first, not
retained; then the current one, retained), then re-sends every sealed message that was not
acknowledged, then seals and sends new ones. A message is deleted from the spool only on PUBACK.
The will is the session's death (reason *lost*); a clean stop publishes death (reason *clean*).

Every spool operation runs on the storage thread (gateway.storage): a slow or failing disk delays
publishing, never the event loop the alarms run on. Commands arriving on `…/cmd` go to the command
inbox one message at a time; whatever one message does, the next one is still read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
import ssl
import time
from contextvars import ContextVar
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt

from gateway import wire
from gateway.clock import Clock
from gateway.config import UplinkConfig
from gateway.histogram import PUBLISH_BOUNDS, Histogram
from gateway.spool import Message, Spool, SpoolError
from gateway.storage import Storage

log = logging.getLogger("yujing.uplink")


@dataclass(frozen=True)
class Identity:
    site: str
    gateway: str
    software: str


def read_password(cfg: UplinkConfig) -> str | None:
    if cfg.password_file is None:
        return None
    try:
        return cfg.password_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise RuntimeError(f"uplink.password_file {cfg.password_file}: cannot read: {exc.strerror}") from exc


def tls_context(cfg: UplinkConfig) -> ssl.SSLContext | None:
    if not cfg.tls:
        return None
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    if cfg.cert_file and cfg.key_file:
        ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
    return ctx


MAX_INBOUND_PACKET = 16 * 1024  # the gateway only receives commands (≤ 1 KiB); MQTT 5 tells the broker
# MQTT 5 PUBACK reasons that mean "not now" rather than "never": the message stays and is sent again later.
DEFER_REASONS = {0x91, 0x97}  # packet identifier in use, quota exceeded

_last_mid: ContextVar[int] = ContextVar("yujing_last_mid", default=0)


class ReasonClient(aiomqtt.Client):
    """aiomqtt's client, keeping what it drops: the broker's PUBACK reason code (MQTT 5). A QoS 1 publish
    the broker refuses (0x87 not authorised, 0x90 topic invalid, 0x99 payload invalid …) is not delivered.

    Relies on aiomqtt 2.x internals (`_on_publish`, the paho client's `publish`), pinned in pyproject.toml
    and held to by tests/test_uplink_reasons.py.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused: dict[int, Any] = {}
        paho_publish = self._client.publish

        def recording(*a: Any, **kw: Any) -> Any:
            info = paho_publish(*a, **kw)
            _last_mid.set(info.mid)  # per task: each publish runs in a task of its own
            return info

        self._client.publish = recording  # type: ignore[method-assign]

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None) -> None:
        # aiomqtt ignores a disconnect that comes before the CONNACK, so a link reset while the CONNECT is on
        # its way was noticed only when the connect timed out, 10 s later (hil_tests/test_network_faults.py).
        # Failing the attempt at once lets the uplink probe and reconnect within a second.
        if not self._connected.done():
            self._connected.set_exception(aiomqtt.MqttError(f"the connection closed before the broker answered ({reason_code})"))
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            self._refused[mid] = reason_code
            while len(self._refused) > 256:  # a refusal nobody asked about (a death at shutdown) is not kept forever
                self._refused.pop(next(iter(self._refused)))
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish_acked(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> tuple[int, str] | None:
        """Publish; None when the broker took it, else (reason code, its name) of a refusal."""
        await self.publish(topic, payload, qos=qos, retain=retain)
        reason = self._refused.pop(_last_mid.get(), None)
        return None if reason is None else (int(reason.value), str(reason))


def make_client(cfg: UplinkConfig, will: aiomqtt.Will | None, *, client_id: str | None = None) -> ReasonClient:
    protocol = aiomqtt.ProtocolVersion.V5 if cfg.protocol == "5" else aiomqtt.ProtocolVersion.V311
    properties = None
    if protocol == aiomqtt.ProtocolVersion.V5:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.CONNECT)
        properties.MaximumPacketSize = MAX_INBOUND_PACKET
    client = ReasonClient(
        cfg.host,
        cfg.port,
        username=cfg.username,
        password=read_password(cfg),
        identifier=client_id if client_id is not None else cfg.client_id,
        protocol=protocol,
        will=will,
        keepalive=cfg.keepalive_s,
        tls_context=tls_context(cfg),
        timeout=10,
        max_inflight_messages=64,
        max_queued_outgoing_messages=0,
        properties=properties,
    )
    client.pending_calls_threshold = 2 * Uplink.WINDOW  # our window is bounded; aiomqtt warns above 10
    return client


_ERRNO = re.compile(r"^\[Errno -?\d+\] ")

# What to look at, for the reasons a site's first start usually hits.
_HINTS = {
    "Connection refused": "the host answers but nothing listens on that port: is the broker running, is uplink.port right?",
    "Name or service not known": "the host name does not resolve: check uplink.host and the gateway's DNS",
    "Temporary failure in name resolution": "no DNS answer: is the network up?",
    "No route to host": "check the network link and uplink.host",
    "Network is unreachable": "no network: check the link (cable, modem, APN)",
    # CONNACK refusals (aiomqtt words them "[code:N] reason"): the broker answers but will not have us
    "Not authorized": "the broker refuses this gateway: check its ACL / allowed client ids, uplink.client_id, "
                      "and uplink.username, password_file or client certificate",
    "Bad user name or password": "check uplink.username and uplink.password_file against the broker's password file",
    "Client identifier not valid": "the broker does not accept uplink.client_id: check its allowed client ids",
}


def hint(why: str) -> str | None:
    """What to look at for a connect failure, when it is one a site's first start usually hits."""
    return _HINTS.get(why) or next((h for k, h in _HINTS.items() if why.endswith(k)), None)


def connect_failure(exc: BaseException) -> str:
    """Why a connection to the broker failed, in the same words whichever path found out (the MQTT client's
    connect or a bare TCP probe), so that a reason that does not change compares equal and is said once."""
    if isinstance(exc, socket.gaierror):  # (an OSError whose errno is negative: its own strerror says it)
        return exc.strerror or str(exc)
    if isinstance(exc, TimeoutError) or str(exc) == "timed out":
        return "no answer (timed out)"
    errno = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and isinstance(errno, int) and errno > 0:
        return os.strerror(errno)
    # aiomqtt passes the OSError on as text ("[Errno 111] Connection refused"); asyncio joins one per address of
    # the host ("Multiple exceptions: [Errno 111] Connect call failed ('::1', …), [Errno 111] …")
    text = str(exc)
    codes = set(re.findall(r"\[Errno (\d+)\]", text))
    if len(codes) == 1:
        return os.strerror(int(codes.pop()))
    return _ERRNO.sub("", text) or type(exc).__name__


class Backoff:
    """Exponential backoff with full jitter, so a fleet does not reconnect in lockstep after a broker restart."""

    def __init__(self, low: float, high: float, rng: random.Random) -> None:
        self.low, self.high, self.rng = low, high, rng
        self.attempt = 0

    def next(self) -> float:
        cap = min(self.high, self.low * 2**self.attempt)
        self.attempt += 1
        return self.low / 2 + self.rng.uniform(0, cap)

    def reset(self) -> None:
        self.attempt = 0


class TokenBucket:
    """Limits the backlog lane to `rate` readings per second (0: unlimited), on the injected clock."""

    def __init__(self, rate: float, clock: Clock) -> None:
        self.rate, self.clock = rate, clock
        self.tokens, self.at = rate, clock.monotonic()

    def wait_s(self, n: int) -> float:
        if self.rate <= 0:
            return 0.0
        now = self.clock.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return 0.0 if self.tokens >= min(n, self.rate) else (min(n, self.rate) - self.tokens) / self.rate

    def take(self, n: int) -> None:
        self.tokens -= n


CommandHandler = Callable[..., Awaitable[bytes | None]]  # (payload, retained=…) → reply payload, or None: no reply


class Uplink:
    WINDOW = 32  # messages in flight at once
    final_drain_s = 1.0  # at a clean stop, how long to keep sending what is already spooled
    command_timeout_s = 5.0  # one command's handling; past this it counts as failed and the next is read

    def __init__(
        self,
        cfg: UplinkConfig,
        identity: Identity,
        storage: Storage,
        session: int,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        historical_after_s: float = 60.0,
        commands: CommandHandler | None = None,
        on_command_error: Callable[[BaseException], None] | None = None,
        on_command_ok: Callable[[], None] | None = None,
        on_refused: Callable[[str, str], None] | None = None,
        on_accepted: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.storage = storage
        self.session = session
        self.clock = clock
        self.rng = rng or random.Random()
        self.historical_after_ms = int(historical_after_s * 1000)
        self.commands = commands
        self.on_command_error = on_command_error
        self.on_command_ok = on_command_ok
        self.on_refused = on_refused
        self.on_accepted = on_accepted
        self.wake = asyncio.Event()
        self.connected = False
        self.down_since_ms: int | None = clock.time_ms()  # None while connected (other uplinks may look)
        self.published = 0
        self.acked = 0
        self.last_acked_ms: int | None = None  # when the broker last took a spooled message (the status page)
        self.rejected = 0  # messages the broker refused for good: in the spool's dead-letter table
        self.deferred = 0
        self.connects = 0  # connections made (the first, then every reconnect)
        self.publish_latency = Histogram(PUBLISH_BOUNDS)  # spooled message: publish → PUBACK, real seconds
        self._refused_why: dict[str, str] = {}  # message kind → why the broker refuses it
        self._alarm_state: bytes | None = None  # latest retained snapshot to publish
        self._alarm_state_sent: bytes | None = None
        self._bucket = TokenBucket(cfg.drain_rate, clock)
        self._storage_error: str | None = None
        self._down_why: str | None = None  # why the broker cannot be reached, as last logged

    def _refusing(self, kind: str, why: str | None, *, kept: bool = True) -> None:
        """Report a broker that refuses a kind of message (an ACL, a topic limit) once, and its end once."""
        before = self._refused_why.get(kind)
        if why is not None and before is None:
            log.error("%s; %s", why, "the message is kept in the dead-letter table" if kept else "it is not spooled; it goes again when next due")
            if self.on_refused is not None:
                self.on_refused(kind, why)
        elif why is None and before is not None and self.on_accepted is not None:
            self.on_accepted(kind)
        if why is None:
            self._refused_why.pop(kind, None)
        else:
            self._refused_why[kind] = why

    def topic(self, kind: str) -> str:
        return wire.topic(self.cfg.topic_prefix, self.identity.site, self.identity.gateway, kind)

    async def _publish_state(self, client: ReasonClient, kind: str, payload: bytes, *, retain: bool = False) -> None:
        """A message that is not spooled (birth, the retained alarm state, a command reply): a refusal is
        reported like a spooled one, as a gateway fault for its kind, though there is nothing to keep."""
        refused = await client.publish_acked(self.topic(kind), payload, qos=1, retain=retain)
        why = None if refused is None else f"broker refused the {kind} message: {refused[1]} (0x{refused[0]:02x})"
        self._refusing(kind, why, kept=False)

    def alarm_state(self, payload: bytes) -> None:
        """Publish this (retained) alarm snapshot as soon as connected; only the latest counts."""
        self._alarm_state = payload
        self.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, drain, reconnect with backoff, until `stop` is set; then say goodbye (death, clean)."""
        backoff = Backoff(self.cfg.backoff_min_s, self.cfg.backoff_max_s, self.rng)
        will = aiomqtt.Will(self.topic("death"), wire.encode_death(session=self.session, reason=wire.DEATH_LOST), qos=1, retain=True)
        while not stop.is_set():
            try:
                async with make_client(self.cfg, will) as client:
                    self.connected = True
                    self.connects += 1
                    self.down_since_ms = None
                    self._down_why = None
                    backoff.reset()
                    older = self.clock.time_ms() - self.historical_after_ms
                    backlog = await self._spool(lambda s: s.mark_backlog(older_than_ms=older), 0)
                    log.info("broker %s:%d connected (session %d)%s", self.cfg.host, self.cfg.port, self.session,
                             f"; {backlog} readings of backlog to send" if backlog > self.cfg.batch_max else "")
                    await self._births(client)
                    self._alarm_state_sent = None
                    async with asyncio.TaskGroup() as tg:
                        listener = tg.create_task(self._listen(client), name="uplink-commands")
                        await self._drain(client, stop)
                        listener.cancel()
                    await self._goodbye(client)
                    return
            except* aiomqtt.MqttError as group:
                exc = group.exceptions[0]
                if self.connected:
                    log.warning("broker %s:%d lost: %s", self.cfg.host, self.cfg.port, exc)
                    fresh = True
                else:
                    fresh = self._unreachable(exc)
            finally:
                if self.connected:
                    self.down_since_ms = self.clock.time_ms()
                self.connected = False
            delay = backoff.next()
            await self._wait_to_reconnect(stop, delay, say=fresh)

    def _unreachable(self, exc: BaseException) -> bool:
        """Say why the broker cannot be reached, once per reason: the same one on every attempt of a long outage
        is said once, not every few seconds, and a new one (DNS works now, but the port is closed) is said
        again. True when it was said."""
        why = connect_failure(exc)
        if why == self._down_why:
            log.debug("broker %s:%d: cannot connect: %s", self.cfg.host, self.cfg.port, why)
            return False
        self._down_why = why
        tip = hint(why)
        log.warning("broker %s:%d: cannot connect: %s%s; trying again until it works", self.cfg.host, self.cfg.port, why,
                    f" ({tip})" if tip else "")
        return True

    async def _wait_to_reconnect(self, stop: asyncio.Event, delay: float, *, say: bool = True) -> None:
        """A broker that is down (nothing answers on its port) is probed with a bare TCP connect every half
        second or so, and the gateway reconnects as soon as it answers: back within ~1 s of the broker, not
        after a backoff that grew during the outage. A probe is one SYN, cheap for a broker host that stays
        down. A broker that answers but refused us (credentials, TLS, a full broker) gets the full backoff:
        probing could not tell when that is over."""
        # `say`: a new reason was just logged; each further attempt for the same reason goes to DEBUG only.
        level = logging.INFO if say else logging.DEBUG
        if await self._reachable():
            log.log(level, "reconnecting to %s:%d in %.1fs", self.cfg.host, self.cfg.port, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            return
        log.log(level, "broker %s:%d not answering; probing until it does", self.cfg.host, self.cfg.port)
        began = self.clock.monotonic()
        while not stop.is_set():
            step = 0.5 if self.clock.monotonic() - began < 60 else 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), step * self.rng.uniform(0.5, 1.5))  # jitter: a fleet spreads out
            if stop.is_set() or await self._reachable():
                return

    async def _reachable(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(self.cfg.host, self.cfg.port), 1.0)
        except (OSError, TimeoutError) as exc:
            self._unreachable(exc)  # the reason may change while probing (the host resolves again, the port is closed)
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def _listen(self, client: ReasonClient) -> None:
        """Commands to this gateway: each gets a reply; nothing the command says is trusted unchecked."""
        if self.commands is None:
            return
        if self.cfg.protocol == "5":
            from paho.mqtt.subscribeoptions import SubscribeOptions

            # Retained commands are refused anyway; MQTT 5 lets the broker not even send them.
            options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            await client.subscribe(self.topic("cmd"), options=options)
        else:
            await client.subscribe(self.topic("cmd"), qos=1)
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, (bytes, bytearray)) else b""
            try:
                reply = await asyncio.wait_for(self.commands(bytes(payload), retained=bool(message.retain)), self.command_timeout_s)
            except Exception as exc:  # one bad message (or a handler that hangs) must not end the listener, nor the uplink
                log.exception("command handling failed")
                if self.on_command_error is not None:
                    self.on_command_error(exc)
                continue
            if self.on_command_ok is not None:
                self.on_command_ok()
            if reply is not None:
                await self._publish_state(client, "reply", reply)

    async def _spool(self, fn: Callable[[Spool], Any], fallback: Any) -> Any:
        """`fn(spool)` on the storage thread; on a storage failure, `fallback` (logged once per failure)."""
        try:
            result = await self.storage.call(fn)
        except SpoolError as exc:
            if str(exc) != self._storage_error:
                log.warning("uplink: %s; publishing what it can", exc)
            self._storage_error = str(exc)
            return fallback
        self._storage_error = None
        return result

    async def _births(self, client: ReasonClient) -> None:
        for session in await self._spool(lambda s: s.pending_sessions(), []):
            if session != self.session:
                await self._publish_state(client, "birth", await self._birth(session))
        await self._publish_state(client, "birth", await self._birth(self.session), retain=True)

    async def _birth(self, session: int) -> bytes:
        def read(spool: Spool) -> tuple[Any, int]:
            return spool.catalogue(session), spool.dropped

        found, dropped = await self._spool(read, (None, 0))
        if found is None and session == self.session:
            found = (self.storage.catalogue, self.storage.started_ms)  # the running session is known without a disk
        catalogue, started = found if found else ((), self.clock.time_ms())
        return wire.encode_birth(
            session=session, ts_ms=started, site=self.identity.site, gateway=self.identity.gateway,
            software=self.identity.software, catalogue=catalogue, dropped=dropped,
        )

    def _next(self, spool: Spool, sent: set[int]) -> tuple[list[Message], float]:
        """What to publish next, in priority order: re-sends and alarms, live data, then backlog. Runs on
        the storage thread.

        Returns (messages, seconds to wait before the backlog may go on) — the wait is 0 unless the
        drain rate holds the backlog back.
        """
        now = self.clock.time_ms()
        if spool.events_waiting:
            spool.seal_alarms(self.cfg.batch_max, now_ms=now, historical_after_ms=self.historical_after_ms)
        batch = spool.unsent(limit=self.WINDOW, exclude=sent)  # alarms first, then unacknowledged data
        if batch:
            return batch, 0.0
        m = spool.seal(self.cfg.batch_max, now_ms=now, historical_after_ms=self.historical_after_ms, live=True)
        if m is not None:
            return [m], 0.0
        wait = self._bucket.wait_s(self.cfg.batch_max)
        if wait > 0:
            return [], wait
        m = spool.seal(self.cfg.batch_max, now_ms=now, historical_after_ms=self.historical_after_ms)
        if m is None:
            return [], 0.0
        if self.cfg.drain_rate:
            self._bucket.take(m.count)
        return [m], 0.0

    async def _drain(self, client: ReasonClient, stop: asyncio.Event) -> None:
        sent: set[int] = set()  # published on this connection, PUBACK pending
        inflight: set[asyncio.Task[Any]] = set()
        failure: list[BaseException] = []

        async def send(m: Message) -> None:
            began = time.monotonic()
            try:
                refused = await client.publish_acked(self.topic(m.kind), m.payload, qos=1)
            except aiomqtt.MqttError as exc:
                failure.append(exc)
                self.wake.set()
                return
            if refused is None:
                self.acked += 1
                self.publish_latency.observe(time.monotonic() - began)
                self.last_acked_ms = self.clock.time_ms()
                self.storage.delivered(m.id)
                self._refusing(m.kind, None)
                sent.discard(m.id)
                return
            code, reason = refused
            if code in DEFER_REASONS:  # not now: it stays, and goes again after a pause
                self.deferred += 1
                await self.clock.sleep(5.0)
                sent.discard(m.id)
                self.wake.set()
                return
            self.rejected += 1
            why = f"broker refused {m.kind} seq {m.seq} of session {m.session}: {reason} (0x{code:02x})"
            self.storage.rejected(m.id, why)
            self._refusing(m.kind, why)
            sent.discard(m.id)

        try:
            while True:
                if failure:
                    raise failure[0]
                if stop.is_set():
                    # A clean stop sends what is already spooled, briefly; what is not acknowledged then
                    # stays in the spool for the next start.
                    deadline = self.clock.monotonic() + self.final_drain_s
                    while self.clock.monotonic() < deadline and not failure:
                        exclude = set(sent)
                        batch, _ = await self._spool(lambda s: self._next(s, exclude), ([], 0.0))
                        if not batch:
                            break
                        for m in batch:
                            if len(inflight) >= self.WINDOW:
                                await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED, timeout=1.0)
                            sent.add(m.id)
                            task = asyncio.create_task(send(m), name=f"publish-{m.kind}-{m.seq}")
                            inflight.add(task)
                            task.add_done_callback(inflight.discard)
                            self.published += 1
                    if inflight:
                        await asyncio.wait(inflight, timeout=2.0)
                    return
                self.wake.clear()  # before looking, so a reading spooled after the look wakes us
                if self._alarm_state is not None and self._alarm_state != self._alarm_state_sent:
                    self._alarm_state_sent = self._alarm_state
                    await self._publish_state(client, "alarms", self._alarm_state, retain=True)
                # Copied here, not on the storage thread: a PUBACK queues its delete before it leaves `sent`,
                # so a message is always either excluded or already marked delivered when _next runs.
                exclude = set(sent)
                batch, hold = await self._spool(lambda s: self._next(s, exclude), ([], 5.0))
                for m in batch:
                    while len(inflight) >= self.WINDOW:
                        await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                        if failure:
                            raise failure[0]
                    sent.add(m.id)
                    task = asyncio.create_task(send(m), name=f"publish-{m.kind}-{m.seq}")
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                    self.published += 1
                if batch:
                    continue
                waiter = asyncio.create_task(self.wake.wait())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED,
                                   timeout=hold if hold > 0 else None)
                waiter.cancel()
                stopper.cancel()
                if hold <= 0 and not stop.is_set() and self.cfg.batch_delay_s and not self.storage.events_waiting:
                    await self.clock.sleep(self.cfg.batch_delay_s)  # let a poll round land in one message
        finally:
            for t in inflight:
                t.cancel()

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        payload = wire.encode_death(session=self.session, reason=wire.DEATH_CLEAN, ts_ms=self.clock.time_ms())
        try:
            await client.publish(self.topic("death"), payload, qos=1, retain=True, timeout=2.0)
            log.info("death published (clean stop, session %d)", self.session)
        except aiomqtt.MqttError as exc:
            log.warning("could not publish death on stop: %s", exc)
