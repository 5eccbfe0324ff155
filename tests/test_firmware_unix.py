"""The node firmware for real under the MicroPython unix port (tests/unix_node.py): the .mpy firmware, the real
hw.Board with only the silicon faked, the heap capped, TLS with a client certificate against a real mosquitto
whose ACL provisioning.broker_files wrote, signed commands (COSE_Mac0) and alarm events that the platform's
decoder (gateway.consumer) reads."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import pytest

from gateway import wire
from gateway.consumer import Decoder
from gateway.node_commands import mac_node_command, new_node_key
from tests.unix_node import (
    PREFIX,
    SITE,
    UnixNode,
    compiled_firmware,
    make_pki,
    node_config,
    platform_client,
    start_tls_broker,
    take,
    watching,
)

NODES = ("n1", "n2")
HEAP = "200K"  # the unix port is 64-bit: about twice an ESP32's heap for the same objects (bench/node_heap_tls.py)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("unix-site")
    pki = make_pki(root, NODES)
    broker = start_tls_broker(pki, root, NODES)
    yield pki, broker, compiled_firmware(root)
    broker.stop()


def _node(tmp_path: Path, site: tuple, name: str, *, foreign: bool = False, node_id: str | None = None,
          secrets: dict | None = None, **over: object) -> UnixNode:
    pki, broker, mpy = site
    cfg = node_config(node_id or name, broker.port, **over)
    return UnixNode(tmp_path / (node_id or name), mpy, cfg, secrets or {}, pki.node_files(name, foreign), heapsize=HEAP)


def test_node_over_tls_publishes_birth_and_readings_the_consumer_decodes(tmp_path: Path, site: tuple) -> None:
    pki, broker, _ = site
    sub = platform_client(pki, broker.port, f"{PREFIX}/{SITE}/n1/#")
    node = _node(tmp_path, site, "n1").start()
    with watching(node, sub):
        node.wait_for("connected to 127.0.0.1")
        msgs = take(sub, 3, kinds=("birth", "data"))
    dec = Decoder()
    records = []
    for topic, payload, _ in msgs:
        res = dec.feed(topic, payload)
        assert not any("rejected" in n for n in res.notices), res.notices
        records += res.records
    assert msgs[0][0].endswith("/n1/birth"), "the birth comes first"
    birth = wire.decode_birth(msgs[0][1])
    assert (birth.site, birth.gateway, birth.kind) == (SITE, "n1", "node")
    # two data messages: one reading each, or more when a cycle had too little time left before the next sample
    # to wait for a PUBACK and its reading went out later from the ring (the network never makes a sample late)
    assert len(records) >= 2 and {(r["device"], r["value"]) for r in records} == {("crack", 50.88)}, records
    assert wire.decode_data(msgs[1][1]).readings[0].value == Decimal("50.88")  # exact decimal, tag 4


def test_a_certificate_from_another_ca_is_refused(tmp_path: Path, site: tuple) -> None:
    pki, broker, _ = site
    sub = platform_client(pki, broker.port, f"{PREFIX}/{SITE}/#")
    node = _node(tmp_path, site, "n1", foreign=True).start()
    with watching(node, sub):
        line = node.wait_for("connect to 127.0.0.1")
        assert "failed" in line, line
        node.wait_for("connect to 127.0.0.1", 10)  # and the retry (backoff) is refused too
        live = [m[0] for m in list(sub.q.queue) if not m[2]]  # retained ones are earlier tests' messages
        assert live == [], "nothing of a node the broker refused reaches the platform"


def test_a_node_cannot_publish_on_another_nodes_topics(tmp_path: Path, site: tuple) -> None:
    """n1's certificate with node_id n2: the TLS handshake and CONNECT succeed (it is a valid site identity), but
    the ACL only lets identity n1 write n1's topics, so the broker drops every message for n2's."""
    pki, broker, _ = site
    sub = platform_client(pki, broker.port, f"{PREFIX}/{SITE}/n2/#")
    node = _node(tmp_path, site, "n1", node_id="n2").start()
    with watching(node, sub):
        node.wait_for("connected to 127.0.0.1")  # birth published (and PUBACKed: mosquitto drops it silently)
        with pytest.raises(AssertionError):
            take(sub, 1, timeout=2.5)  # two more cycles' data, also dropped
        assert not any("lost" in line or "failed" in line for line in node.log), node.log


def test_signed_commands_ack_threshold_report_and_replay_after_reboot(tmp_path: Path, site: tuple) -> None:
    """A 60 s period, so every cycle after the first is one a `report` command asked for."""
    pki, broker, _ = site
    key = new_node_key()
    sub = platform_client(pki, broker.port, f"{PREFIX}/{SITE}/n1/#")
    node = _node(tmp_path, site, "n1", secrets={"command_key": key.hex()}, sample_period_s=60,
                 mqtt={"commands": True, "alarm_events": True})
    node.set_adc(4400)  # 41.5 mm: blue (set 40)
    node.start()
    counter = [100]

    def send(command: str, **kw) -> bytes:  # type: ignore[no-untyped-def]
        counter[0] += 1
        raw = mac_node_command(key, None, SITE, "n1", command, by="li", request_id=f"r{counter[0]}",
                               counter=counter[0], **kw)
        sub.publish(f"{PREFIX}/{SITE}/n1/cmd", raw, qos=1).wait_for_publish(5)
        return raw

    def reply() -> wire.Reply:
        return wire.decode_reply(take(sub, 1, kinds=("reply",))[0][1])

    def kinds(msgs: list) -> list[str]:
        return [t.rsplit("/", 1)[1] for t, _, _ in msgs]

    with watching(node, sub):
        node.wait_for("connected to 127.0.0.1")
        got = take(sub, 4, kinds=("birth", "alarm", "alarms", "data"))
        assert kinds(got) == ["birth", "alarm", "alarms", "data"]  # alarm events go before the cycle's data
        alarm, state = got[1][1], got[2][1]
        a = wire.decode_alarm(alarm)
        assert [(e.kind, e.rule, e.old_level, e.new_level) for e in a.events] == [("raised", "crack.opening", 0, 1)]
        assert a.events[0].values == {0: Decimal("41.5")}
        # byte-identical to what the gateway's encoder makes of the same content
        assert wire.encode_alarm(a.session, a.seq, a.events, historical=a.historical) == alarm
        session, ts, states = wire.decode_alarms(state)
        assert wire.encode_alarms(session, ts, states) == state
        assert [(x.rule, x.level, x.latched) for x in states] == [("crack.opening", 1, False)]

        node.set_adc(3000)  # 27.5 mm: the condition clears, the latch holds blue: no event
        send("report")
        r = reply()
        assert r.ok and r.message == "report requested"
        got = take(sub, 1, kinds=("data", "alarm"), timeout=3)  # the reported cycle, well before the 60 s one
        assert kinds(got) == ["data"]
        assert wire.decode_data(got[0][1]).readings[0].value == Decimal("27.5")

        send("ack", rule="crack.opening")
        r = reply()
        assert r.ok and "acknowledged crack.opening at IV_BLUE" in r.message, r.message
        got = take(sub, 2, kinds=("alarm", "alarms"))
        events = wire.decode_alarm(got[0][1]).events
        assert [(e.kind, e.by) for e in events] == [("acknowledged", "li"), ("cleared", "li")]
        assert [(x.level, x.latched) for x in wire.decode_alarms(got[1][1])[2]] == [(0, False)]

        send("threshold", rule="crack.opening", level=1, value="25")  # 27.5 mm is above the new blue
        r = reply()
        assert r.ok and "set 25 clear 24 (was 40)" in r.message, r.message
        send("report")
        assert reply().ok
        ev = wire.decode_alarm(take(sub, 1, kinds=("alarm",), timeout=3)[0][1]).events
        assert [(e.kind, e.new_level) for e in ev] == [("raised", 1)]

        send("threshold", rule="crack.opening", level=1, value="65")  # beyond the rule's limits 20..60
        r = reply()
        assert not r.ok and "rejected (content)" in r.message and "outside the limits" in r.message, r.message

        replayed = send("report")
        assert reply().ok
        sub.publish(f"{PREFIX}/{SITE}/n1/cmd", replayed, qos=1).wait_for_publish(5)
        r = reply()
        assert not r.ok and "rejected (replay)" in r.message and r.request_id == f"r{counter[0]}"

        node.restart()  # a reboot: the counter and the threshold were persisted on the flash
        node.wait_for("connected to 127.0.0.1")
        sub.publish(f"{PREFIX}/{SITE}/n1/cmd", replayed, qos=1).wait_for_publish(5)
        r = reply()
        assert not r.ok and "rejected (replay)" in r.message, r.message
        send("threshold", rule="crack.opening", level=1, value="30", clear="28")
        r = reply()
        assert r.ok and "set 30 clear 28 (was 25)" in r.message, r.message  # 25 survived the reboot

        forged = bytearray(send("report"))
        forged[-1] ^= 1
        sub.publish(f"{PREFIX}/{SITE}/n1/cmd", bytes(forged), qos=1).wait_for_publish(5)
        r1, r2 = reply(), reply()
        assert r1.ok and not r2.ok and "rejected (unauthorised): bad MAC" in r2.message and r2.request_id is None


def test_the_provisioning_simboard_runs_the_firmware_through_the_hook(tmp_path: Path, site: tuple) -> None:
    """provisioning/simboard.py (the pty board mpremote drives) plays this firmware's ESP32 with the boot code of
    firmware/host/unix/hook.py: after its start /main.py runs and the node comes online over TLS."""
    import sys

    from provisioning.simboard import SimBoard
    from tests.firmware_helpers import FIRMWARE

    sys.path.insert(0, str(FIRMWARE / "host" / "unix"))
    try:
        from hook import boot_code
    finally:
        sys.path.pop(0)
    pki, broker, _ = site
    node = _node(tmp_path, site, "n2")  # lays the flash out; SimBoard runs it instead of board.py
    sub = platform_client(pki, broker.port, f"{PREFIX}/{SITE}/n2/data")
    try:
        with SimBoard(node.flash, heapsize=HEAP, boot_code=boot_code(node.sim)):
            ((_, payload, _),) = take(sub, 1, timeout=10)
        assert wire.decode_data(payload).readings[0].value == Decimal("50.88")
    finally:
        sub.loop_stop()


def test_a_pem_ca_file_is_a_config_error_naming_the_field(tmp_path: Path, site: tuple) -> None:
    pki, _, _ = site
    node = _node(tmp_path, site, "n1")
    (node.flash / "ca.der").write_bytes(pki.store.ca_cert_path.read_bytes())  # PEM where DER belongs
    node.start()
    try:
        line = node.wait_for("config error")
        assert "/config.json: mqtt.ca_file: /ca.der: not DER" in line, line
    finally:
        node.stop()


def test_a_sleeping_node_reboots_from_deep_sleep_and_continues_its_session(tmp_path: Path, site: tuple) -> None:
    """deepsleep() ends the process (RTC memory and the reset cause on the sim folder); the restart is a wake:
    same session, the next seq, no new session on the flash."""
    pki, broker, _ = site
    sub = platform_client(pki, broker.port, f"{PREFIX}/{SITE}/n1/data")
    # 3 s: a wake's network step must fit before the next sample is due (firmware/README.md, "The network never
    # makes a sample late"), and boot + TLS take ~0.5 s here; with 1 s a wake landing late in its period sends nothing
    node = _node(tmp_path, site, "n1", mode="sleep", sample_period_s=3)
    try:
        node.start()
        slept = node.wait_for("SIM deepsleep")
        assert node.proc is not None and node.proc.wait(5) == 0
        first = wire.decode_data(take(sub, 1)[0][1])
        time.sleep(int(slept.split()[-1]) / 1000)  # the sleep the board asked for: it wakes on its period's grid
        node.start()
        node.wait_for("SIM deepsleep")
        second = wire.decode_data(take(sub, 1)[0][1])
        assert (second.session, second.seq) == (first.session, first.seq + 1)
        assert not any("start, session" in line for line in node.log[1:]), node.log  # only the first boot was cold
    finally:
        node.stop()
        sub.loop_stop()


def test_alarm_events_raised_offline_are_sent_after_the_next_connect(tmp_path: Path, site) -> None:
    """Never lost silently: an alarm raised while the broker is unreachable waits in /alarms.json and goes out
    right after the next birth (here after a restart with the right port), before data."""
    import json
    import time

    pki, broker, _ = site
    sub = platform_client(pki, broker.port, f"{PREFIX}/{SITE}/n1/#")
    node = _node(tmp_path, site, "n1", mqtt={"alarm_events": True, "port": 1})  # nothing listens on port 1
    node.set_adc(8400)  # 81.5 mm: red at once
    try:
        node.start()
        node.wait_for("alarm crack.opening raised NONE → I_RED")
        node.wait_for("connect to 127.0.0.1:1 failed")
        for _ in range(40):  # the cycle ends by saving the RTC image (levels): a reset, not a power cut, follows
            if (node.sim / "rtc.bin").exists():
                break
            time.sleep(0.05)
        node.stop()
        pending = json.loads((node.flash / "alarms.json").read_text())["events"]
        assert [e[:4] for e in pending] == [[0, "crack.opening", 0, 4]]
        cfg = json.loads((node.flash / "config.json").read_text())
        cfg["mqtt"]["port"] = broker.port
        (node.flash / "config.json").write_text(json.dumps(cfg))
        node.start()
        node.wait_for("connected to 127.0.0.1")
        got = take(sub, 3, kinds=("birth", "alarm", "alarms"))
        kinds = [t.rsplit("/", 1)[1] for t, _, _ in got]
        assert kinds == ["birth", "alarm", "alarms"], kinds
        events = wire.decode_alarm(got[1][1]).events
        assert [(e.kind, e.new_level) for e in events] == [("raised", 4)], node.log
    finally:
        node.stop()
        sub.loop_stop()
