"""Prometheus metrics for one gateway: `Metrics(gateway).render()` → (text exposition, content type).

Everything is read when scraped, from numbers the stages keep anyway (plain ints and gateway.histogram):
nothing is pushed from the poll path, so polling costs the same whether anyone scrapes or not, and no stage
imports prometheus_client. Each Metrics owns its CollectorRegistry (the library's global default registry is
not used), so two gateways in one process never mix.

The spool's numbers are computed on the storage thread (Storage.query): a scrape never makes the event loop
wait on the spool's lock or a disk. Rendered on the event loop, they are those fetched for the previous
scrape (or at construction); from another thread, render() waits up to a second for fresh ones, and
`await render_async()` does the same without blocking the loop.

A family that fails to build (a stage in a state nobody expected, a bug) is left out of that scrape and
logged once; the other families are served, and polling and alarms never notice. Labels are bounded: bus,
device, rule and action names come from the site file, qualities and command reasons from fixed sets.
docs/metrics.md lists every metric.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__
from .commands import REJECT_REASONS
from .model import Quality

log = logging.getLogger("yujing.metrics")

QUALITIES = ("good", "timeout", "framing", "decode", "out_of_range", "offline", "transport", "device_fault",
             "modbus_exception", "other")
DEVICE_STATES = ("online", "degraded", "offline")
SPOOL_MAX_AGE_S = 1.0  # a spool summary younger than this is not asked for again


@dataclass(frozen=True)
class Family:
    name: str  # as scraped (a counter's samples end in _total)
    kind: str  # counter, gauge, histogram
    labels: tuple[str, ...]
    help: str


FAMILIES = (
    Family("yujing_gateway_info", "gauge", ("site", "gateway", "version"), "Always 1; the labels name this gateway and its software."),
    Family("yujing_polls_total", "counter", ("bus", "device"), "Polls of a device (an offline device's skipped rounds are not polls)."),
    Family("yujing_polls_unanswered_total", "counter", ("bus", "device"),
           "Polls (or pushed batches) in which nothing of the device answered."),
    Family("yujing_readings_total", "counter", ("bus", "device", "quality"), "Readings made, by quality."),
    Family("yujing_device_state", "gauge", ("bus", "device", "state"), "1 for the state a device is in now (online, degraded, offline), else 0."),
    Family("yujing_transaction_seconds", "histogram", ("bus",), "One request/response on a bus (retries are transactions of their own)."),
    Family("yujing_rule_level", "gauge", ("rule",), "The level an alarm rule shows now: 0 none, 1 IV blue, 2 III yellow, 3 II orange, 4 I red."),
    Family("yujing_gateway_faults", "gauge", (), "Gateway fault sources in fault now (the gateway.fault pseudo-rule is up while > 0)."),
    Family("yujing_action_executions_total", "counter", ("action",), "Output writes (changes, retries, reasserts) or program runs started."),
    Family("yujing_action_failures_total", "counter", ("action",), "Output writes or program runs that failed."),
    Family("yujing_spool_messages", "gauge", (), "Sealed messages (alarm, live and historical data) not yet acknowledged by the broker."),
    Family("yujing_spool_readings", "gauge", (),
           "Readings waiting to be sent: unsealed polls, unacknowledged data messages, and polls held in memory not yet written."),
    Family("yujing_spool_bytes", "gauge", (), "Size of the spool's segment files."),
    Family("yujing_spool_oldest_unsent_seconds", "gauge", (), "Age of the oldest reading not yet acknowledged by the broker (0: none waits)."),
    Family("yujing_uplink_connected", "gauge", (), "1 while connected to the broker, else 0."),
    Family("yujing_uplink_reconnects_total", "counter", (), "Connections to the broker after the first."),
    Family("yujing_uplink_published_total", "counter", (), "Spooled messages published (re-sends included)."),
    Family("yujing_uplink_acked_total", "counter", (), "Spooled messages the broker acknowledged."),
    Family("yujing_uplink_rejected_total", "counter", (), "Spooled messages the broker refused for good (kept as dead letters)."),
    Family("yujing_uplink_publish_seconds", "histogram", (), "Publish of a spooled message until its PUBACK."),
    Family("yujing_commands_accepted_total", "counter", (), "Signed commands verified and carried out."),
    Family("yujing_commands_rejected_total", "counter", ("reason",), "Commands rejected, by reason (" + ", ".join(REJECT_REASONS) + ", other)."),
)
PROCESS_FAMILIES = ("process_cpu_seconds_total", "process_resident_memory_bytes")  # and the rest of ProcessCollector's


def quality_label(code: int) -> str:
    """A reading quality as a label from the fixed set QUALITIES (Modbus exceptions are one value)."""
    if code & Quality.MODBUS_EXCEPTION:
        return "modbus_exception"
    try:
        return Quality(code).name.lower()
    except ValueError:
        return "other"


def _histogram(family: HistogramMetricFamily, labels: list[str], hist: Any) -> None:
    buckets, total = hist.cumulative()
    family.add_metric(labels, [(floatToGoString(bound), n) for bound, n in buckets], total)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _SpoolWatch:
    """The spool's summary (Spool.summary), asked of the storage thread and kept until the next answer."""

    def __init__(self, storage_of: Callable[[], Any]) -> None:
        self.storage_of = storage_of
        self.summary: dict[str, Any] | None = None
        self.asked_at = -float("inf")  # when the summary held (or the one pending) was asked for
        self.future: concurrent.futures.Future[Any] | None = None
        self._logged = False

    def _harvest(self) -> None:
        fut = self.future
        if fut is None or not fut.done():
            return
        self.future = None
        try:
            self.summary = fut.result()
            self._logged = False
        except Exception as exc:  # the spool is not open, or failing: storage reports that as a gateway fault
            self.summary = None
            if not self._logged:
                log.warning("metrics: no spool figures: %s", exc)
                self._logged = True

    def ask(self, max_age_s: float = SPOOL_MAX_AGE_S) -> concurrent.futures.Future[Any] | None:
        """The pending request, asking anew when none is pending and the summary is older than `max_age_s`."""
        self._harvest()
        if self.future is None and time.monotonic() - self.asked_at >= max_age_s:
            storage = self.storage_of()
            if storage is None:
                return None
            try:
                self.future = storage.query(lambda spool: spool.summary())
            except RuntimeError:  # storage closed (the gateway stopped)
                return None
            self.asked_at = time.monotonic()
        return self.future

    def get(self, wait_s: float) -> dict[str, Any] | None:
        fut = self.ask()
        if fut is not None and wait_s > 0:
            concurrent.futures.wait([fut], timeout=wait_s)
        self._harvest()
        return self.summary


