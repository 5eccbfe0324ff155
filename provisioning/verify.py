"""Is the node online? Its birth on the broker, with the right identity, then its first readings.

The verifier subscribes as the site's platform account (created by `init-site`: a client certificate for the TLS
listener, or username + password) to `<prefix>/<site>/+/birth` and `<prefix>/<site>/<node>/data`, then lets the
caller reboot the node (`after_subscribe`), so a birth that arrives is this boot's and not the retained one of
the last. It answers plainly: online with the first readings, or what failed and what to check.

    result = verify_online(access, "xishan", "slope-07", timeout_s=60)
    print(result.line())
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import wire

if TYPE_CHECKING:
    from .workflow import Site

DEFAULT_PREFIX = "yujing/v1"


@dataclass(frozen=True)
class BrokerAccess:
    """How the verifier reaches the broker. With ca_file: TLS (and a client certificate when given)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}{' (TLS)' if self.ca_file else ''}"

    def tls_context(self) -> ssl.SSLContext | None:
        if self.ca_file is None:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if self.cert_file is not None:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        return ctx

    @classmethod
    def platform(cls, site: Site, host: str, port: int, *, tls: bool = True) -> BrokerAccess:
        """The site's platform account from its site directory: on a TLS listener its certificate (mosquitto's
        use_identity_as_username makes its CN the username) and password; without TLS username + password."""
        inv = site.load()
        name = inv.platform_username
        folder = site.store.folder(name)
        password = site.store.password(name)
        if not tls:
            return cls(host, port, name, password)
        return cls(host, port, name, password, site.store.ca_cert_path, folder / "client.crt", folder / "client.key")


@dataclass
class VerifyResult:
    node_id: str
    online: bool
    problem: str | None = None  # what failed and what to check; None when online
    birth: wire.Birth | None = None
    readings: list[dict[str, Any]] = field(default_factory=list)  # the first data message, as `yujing consume` shows it
    seconds: float = 0.0
    other_births: list[str] = field(default_factory=list)  # births of other ids seen meanwhile

    def readings_text(self, limit: int = 6) -> str:
        parts = []
        for r in self.readings[:limit]:
            name = f"{r['device']}.{r['point']}" if r.get("device") else f"point {r['point']}"
            unit = f" {r['unit']}" if r.get("unit") else ""
            bad = f" ({r['quality']})" if r.get("quality") not in (None, "good") else ""
            parts.append(f"{name}={r['value']}{unit}{bad}")
        more = f" (+{len(self.readings) - limit} more)" if len(self.readings) > limit else ""
        return ", ".join(parts) + more

    def line(self) -> str:
        if self.online:
            b = self.birth
            assert b is not None
            return (f"{self.node_id}: online after {self.seconds:.1f} s (session {b.session}, software {b.software}, "
                    f"{len(b.catalogue)} points); first readings: {self.readings_text()}")
        return f"{self.node_id}: NOT online: {self.problem}"


AfterSubscribe = Callable[[], Awaitable[None] | None]


