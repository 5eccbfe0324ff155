# The node cycle under real MicroPython with the simulated board and the in-memory broker.
# Checks what only the firmware can see (watchdog, deep sleep, heap, flash writes) here, and
# prints every published message as "PUB <test> <topic> <hex> <qos> <retain>" so that
# tests/test_firmware_node.py decodes them with the gateway's consumer (gateway/wire.py).
import binascii

import fixtures
from check import eq, run, true
from simboard import SimBroker, SimDeepSleep

PERIOD = 10000


def setup(**over):
    broker = SimBroker()
    b = fixtures.board(broker=broker)
    fixtures.wipe(b)
    fixtures.provision(b, fixtures.config(**over), {"mqtt_username": "slope-07", "mqtt_password": "pw"})
    return b, broker


def dump(tag, broker, start=0):
    for topic, payload, qos, retain in broker.published[start:]:
        print("PUB", tag, topic.decode(), binascii.hexlify(payload).decode(), qos, int(retain))


def test_awake_cycles_publish_birth_then_data_and_feed_the_watchdog():
    b, broker = setup()
    node = fixtures.make_node(b)
    node.run(max_cycles=6)
    topics = [p[0].decode().split("/")[-1] for p in broker.published]
    # the first sample is at blue (50.88 mm >= 40): its alarm event and the retained state go before the data
    eq(topics, ["birth", "alarm", "alarms"] + ["data"] * 6)
    eq(broker.published[0][2:], (1, True), "birth: QoS 1, retained")
    eq(broker.published[1][2:], (1, False), "alarm: QoS 1, not retained")
    eq(broker.published[2][2:], (1, True), "alarms: QoS 1, retained")
    eq(broker.published[3][2:], (1, False), "data: QoS 1, not retained")
    eq(b.clock.now, 1767225600000 + 5 * PERIOD + 10, "six cycles on the 10 s grid (+10 ms: the SHT4x conversion)")
    dog = b.dogs[0]
    eq(dog.timeout_ms, 30000)
    true(dog.longest <= 1000, "watchdog fed at least every second (longest gap %d ms)" % dog.longest)
    eq(b.pins[4].state, 0, "blue (50.88 mm >= 40) is below the output's yellow")
    b.adc(34).value = 6600  # 63.5 mm: yellow
    node.cycle()
    eq(b.pins[4].state, 1, "output on at yellow, set before any network step")
    dump("awake", broker)


def test_offline_readings_go_to_the_ring_and_come_back_historical():
    b, broker = setup()
    node = fixtures.make_node(b)
    b.net_ok = False
    node.run(max_cycles=7)
    eq(broker.published, [])
    eq(node.ring.pending(), 7 * 6)
    true(any("retry in" in line for line in b.logs))
    b.net_ok = True
    node.run(max_cycles=14)  # a restart (new session; RTC memory carries the ring) up to 14 cycles in all
    kinds = [p[0].decode().split("/")[-1] for p in broker.published]
    eq(kinds[0], "birth")
    eq(node.ring.pending(), 0)
    dump("offline", broker)


def test_lost_connection_sends_the_will_and_buffers_until_reconnected():
    b, broker = setup()
    node = fixtures.make_node(b)
    node.run(max_cycles=2)
    broker.drop()  # the link dies: the broker publishes the will
    n = len(broker.published)
    node.cycle()  # publish fails -> readings to the ring
    eq(node.connected, False)
    eq(node.ring.pending(), 6)
    node.cycle()  # reconnects: birth, live data, then the backlog
    eq(node.ring.pending(), 0)
    true(len(broker.published) > n)
    dump("will", broker)


def test_sleep_mode_announces_back_at_and_resumes_the_session():
    b, broker = setup(mode="sleep", sample_period_s=600)
    node = fixtures.make_node(b)
    try:
        node.run()
        raise AssertionError("no deep sleep")
    except SimDeepSleep:
        at, ms, pin = b.sleeps[-1]
        eq(pin, 27, "the rain gauge pin wakes the board")
        eq(at + ms, node.back_at)
        eq(node.back_at % 600000, 0, "back at the next period boundary")
    session = node.state.session
    # a rain tip wakes it early: counted, no publish, back to sleep until the same time
    b.wake(ms=120000, cause="pin")
    n = len(broker.published)
    node = fixtures.make_node(b)
    try:
        node.run()
    except SimDeepSleep:
        pass
    eq(len(broker.published), n, "a pin wake publishes nothing")
    eq(b.sleeps[-1][0] + b.sleeps[-1][1], b.sleeps[-2][0] + b.sleeps[-2][1])
    b.wake(cause="sleep")
    node = fixtures.make_node(b)
    try:
        node.run()
    except SimDeepSleep:
        pass
    eq(node.state.session, session, "a scheduled wake continues the session")
    eq(b.held, (4,), "the alarm output keeps its level through deep sleep")
    eq(node.ring.writes, 0, "no flash block written by a sleeping node that stayed online")
    dump("sleep", broker)


def test_sleeping_node_offline_keeps_readings_in_rtc_memory_not_flash():
    b, broker = setup(mode="sleep", sample_period_s=600)
    b.net_ok = False
    for _ in range(3):
        node = fixtures.make_node(b)
        try:
            node.run()
        except SimDeepSleep:
            b.wake()
    eq(node.ring.writes, 0, "18 readings fit the RTC copy of the block: no flash write")
    eq(node.ring.pending(), 18)
    b.net_ok = True
    node = fixtures.make_node(b)
    try:
        node.run()
    except SimDeepSleep:
        pass
    eq(node.ring.pending(), 0)
    dump("sleep_offline", broker)


def test_sleeping_node_backs_off_reconnecting_across_wakes():
    b, broker = setup(mode="sleep", sample_period_s=1)
    b.net_ok = False
    for _ in range(20):
        node = fixtures.make_node(b)
        try:
            node.run()
        except SimDeepSleep:
            b.wake()
    true(3 <= b.net_attempts <= 6, "20 wakes, %d connect attempts: the backoff survives deep sleep" % b.net_attempts)
    eq(node.ring.pending(), 20 * 6)


def test_unexpected_error_is_logged_shown_and_restarts_the_board():
    from simboard import SimReset
    from yujing_node import app

    b, broker = setup()

    def broken(batch, ts):
        raise RuntimeError("driver bug")

    import yujing_node.node as N

    orig = N.Node.__init__

    def init(self, *a):
        orig(self, *a)
        self.cfg.sensors[0].read = broken

    N.Node.__init__ = init
    try:
        app.main(b)
        raise AssertionError("no restart")
    except SimReset:
        pass
    finally:
        N.Node.__init__ = orig
    true(any("unexpected error: RuntimeError('driver bug'" in line for line in b.logs), b.logs)
    eq(b.resets, 1)
    true(b.clock.slept >= 30000, "a pause before the restart, not a tight loop")
    true(b.dogs[0].longest <= 2000, "the watchdog is fed while it waits")


def test_restarts_never_reuse_a_sequence_number():
    b, broker = setup()
    node = fixtures.make_node(b)
    node.run(max_cycles=3)
    node.client.close()
    b.cause = "soft"  # watchdog/soft reset: RTC memory intact -> new session, exact seq
    node = fixtures.make_node(b)
    node.run(max_cycles=2)
    node.client.close()
    b.rtc = None  # power cut: RTC memory lost -> continue after the flash reservation
    b.cause = "cold"
    node = fixtures.make_node(b)
    node.run(max_cycles=2)
    dump("restart", broker)


run(globals())