class _GatewayCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.builders: dict[str, Callable[[Family], Metric]] = {f.name: getattr(self, "_" + f.name.removeprefix("yujing_"))
                                                               for f in FAMILIES}
        self.failed: set[str] = set()  # families whose failure is logged already
        self.summary: dict[str, Any] | None = None  # the spool's, for this scrape

    def describe(self) -> list[Metric]:
        return []  # no check against other collectors' names at registration (it would scrape the gateway)

    def collect(self) -> Iterator[Metric]:
        try:
            self.summary = self.metrics._spool.get(0.0 if _on_event_loop() else self.metrics.spool_wait_s)
        except Exception:  # the spool families go without figures; the rest are served
            self.summary = None
            log.exception("metrics: could not ask storage for the spool's figures")
        for family in FAMILIES:
            try:
                metric = self.builders[family.name](family)
            except Exception:
                if family.name not in self.failed:
                    self.failed.add(family.name)
                    log.exception("metrics: %s left out of the scrape (logged once)", family.name)
                continue
            yield metric

    # ------------------------------------------------------------------ helpers

    @property
    def g(self) -> Any:
        return self.metrics.gateway

    @staticmethod
    def _counter(f: Family) -> CounterMetricFamily:
        return CounterMetricFamily(f.name, f.help, labels=f.labels)

    @staticmethod
    def _gauge(f: Family) -> GaugeMetricFamily:
        return GaugeMetricFamily(f.name, f.help, labels=f.labels)

    def _pollers(self) -> Iterator[tuple[str, Any]]:
        for s in self.g.schedulers:
            for p in s.pollers:
                yield s.bus.name, p

    # ------------------------------------------------------------------ the gateway

    def _gateway_info(self, f: Family) -> Metric:
        m = self._gauge(f)
        site = self.g.config.site
        m.add_metric([site.id, site.gateway, __version__], 1)
        return m

    def _gateway_faults(self, f: Family) -> Metric:
        m = self._gauge(f)
        health = self.g.health
        m.add_metric([], len(health.faults) if health is not None else 0)
        return m

    # ------------------------------------------------------------------ polling

    def _polls_total(self, f: Family) -> Metric:
        m = self._counter(f)
        for bus, p in self._pollers():
            m.add_metric([bus, p.config.name], p.polls)
        return m

    def _polls_unanswered_total(self, f: Family) -> Metric:
        m = self._counter(f)
        for bus, p in self._pollers():
            m.add_metric([bus, p.config.name], p.unanswered)
        return m

    def _readings_total(self, f: Family) -> Metric:
        m = self._counter(f)
        for bus, p in self._pollers():
            total, bad = p.readings, dict(p.bad)
            by_quality = {"good": total - sum(bad.values())}
            for code, n in bad.items():
                label = quality_label(code)
                by_quality[label] = by_quality.get(label, 0) + n
            for label in QUALITIES:
                if label in by_quality:
                    m.add_metric([bus, p.config.name, label], by_quality[label])
        return m

    def _device_state(self, f: Family) -> Metric:
        m = self._gauge(f)
        for bus, p in self._pollers():
            now = p.state.value
            for state in DEVICE_STATES:
                m.add_metric([bus, p.config.name, state], 1 if state == now else 0)
        return m

    def _transaction_seconds(self, f: Family) -> Metric:
        m = HistogramMetricFamily(f.name, f.help, labels=f.labels)
        for s in self.g.schedulers:
            _histogram(m, [s.bus.name], s.latency)
        return m

    # ------------------------------------------------------------------ alarms and outputs

    def _rule_level(self, f: Family) -> Metric:
        m = self._gauge(f)
        desk = self.g.desk
        if desk is not None:
            for rule, level in desk.levels().items():
                m.add_metric([rule], int(level))
        return m

    def _actions(self, f: Family, key: str) -> Metric:
        m = self._counter(f)
        outputs = self.g.outputs
        if outputs is not None:
            for name, status in outputs.status().items():
                m.add_metric([name], status[key])
        return m

    def _action_executions_total(self, f: Family) -> Metric:
        return self._actions(f, "attempts")

    def _action_failures_total(self, f: Family) -> Metric:
        return self._actions(f, "failed")

    # ------------------------------------------------------------------ the spool

    def _spool_figure(self, f: Family, key: str) -> Metric:
        m = self._gauge(f)
        if self.summary is not None:
            m.add_metric([], self.summary[key])
        return m

    def _spool_messages(self, f: Family) -> Metric:
        return self._spool_figure(f, "messages")

    def _spool_bytes(self, f: Family) -> Metric:
        return self._spool_figure(f, "bytes")

    def _spool_readings(self, f: Family) -> Metric:
        m = self._gauge(f)
        storage = self.g.storage
        if self.summary is not None and storage is not None:
            m.add_metric([], self.summary["readings"] + storage.pending_readings)
        return m

    def _spool_oldest_unsent_seconds(self, f: Family) -> Metric:
        m = self._gauge(f)
        storage = self.g.storage
        if storage is None:
            return m
        oldest = [t for t in (self.summary["oldest_ms"] if self.summary else None, storage.oldest_pending_ms) if t is not None]
        now = self.g.clock.time_ms()
        m.add_metric([], max(0, now - min(oldest)) / 1000 if oldest else 0.0)
        return m

    # ------------------------------------------------------------------ the uplink

    def _uplink_connected(self, f: Family) -> Metric:
        m = self._gauge(f)
        uplink = self.g.uplink
        m.add_metric([], 1 if uplink is not None and uplink.connected else 0)
        return m

    def _uplink_count(self, f: Family, value: Callable[[Any], int]) -> Metric:
        m = self._counter(f)
        uplink = self.g.uplink
        if uplink is not None:
            m.add_metric([], value(uplink))
        return m

    def _uplink_reconnects_total(self, f: Family) -> Metric:
        return self._uplink_count(f, lambda u: max(u.connects - 1, 0))

    def _uplink_published_total(self, f: Family) -> Metric:
        return self._uplink_count(f, lambda u: u.published)

    def _uplink_acked_total(self, f: Family) -> Metric:
        return self._uplink_count(f, lambda u: u.acked)

    def _uplink_rejected_total(self, f: Family) -> Metric:
        return self._uplink_count(f, lambda u: u.rejected)

    def _uplink_publish_seconds(self, f: Family) -> Metric:
        m = HistogramMetricFamily(f.name, f.help, labels=f.labels)
        uplink = self.g.uplink
        if uplink is not None:
            _histogram(m, [], uplink.publish_latency)
        return m

    # ------------------------------------------------------------------ commands

    def _commands_accepted_total(self, f: Family) -> Metric:
        m = self._counter(f)
        inbox = self.g.inbox
        if inbox is not None:
            m.add_metric([], inbox.stats.accepted)
        return m

    def _commands_rejected_total(self, f: Family) -> Metric:
        m = self._counter(f)
        inbox = self.g.inbox
        if inbox is not None:
            rejected = dict(inbox.stats.rejected)
            for reason in REJECT_REASONS:
                m.add_metric([reason], rejected.pop(reason, 0))
            m.add_metric(["other"], sum(rejected.values()))
        return m


class Metrics:
    """The metrics of one gateway. Build it once, at any time (stages that do not exist yet are read when
    they do); call render() per scrape from any thread, or `await render_async()` on the event loop."""

    spool_wait_s = 1.0  # off the event loop: how long render() waits for the storage thread

    def __init__(self, gateway: Any, *, process: bool = True) -> None:
        self.gateway = gateway
        self.registry = CollectorRegistry(auto_describe=False)
        self._spool = _SpoolWatch(lambda: getattr(self.gateway, "storage", None))
        self._spool.ask()  # so the first scrape on the event loop has the spool's figures already
        self.registry.register(_GatewayCollector(self))
        if process:
            ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes …

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def render_async(self, timeout_s: float = 1.0) -> tuple[bytes, str]:
        """render(), with the spool's figures fetched first (waiting at most `timeout_s`, never blocking the loop)."""
        fut = self._spool.ask(max_age_s=0.0)
        if fut is not None:
            await asyncio.wait([asyncio.wrap_future(fut)], timeout=timeout_s)
        return self.render()