async def verify_online(access: BrokerAccess, site: str, node_id: str, *, timeout_s: float = 120.0,
                        prefix: str = DEFAULT_PREFIX, kind: str = "node", after_subscribe: AfterSubscribe | None = None,
                        since_ms: int | None = None) -> VerifyResult:
    """Wait up to `timeout_s` for the node's birth (site, id and kind checked) and a first live data message.

    `after_subscribe` runs once the subscriptions stand (a blocking function runs in a thread): reboot the node
    there. A retained birth counts only when its time is at or after `since_ms` (a birth from before the reboot
    is the last boot's)."""
    import aiomqtt

    t0 = time.monotonic()
    result = VerifyResult(node_id, False)
    birth_topic, data_topic = f"{prefix}/{site}/+/birth", f"{prefix}/{site}/{node_id}/data"
    stale_data = False

    def done(problem: str | None) -> VerifyResult:
        result.problem = problem
        result.online = problem is None
        result.seconds = time.monotonic() - t0
        return result

    try:
        async with aiomqtt.Client(access.host, access.port, username=access.username, password=access.password,
                                  tls_context=access.tls_context(),
                                  identifier=f"yujing-verify-{node_id}-{id(result):x}",
                                  timeout=min(10.0, max(timeout_s, 1.0))) as client:
            await client.subscribe(birth_topic, qos=1)
            await client.subscribe(data_topic, qos=1)
            if after_subscribe is not None:
                if inspect.iscoroutinefunction(after_subscribe):
                    await after_subscribe()
                else:
                    outcome = await asyncio.to_thread(after_subscribe)
                    if inspect.isawaitable(outcome):
                        await outcome
            try:
                async with asyncio.timeout(max(0.0, timeout_s - (time.monotonic() - t0))):
                    async for message in client.messages:
                        topic = wire.parse_topic(message.topic.value)
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        if topic.kind == "birth":
                            try:
                                b = wire.decode_birth(payload)
                            except wire.WireError as exc:
                                if topic.gateway == node_id:
                                    return done(f"its birth could not be decoded ({exc}): is the firmware on the "
                                                f"board this tool's?")
                                continue
                            fresh = not message.retain or (since_ms is not None and b.ts_ms >= since_ms)
                            if topic.gateway != node_id:
                                if fresh and topic.gateway not in result.other_births:
                                    result.other_births.append(topic.gateway)
                                continue
                            if not fresh:
                                continue  # the retained birth of an earlier boot
                            if (b.site, b.gateway, b.kind) != (site, node_id, kind):
                                return done(f"a birth on {node_id}'s topic names site {b.site!r}, id {b.gateway!r}, "
                                            f"kind {b.kind!r} (expected {site!r}, {node_id!r}, {kind!r}): the board's "
                                            f"/config.json is not this node's (check node_id and site)")
                            result.birth = b
                        elif topic.kind == "data" and topic.gateway == node_id:
                            try:
                                data = wire.decode_data(payload)
                            except wire.WireError as exc:
                                return done(f"its data could not be decoded ({exc})")
                            if result.birth is None or data.session != result.birth.session:
                                stale_data = True  # from a session before the reboot (or before its birth)
                                continue
                            if data.historical:
                                continue  # the backlog of an earlier outage: wait for a live reading
                            result.readings = list(wire.reading_records(topic, data, result.birth.catalogue))
                            return done(None)
            except TimeoutError:
                pass
    except aiomqtt.MqttCodeError as exc:
        return done(f"the broker at {access.where} refused the account {access.username!r} ({exc}): check the "
                    f"broker files (run `yujing provision broker-files` and reload the broker) and the CA")
    except aiomqtt.MqttError as exc:
        return done(f"cannot reach the broker at {access.where} ({exc}): check the address, the port and that the "
                    f"broker runs; with TLS, that its certificate is from this site's CA (broker-files --server-name)")
    except ssl.SSLError as exc:
        return done(f"TLS with the broker at {access.where} failed ({exc.reason or exc}): is the broker's certificate "
                    f"from this site's CA?")
    wait = f"within {timeout_s:.0f} s"
    if result.birth is None:
        others = (f"; births seen meanwhile from {', '.join(result.other_births)} (is the board's /config.json "
                  f"node_id right?)") if result.other_births else ""
        stale = "; data arrived from an earlier session: the node was not restarted" if stale_data else ""
        return done(f"no birth {wait}: check the node's network (Wi-Fi ssid in /config.json, wifi_password in "
                    f"/secrets.json), the broker address in /config.json (mqtt host and port) and its credentials "
                    f"(the broker's passwd must include {node_id}: broker-files, then reload the broker)"
                    f"{others}{stale}")
    b = result.birth
    return done(f"birth arrived (session {b.session}, {len(b.catalogue)} points) but no readings {wait}: check the "
                f"sensors and sample_period_s in /config.json, and the ACL (broker-files) lets {node_id} publish data")


def verify_online_sync(access: BrokerAccess, site: str, node_id: str, **kw: Any) -> VerifyResult:
    """verify_online for code without an event loop (a worker thread of the parallel runner)."""
    return asyncio.run(verify_online(access, site, node_id, **kw))
