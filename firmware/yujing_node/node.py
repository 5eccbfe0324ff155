"""The node's cycle: sample -> local alarms -> publish (or buffer) -> wait or deep sleep.

One Node owns every buffer it uses, allocated here once: the reading batches, the CBOR writer,
the ring's two blocks, the MQTT header and receive buffers and the RTC image. A cycle ends with
gc.collect(), so the heap does not grow from cycle to cycle (bench/firmware_bench.py measures it).

Delivery (docs/wire-format.md): on every connect the will (death, reason lost) is registered and
the birth (retained, with back_at when the node sleeps) is published before any data. Each
cycle's readings go out live as one data message at QoS 1; when that is impossible they go to the
ring buffer and are sent later, oldest first and flagged historical, a few messages per cycle.
A sleeping node publishes death reason sleeping with back_at, disconnects cleanly (so the will
is not sent) and deep-sleeps until back_at; its session continues when it wakes.
"""

import binascii
import gc

from . import VERSION
from .cbor import Writer
from .mqtt import Client, MQTTError
from .records import Batch
from .ring import Ring
from .rules import Alarms
from .sched import backoff_ms, next_due
from .state import SEQ_RESERVE, State
from .wire import DEATH_LOST, DEATH_SLEEPING, encode_birth, encode_data, encode_death, topic

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


RING_DIR = "/ring"
STATE_FILE = "/state.json"
_FLUSH_MESSAGES = const(4)  # historical messages per cycle: bounds the cycle's time
_BYTES_PER_READING = const(26)  # worst case in a data message: dt, point, value, quality


