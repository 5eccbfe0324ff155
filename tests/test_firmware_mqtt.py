"""The firmware's MQTT path against a real mosquitto, under CPython with real TCP sockets.

The firmware modules (yujing_node.mqtt, .node, .wire, ...) run unchanged; only the board's
hardware (pins, ADC, I2C/UART devices, RTC memory, deep sleep) is simulated by
firmware/host/sim/simboard.py, because a host has none. Time is the simulated board's virtual
clock in the node tests (sample periods pass at once), real time in the client tests. An
independent client (paho-mqtt) observes what arrives and the gateway's consumer decodes it.
"""

from __future__ import annotations

import queue
import socket
import uuid
from decimal import Decimal

import paho.mqtt.client as paho
import pytest

from gateway import wire
from gateway.model import PointInfo, Reading
from tests.firmware_helpers import HostClock, import_firmware

import_firmware()

import fixtures  # noqa: E402
from simboard import SimDeepSleep  # noqa: E402
from yujing_node.mqtt import Client, MQTTError  # noqa: E402

T = 1_767_225_600_000
LIVE = [Decimal("50.88"), Decimal(0), 25, 56.5, Decimal("12.3"), 25.0]  # the fixture devices' readings
CATALOGUE = [
    PointInfo("crack", "opening", "mm", "uint16"),
    PointInfo("rain", "rain", "mm", "uint32"),
    PointInfo("env", "temperature", "Cel", "uint16"),
    PointInfo("env", "humidity", "%RH", "uint16"),
    PointInfo("gas", "ch4", "%LEL", "uint16"),
    PointInfo("gas", "temp", "Cel", "float32"),
]


class Observer:
    """A paho-mqtt subscriber collecting (topic, payload, qos, retain)."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.q: queue.Queue = queue.Queue()
        subscribed = queue.Queue()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"obs-{uuid.uuid4().hex[:8]}")
        self.c.on_message = lambda c, u, m: self.q.put((m.topic, bytes(m.payload), m.qos, bool(m.retain)))
        self.c.on_subscribe = lambda *a: subscribed.put(True)
        self.c.connect(host, port)
        self.c.subscribe(topic, qos=1)
        self.c.loop_start()
        subscribed.get(timeout=5)

    def take(self, n: int, timeout: float = 5.0) -> list:
        return [self.q.get(timeout=timeout) for _ in range(n)]

    def drain(self, timeout: float = 0.3) -> list:
        out = []
        while True:
            try:
                out.append(self.q.get(timeout=timeout))
            except queue.Empty:
                return out

    def close(self) -> None:
        self.c.disconnect()  # before loop_stop, so the network thread wakes up at once
        self.c.loop_stop()


def sock(broker) -> "object":
    from simboard import _SockStream

    return _SockStream(socket.create_connection((broker.host, broker.port), 5))


def node_setup(tmp_path, broker, mqtt=None, **over):
    node_id = f"n{uuid.uuid4().hex[:6]}"
    board = fixtures.board(root=str(tmp_path))
    cfg = fixtures.config(
        # alarm_events off: these tests follow the data path message by message (alarm events: test_firmware_unix.py)
        node_id=node_id, mqtt={"host": broker.host, "port": broker.port, "keepalive_s": 30, "alarm_events": False,
                               **(mqtt or {})}, **over
    )
    fixtures.provision(board, cfg, {"mqtt_username": node_id, "mqtt_password": "secret"})
    return board, node_id, f"yujing/v1/xishan/{node_id}"


def decode(msgs):
    out = []
    for topic, payload, qos, retain in msgs:
        kind = wire.parse_topic(topic).kind
        fn = {"birth": wire.decode_birth, "data": wire.decode_data, "death": wire.decode_death}[kind]
        out.append((kind, fn(payload), payload, qos, retain))
    return out


# ---------------------------------------------------------------- the client alone


def test_client_qos1_publish_subscribe_and_keepalive(mosquitto) -> None:
    topic = f"t/{uuid.uuid4().hex[:6]}".encode()
    sub = Client(b"fw-sub-" + topic[2:], HostClock(), keepalive_s=1, timeout_ms=3000)
    got = []
    sub.on_message = lambda t, p: got.append((t, bytes(p)))
    sub.connect(sock(mosquitto))
    sub.subscribe(topic, 1)
    pub = Client(b"fw-pub-" + topic[2:], HostClock(), user=b"u", password=b"p", timeout_ms=3000)
    pub.connect(sock(mosquitto))
    payload = bytes(range(256)) * 3  # 768 bytes: two-byte remaining length
    pid = pub.publish(topic, payload, qos=1)  # returns only after PUBACK
    assert pid == 1
    pub.publish(topic, b"q0", qos=0)
    HostClock().sleep_ms(300)
    sub.rx = bytearray(1024)
    sub.rxv = memoryview(sub.rx)
    sub.poll()
    assert got == [(topic, payload), (topic, b"q0")]
    HostClock().sleep_ms(600)
    sub.ping_if_due()  # half the 1 s keep-alive has passed: PINGREQ
    assert sub._ping_at is not None
    HostClock().sleep_ms(200)
    sub.poll()
    assert sub._ping_at is None, "PINGRESP received"
    pub.disconnect()
    sub.disconnect()


def test_client_reports_a_dead_broker_connection(mosquitto) -> None:
    c = Client(b"fw-dead", HostClock(), timeout_ms=500)
    s = sock(mosquitto)
    c.connect(s)
    s.kill()
    with pytest.raises(MQTTError):
        c.publish(b"t/x", b"1", qos=1)


def test_client_refuses_a_wrong_packet_instead_of_connack() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    client = socket.create_connection(srv.getsockname(), 2)
    conn, _ = srv.accept()
    conn.sendall(b"\x30\x03\x00\x01x")  # a PUBLISH where the CONNACK must be
    from simboard import _SockStream

    c = Client(b"fw-x", HostClock(), timeout_ms=500)
    with pytest.raises(MQTTError, match="expected CONNACK"):
        c.connect(_SockStream(client))
    conn.close()
    srv.close()


# ---------------------------------------------------------------- the node


def test_node_bytes_over_mosquitto_equal_the_gateway_encoder(mosquitto, tmp_path) -> None:
    board, node_id, base = node_setup(tmp_path, mosquitto)
    obs = Observer(mosquitto.host, mosquitto.port, base + "/#")
    try:
        node = fixtures.make_node(board)
        node.run(max_cycles=3)
        msgs = decode(obs.take(4))
    finally:
        obs.close()
    kind, birth, payload, qos, retain = msgs[0]
    assert (kind, qos) == ("birth", 1)
    assert payload == wire.encode_birth(
        session=1,
        ts_ms=T,
        site="xishan",
        gateway=node_id,
        software="0.1.0",
        catalogue=CATALOGUE,
        dropped=0,
        kind="node",
    )
    for i, (kind, data, payload, qos, retain) in enumerate(msgs[1:]):
        assert (kind, qos, retain, data.seq, data.historical) == ("data", 1, False, i + 1, False)
        readings = [Reading(p, T + 10_000 * i, v) for p, v in enumerate(LIVE)]
        assert payload == wire.encode_data(1, i + 1, readings)
    node.client.disconnect()


def test_will_death_lost_arrives_when_the_socket_dies(mosquitto, tmp_path) -> None:
    board, node_id, base = node_setup(tmp_path, mosquitto)
    obs = Observer(mosquitto.host, mosquitto.port, base + "/death")
    try:
        node = fixtures.make_node(board)
        node.run(max_cycles=1)
        board.socks[-1].kill()  # no DISCONNECT: power loss, crash, radio gone
        (msg,) = decode(obs.take(1))
    finally:
        obs.close()
    kind, death, payload, qos, retain = msg
    assert (death.reason, death.session, death.ts_ms) == ("lost", 1, None)
    assert qos == 1 and payload == wire.encode_death(session=1, reason=wire.DEATH_LOST)
    late = Observer(mosquitto.host, mosquitto.port, base + "/+")
    try:
        retained = {m[0].rsplit("/", 1)[1]: m for m in late.take(2)}
    finally:
        late.close()
    assert retained["death"][3] is True and retained["birth"][3] is True, "a late consumer gets both, retained"


def test_offline_readings_are_buffered_then_flushed_historical(private_mosquitto, tmp_path) -> None:
    broker = private_mosquitto
    board, node_id, base = node_setup(tmp_path, broker)
    node = fixtures.make_node(board)
    broker.stop()
    node.run(max_cycles=5)  # broker unreachable: every cycle goes to the ring
    assert node.ring.pending() == 5 * 6
    assert any("connect to" in line and "failed" in line for line in board.logs)
    broker.start()
    obs = Observer(broker.host, broker.port, base + "/#")
    try:
        node.run(max_cycles=15)  # a restart on the same board: new session, the ring survives
        msgs = decode(obs.drain(0.5))
    finally:
        obs.close()
    assert msgs[0][0] == "birth"
    data = [m for m in msgs if m[0] == "data"]
    hist = [m for m in data if m[1].historical]
    assert hist, "the backlog came back"
    for _, d, payload, _, _ in hist:
        assert payload[-2:] == b"\x05\xf5", "key 5 (historical) = true, last in the map"
        assert payload == wire.encode_data(d.session, d.seq, list(d.readings), historical=True)
    backlog = [(r.ts_ms, r.point) for m in hist for r in m[1].readings]
    assert backlog[:30] == [(T + 10_000 * i, p) for i in range(5) for p in range(6)]
    assert [r.value for r in hist[0][1].readings[:6]] == LIVE
    assert [m[1].seq for m in data] == list(range(1, len(data) + 1))
    assert node.ring.pending() == 0
    node.client.disconnect()


def test_sleeping_node_announces_back_at_and_leaves_no_will(mosquitto, tmp_path) -> None:
    board, node_id, base = node_setup(tmp_path, mosquitto, mode="sleep", sample_period_s=300)
    obs = Observer(mosquitto.host, mosquitto.port, base + "/#")
    try:
        node = fixtures.make_node(board)
        with pytest.raises(SimDeepSleep) as slept:
            node.run()
        msgs = decode(obs.drain(0.5))
    finally:
        obs.close()
    assert [m[0] for m in msgs] == ["birth", "data", "death"], "clean DISCONNECT: no will after the sleep notice"
    assert msgs[0][1].back_at_ms == T + 300_000
    death = msgs[2]
    assert (death[1].reason, death[1].back_at_ms, death[3]) == ("sleeping", T + 300_000, 1)
    assert death[2] == wire.encode_death(
        session=1, reason=wire.DEATH_SLEEPING, ts_ms=death[1].ts_ms, back_at_ms=T + 300_000
    )
    assert slept.value.ms == T + 300_000 - board.clock.now
    late = Observer(mosquitto.host, mosquitto.port, base + "/death")
    try:
        ((_, payload, _, retain),) = late.take(1)
    finally:
        late.close()
    assert retain and payload == death[2], "a consumer connecting while the node sleeps learns when it is back"


def test_node_subscribes_to_its_command_topic(mosquitto, tmp_path) -> None:
    """The node subscribes (QoS 1), receives, and refuses what is no signed command for it (this node has no
    command key; signed commands are tested in tests/test_firmware_unix.py)."""
    board, node_id, base = node_setup(tmp_path, mosquitto, mqtt={"commands": True})
    node = fixtures.make_node(board)
    node.run(max_cycles=1)
    sender = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"cmd-{node_id}")
    sender.connect(mosquitto.host, mosquitto.port)
    sender.loop_start()
    sender.publish(base + "/cmd", b"\xa1\x00\x01", qos=1).wait_for_publish(5)
    sender.disconnect()
    sender.loop_stop()
    for _ in range(50):
        node.idle()
        if any("yujing: command " in line for line in board.logs):
            break
        HostClock().sleep_ms(20)
    assert any("rejected (unauthorised): this node has no command key" in line for line in board.logs), board.logs
    node.client.disconnect()


def test_alarm_events_from_before_and_after_the_clock_was_set_go_in_separate_messages(mosquitto, tmp_path) -> None:
    """Wire key 6 is exact per event: events stamped on the unset clock (2000 on an ESP32) and after NTP set it
    never share an alarm message; each message is what gateway.wire writes for its events."""
    board, node_id, base = node_setup(tmp_path, mosquitto, mqtt={"alarm_events": True})
    obs = Observer(mosquitto.host, mosquitto.port, base + "/alarm")
    try:
        node = fixtures.make_node(board)
        node.run(max_cycles=1)
        obs.drain(0.3)  # what the first cycle raised
        y2000 = 946_684_800_000 + 5_000
        node.pending_events[:] = [(0, "r.a", 0, 1, y2000, b"\xa0", "before", ""),
                                  (3, "r.a", 1, 0, y2000 + 1000, b"\xa0", "before", ""),
                                  (0, "r.a", 0, 1, T + 3000, b"\xa0", "after", "")]
        node.net_until = node.clock.ticks_add(node.clock.ticks_ms(), 5000)
        assert node.send_alarms(T + 4000)
        msgs = [m for m in obs.drain(0.5) if m[0].endswith("/alarm")]
    finally:
        obs.close()
    alarms = [wire.decode_alarm(m[1]) for m in msgs]
    assert [(a.clock_unset, [e.message for e in a.events]) for a in alarms] == [(True, ["before", "before"]),
                                                                               (False, ["after"])]
    assert alarms[1].seq == alarms[0].seq + 1
    for a, (_, payload, _, _) in zip(alarms, msgs):
        assert payload == wire.encode_alarm(a.session, a.seq, a.events, historical=a.historical,
                                            clock_unset=a.clock_unset)
    assert not node.pending_events
    node.client.disconnect()


def test_a_threshold_set_without_a_clear_comes_back_after_a_reboot_with_the_clear_it_ran_with(tmp_path) -> None:
    """A threshold command without a clear keeps the rung's hysteresis gap; what is kept on flash for a reboot
    (written before the command runs) is the clear worked out then, not "none" (the reboot then worked it out
    again from the configured gap: 35/34 instead of 35/25)."""
    from gateway.node_commands import mac_node_command

    board = fixtures.board(root=str(tmp_path))
    rule = {"id": "crack.opening", "point": "crack/opening", "limits": {"min": "10", "max": "70"},
            "levels": [{"level": "IV_BLUE", "set": "40", "clear": "39"}, {"level": "III_YELLOW", "set": "60", "clear": "59"}]}
    key = bytes(range(32))
    cfg = fixtures.config(rules=[rule], mqtt={"commands": True})
    fixtures.provision(board, cfg, {"command_key": key.hex()})
    node = fixtures.make_node(board)
    blue = 1  # IV_BLUE
    for n, (value, clear) in enumerate((("30", "20"), ("35", None)), 1):
        node.inbox.append(mac_node_command(key, None, cfg["site"], cfg["node_id"], "threshold", by="li",
                                           request_id=f"r{n}", rule="crack.opening", level=blue, value=value,
                                           clear=clear, counter=n, ts=node.clock.epoch_ms()))
        node.handle_command()
    again = fixtures.make_node(board)  # a reboot: the stored thresholds are applied as it starts
    for n_ in (node, again):
        (_, set_, clear_) = next(x for x in n_.cfg.rules[0].levels if x[0] == blue)
        assert (set_[0] * 10 ** set_[1], clear_[0] * 10 ** clear_[1]) == (35, 25)