class Node:
    def __init__(self, cfg, secrets, board):
        self.cfg = cfg
        self.board = board
        self.clock = board.clock
        self.log = board.log
        base = 0
        for s in cfg.sensors:
            s.open(board, base)
            base += len(s.points)
        self.catalogue = cfg.catalogue
        self.ring = Ring(board.path(RING_DIR), cfg.ring_blocks, cfg.ring_block_bytes)
        self.batch = Batch(len(self.catalogue))
        self.backlog = Batch(self.ring.cap)
        self.writer = Writer(64 + _BYTES_PER_READING * max(len(self.catalogue), self.ring.cap))
        self.state = State(len(cfg.sensors), len(cfg.rules), cfg.ring_block_bytes)
        out = board.pin_out(*cfg.alarm_pin) if cfg.alarm_pin else None
        self.alarms = Alarms(cfg.rules, out, cfg.alarm_level)
        self.led = board.pin_out(*cfg.led) if cfg.led else None
        self.t_birth = topic(cfg.prefix, cfg.site, cfg.node_id, "birth")
        self.t_data = topic(cfg.prefix, cfg.site, cfg.node_id, "data")
        self.t_death = topic(cfg.prefix, cfg.site, cfg.node_id, "death")
        self.t_cmd = topic(cfg.prefix, cfg.site, cfg.node_id, "cmd")
        enc = lambda s: s.encode() if s is not None else None  # noqa: E731
        self.client = Client(
            cfg.client_id.encode(),
            self.clock,
            cfg.keepalive_s,
            enc(secrets.mqtt_username),
            enc(secrets.mqtt_password),
            cfg.publish_timeout_ms,
        )
        self.client.on_message = self.on_command
        self.secrets = secrets
        self.connected = False
        self.next_try = 0
        self.back_at = None
        self.salt = binascii.crc32(cfg.node_id.encode()) & 0xFF
        self.state_path = board.path(STATE_FILE)
        self.wdt = None
        self.cycles = 0

    # ------------------------------------------------------------ start

    def boot(self):
        """Restore the state: a wake from deep sleep continues the session; any other start is a
        new session. RTC memory (if intact) is fresher than the flash file."""
        board, st = self.board, self.state
        cause = board.reset_cause()
        stage = st.unpack(board.rtc_read())
        if stage is None or cause not in ("sleep", "pin"):
            rtc = (st.seq, st.tail, st.tidx, st.dropped) if stage is not None else None
            if not st.load_file(self.state_path):
                st.session = 0
            if rtc:
                st.seq, st.tail, st.tidx, st.dropped = rtc
            st.session += 1
            st.session_start = self.clock.epoch_ms()
            st.seq_reserved = st.seq + SEQ_RESERVE
            st.back_at = 0
            st.save_file(self.state_path)
            self.log("yujing: %s start, session %d, seq %d" % (cause, st.session, st.seq))
        self.ring.dropped = st.dropped
        self.ring.restore(st.tail, st.tidx, stage)
        if cause in ("sleep", "pin"):
            self.next_try = st.retry_at  # keep backing off across deep sleeps
        if hasattr(self.clock, "valid") and not self.clock.valid():
            self.log("yujing: the clock is not set (no NTP yet): timestamps are wrong until it is")
        if stage is not None:
            self.alarms.restore(st.levels)
            for s, n in zip(self.cfg.sensors, st.counters):
                if hasattr(s, "resume"):
                    s.resume(n)
        if cause == "pin":
            for s in self.cfg.sensors:
                if hasattr(s, "tip"):
                    s.tip()
                    break
        if self.cfg.watchdog_ms:
            self.wdt = board.wdt(self.cfg.watchdog_ms)
        return cause

    def feed(self):
        if self.wdt is not None:
            self.wdt.feed()

    # ------------------------------------------------------------ cycle

    def cycle(self):
        """One sample -> alarm -> publish/buffer pass; returns the highest alarm level."""
        self.feed()
        now = self.clock.epoch_ms()
        b = self.batch
        b.clear()
        for s in self.cfg.sensors:
            s.read(b, now)
        top = self.alarms.evaluate(b)
        self.feed()
        if self.cfg.sleep:
            self.back_at = next_due(now, self.cfg.period_ms)
        if not self.connected and now >= self.next_try:
            self.connect(now)
        if self.connected:
            if self.publish(b, False):
                self.flush()
            else:
                self.ring.append_batch(b)
        else:
            self.ring.append_batch(b)
        if self.cfg.ring_sync_cycle:
            self.ring.sync()
        self.save_rtc()
        self.cycles += 1
        if self.led is not None:
            if self.connected:
                self.led.on()
            else:
                self.led.off()
        gc.collect()
        return top

    def save_rtc(self):
        """Keep the state and the partial ring block in RTC memory; False if it does not fit
        (a block_bytes above ~1.9 KB), in which case a reset loses the partial block."""
        st = self.state
        st.tail, st.tidx = self.ring.cursor()
        st.dropped = self.ring.dropped
        st.back_at = self.back_at or 0
        self.alarms.save(st.levels)
        for i, s in enumerate(self.cfg.sensors):
            if hasattr(s, "state"):
                st.counters[i] = s.state()
        return self.board.rtc_write(st.pack(self.ring.stage_image()))

    # ------------------------------------------------------------ MQTT

    def connect(self, now):
        cfg, st, w = self.cfg, self.state, self.writer
        try:
            if not self.board.net_up(cfg.net, self.secrets, self.feed):
                raise OSError("network not up")
            sock = self.board.connect(cfg.host, cfg.port, cfg.publish_timeout_ms)
            self.client.set_will(self.t_death, bytes(encode_death(w, st.session, DEATH_LOST)), 1, True)
            self.client.connect(sock)
            birth = encode_birth(
                w,
                st.session,
                st.session_start,
                cfg.site,
                cfg.node_id,
                VERSION,
                self.catalogue,
                self.ring.dropped,
                self.back_at,
            )
            self.client.publish(self.t_birth, birth, 1, True)
            if cfg.commands:
                self.client.subscribe(self.t_cmd, 1)
        except (OSError, MQTTError) as e:
            self.client.close()
            st.fails += 1
            delay = backoff_ms(st.fails, self.salt)
            self.next_try = st.retry_at = now + delay
            self.log(
                "yujing: connect to %s:%d failed (%s); %d readings buffered; retry in %d s"
                % (cfg.host, cfg.port, e, self.ring.pending(), delay // 1000)
            )
            return False
        st.fails = 0
        st.retry_at = 0
        self.connected = True
        self.log("yujing: connected to %s:%d, session %d" % (cfg.host, cfg.port, st.session))
        return True

    def lost(self, e):
        self.client.close()
        self.connected = False
        self.next_try = 0
        self.log("yujing: connection lost (%s)" % e)

    def publish(self, batch, historical):
        """One data message at QoS 1; False (and disconnected) when no PUBACK came."""
        seq = self.state.next_seq(self.state_path)
        payload = encode_data(self.writer, self.state.session, seq, batch, historical)
        try:
            self.client.publish(self.t_data, payload, 1)
        except (MQTTError, OSError) as e:
            self.lost(e)
            return False
        return True

    def flush(self):
        """Send up to a few historical messages from the ring; persist the cursor if any went."""
        sent = False
        for _ in range(_FLUSH_MESSAGES):
            self.feed()
            self.backlog.clear()
            k = self.ring.peek(self.backlog, self.backlog.cap)
            if not k or not self.publish(self.backlog, True):
                break
            self.ring.consume(k)
            sent = True
        if sent:
            st = self.state
            st.tail, st.tidx = self.ring.cursor()
            st.dropped = self.ring.dropped
            st.save_file(self.state_path)

    def on_command(self, topic_, payload):
        # The wire format defines no commands yet (docs/wire-format.md): log and ignore.
        self.log("yujing: command on %s (%d bytes) ignored: no commands defined" % (topic_.decode(), len(payload)))

    def idle(self):
        """Between cycles: serve keep-alive and incoming messages."""
        if self.connected:
            try:
                self.client.poll()
                self.client.ping_if_due()
            except (MQTTError, OSError) as e:
                self.lost(e)

    # ------------------------------------------------------------ run

    def sleep(self):
        """Say when we are back, disconnect cleanly, keep the state in RTC memory, deep-sleep."""
        now = self.clock.epoch_ms()
        back_at = self.back_at if self.back_at and self.back_at > now else next_due(now, self.cfg.period_ms)
        self.back_at = back_at
        if self.connected:
            try:
                death = encode_death(self.writer, self.state.session, DEATH_SLEEPING, now, back_at)
                self.client.publish(self.t_death, death, 1, True)
            except MQTTError as e:
                self.log("yujing: could not announce sleep (%s)" % e)
            self.client.disconnect()
            self.connected = False
        if not self.save_rtc():
            self.ring.sync()  # no room in RTC memory: the partial block must go to flash
        wake = None
        for s in self.cfg.sensors:
            if hasattr(s, "tip"):
                wake = s.pin
                break
        hold = (self.cfg.alarm_pin[0],) if self.cfg.alarm_pin else ()  # the beacon keeps its state
        self.board.deepsleep(back_at - self.clock.epoch_ms(), wake, hold)

    def run(self, max_cycles=None):
        """Boot, then cycle forever (or max_cycles times). A sleeping node does one cycle per wake."""
        cause = self.boot()
        if self.cfg.sleep:
            st = self.state
            if cause == "pin" and st.back_at > self.clock.epoch_ms():
                self.back_at = st.back_at  # a rain tip woke us early: count it, sleep on
            else:
                self.cycle()
            self.sleep()
            return
        while max_cycles is None or self.cycles < max_cycles:
            try:
                start = self.clock.epoch_ms()
                self.cycle()
            except MemoryError:
                gc.collect()
                self.log("yujing: out of memory in a cycle")
            due = next_due(start, self.cfg.period_ms)
            if max_cycles is not None and self.cycles >= max_cycles:
                break
            while True:
                left = due - self.clock.epoch_ms()
                if left <= 0:
                    break
                self.feed()
                self.idle()
                self.clock.sleep_ms(left if left < 1000 else 1000)
