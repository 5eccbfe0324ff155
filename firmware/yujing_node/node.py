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

Alarm changes (rules.Alarms.events) go out as alarm messages (their own seq, persisted with any unsent
events in /alarms.json) before the cycle's data, followed by the retained alarms state. Offline, up to
MAX_PENDING_EVENTS wait on flash and go out (historical when older than 60 s) right after the next birth;
beyond that the oldest are dropped with a log line, and the retained state sent on every connect still
says where every alarm stands. Signed commands (command.py) arrive on cmd, are handled between cycles
and answered on reply.
"""

import binascii
import gc
import json

from . import VERSION
from .cbor import Writer
from .config import LEVEL_NAMES
from .mqtt import Client, MQTTError
from .records import Batch
from .ring import Ring
from .rules import ACKNOWLEDGED, FAULT, Alarms
from .sched import backoff_ms, next_due
from .state import State, write_json
from .wire import (
    CLOCK_FLOOR_MS,
    DEATH_LOST,
    DEATH_SLEEPING,
    encode_alarm,
    encode_alarms,
    encode_birth,
    encode_data,
    encode_death,
    encode_reply,
    topic,
    value_map,
)

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


RING_DIR = "/ring"
STATE_FILE = "/state.json"
ALARMS_FILE = "/alarms.json"
COMMANDS_FILE = "/commands.json"
MAX_PENDING_EVENTS = const(8)
_HISTORICAL_MS = const(60000)
_LEVEL_NAMES = ("NONE",) + LEVEL_NAMES
_KIND_WORDS = ("raised", "escalated", "de_escalated", "cleared", "acknowledged", "fault", "fault_cleared")
_INBOX = const(4)  # commands held between two polls
_REJECT_BURST = const(10)  # rejection replies per minute at most (a flood is not answered)
_FLUSH_MESSAGES = const(4)  # historical messages per cycle: bounds the cycle's time
# The network never makes the next sample late: a blocking step (connect, TLS, a wait for an acknowledgement)
# gets the configured timeout, but no more than what is left before the next sample is due less a margin, and
# with less than the minimum left it waits for a later cycle (readings go to the ring meanwhile). A link that
# goes black during a 5 s PUBACK wait delayed the alarm output of the next sample by 2.5 s without this
# (hil_tests/test_node_network_faults.py).
_NET_MARGIN_MS = const(50)
_NET_MIN_MS = const(100)
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
        self.t_alarm = topic(cfg.prefix, cfg.site, cfg.node_id, "alarm")
        self.t_alarms = topic(cfg.prefix, cfg.site, cfg.node_id, "alarms")
        self.t_reply = topic(cfg.prefix, cfg.site, cfg.node_id, "reply")
        self.alarm_seq = 1
        self.pending_events = []  # (kind, rule, old, new, ts, values, message, by), not yet published
        self.since = [0] * len(cfg.rules)
        self.alarms_path = board.path(ALARMS_FILE)
        self.report_now = False
        self.inbox = []  # the raw bytes of commands waiting to be handled
        self.cmd_counter = 0
        self.thresholds = {}
        self._rejects = 0
        self._reject_window = 0
        self.cmd_kid = None
        enc = lambda s: s.encode() if s is not None else None  # noqa: E731
        self.client = Client(
            cfg.client_id.encode(),
            self.clock,
            cfg.keepalive_s,
            enc(secrets.mqtt_username),
            enc(secrets.mqtt_password),
            cfg.publish_timeout_ms,
            512 if cfg.commands else 256,
        )
        self.client.on_message = self.on_command
        self.secrets = secrets
        self.connected = False
        self.next_try = 0
        self.net_until = 0  # ticks: when the next sample is due, less the margin (set by each cycle)
        self.back_at = None
        self.salt = binascii.crc32(cfg.node_id.encode()) & 0xFF
        self.state_path = board.path(STATE_FILE)
        self.wdt = None
        self.cycles = 0
        self.commands_path = board.path(COMMANDS_FILE)
        if cfg.commands and secrets.command_key is not None:
            from .command import kid_of

            self.cmd_kid = kid_of(secrets.command_key)
        self._load_commands()

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
            # Nothing reserved yet: next_seq() reserves (on flash) before the first message. A start that is cut
            # again before it sends anything burns no numbers, so a power cut leaves a gap of at most SEQ_RESERVE.
            st.seq_reserved = st.seq
            st.back_at = 0
            st.save_file(self.state_path)
            self.log("yujing: %s start, session %d, seq %d" % (cause, st.session, st.seq))
        self.ring.dropped = st.dropped
        self.ring.restore(st.tail, st.tidx, stage)
        if self.ring.dropped != st.dropped:
            # Readings found lost at start (a block torn by the power cut): on flash now, or the next power cut before
            # a flush takes the count with it (the torn slot is rewritten meanwhile: it cannot be counted again).
            st.dropped = self.ring.dropped
            st.save_file(self.state_path)
        if cause in ("sleep", "pin"):
            self.next_try = st.retry_at  # keep backing off across deep sleeps
        if hasattr(self.clock, "valid") and not self.clock.valid():
            self.log("yujing: the clock is not set (no NTP yet): timestamps are wrong until it is")
        if stage is not None:
            self.alarms.restore(st.levels)
            for s, n in zip(self.cfg.sensors, st.counters):
                if hasattr(s, "resume"):
                    s.resume(n)
        self._load_alarms()
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
        self.take_events(now, b)
        self.feed()
        due = next_due(now, self.cfg.period_ms)
        if self.cfg.sleep:
            self.back_at = due
        clock = self.clock
        self.net_until = clock.ticks_add(clock.ticks_ms(), due - now - _NET_MARGIN_MS)
        if not self.connected and now >= self.next_try and self.net_left() >= _NET_MIN_MS:
            self.connect(now)
        if self.connected and self.pending_events and self.cfg.alarm_events:
            self.send_alarms(now)
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

    def net_left(self):
        """Milliseconds left for the network before the next sample (less the margin)."""
        return self.clock.ticks_diff(self.net_until, self.clock.ticks_ms())

    def arm(self):
        """Give the next blocking network step the configured timeout, cut to what is left before the next
        sample; OSError when less than the minimum is left (the step waits for a later cycle)."""
        left = self.net_left()
        if left < _NET_MIN_MS:
            raise OSError("no time left before the next sample")
        t = self.cfg.publish_timeout_ms
        self.client.timeout_ms = t if left > t else left
        return self.client.timeout_ms

    def connect(self, now):
        cfg, st, w = self.cfg, self.state, self.writer
        try:
            if not self.board.net_up(cfg.net, self.secrets, self.feed):
                raise OSError("network not up")
            t = self.arm()
            if cfg.tls:
                sock = self.board.connect(cfg.host, cfg.port, t, cfg.tls)
            else:
                sock = self.board.connect(cfg.host, cfg.port, t)
            self.client.set_will(self.t_death, bytes(encode_death(w, st.session, DEATH_LOST)), 1, True)
            self.arm()
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
            self.arm()
            self.client.publish(self.t_birth, birth, 1, True)
            if cfg.commands:
                self.arm()
                self.client.subscribe(self.t_cmd, 1)
            if cfg.alarm_events and cfg.rules and not self.send_alarms(now, True):
                raise OSError("alarm state not acknowledged")
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
        """One data message at QoS 1; False when no PUBACK came (then disconnected) or when too little time is
        left before the next sample to wait for one (still connected: the readings wait in the ring)."""
        try:
            self.arm()
        except OSError:
            return False
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
            k = same_clock(self.backlog, self.ring.peek(self.backlog, self.backlog.cap))
            if not k or not self.publish(self.backlog, True):
                break
            self.ring.consume(k)
            sent = True
        if sent:
            st = self.state
            st.tail, st.tidx = self.ring.cursor()
            st.dropped = self.ring.dropped
            st.save_file(self.state_path)

    # ------------------------------------------------------------ alarm events

    def take_events(self, now, batch):
        """Turn the rules' new events into pending alarm events (values copied out of the batch)."""
        ev = self.alarms.events
        if not self.cfg.alarm_events:
            ev.clear()
            self.alarms.lost_events = 0
            return
        if not ev and not self.alarms.lost_events:
            return
        rules = self.cfg.rules
        for kind, k, old, new, i, by in ev:
            rid = rules[k].id
            if kind == ACKNOWLEDGED:
                msg = "%s acknowledged at %s by %s" % (rid, _LEVEL_NAMES[new], by)
            elif kind >= FAULT:
                what = "fault" if kind == FAULT else "fault cleared"
                msg = "%s %s (level kept at %s)" % (rid, what, _LEVEL_NAMES[new])
            else:
                msg = "%s %s %s → %s" % (rid, _KIND_WORDS[kind], _LEVEL_NAMES[old], _LEVEL_NAMES[new])
                self.since[k] = now
            if len(self.pending_events) >= MAX_PENDING_EVENTS:
                self.pending_events.pop(0)
                self.log("yujing: alarm event queue full: the oldest event dropped (the retained state stays right)")
            vals = value_map(self.writer, batch, i) if batch is not None else b"\xa0"
            self.pending_events.append((kind, rid, old, new, now, vals, msg, by or ""))
            self.log("yujing: alarm " + msg)
        if self.alarms.lost_events:
            self.log("yujing: %d alarm events dropped" % self.alarms.lost_events)
            self.alarms.lost_events = 0
        ev.clear()
        self._save_alarms()

    def alarm_states(self):
        a = self.alarms
        out = []
        for k, r in enumerate(self.cfg.rules):
            lv = a.level[k]
            out.append((r.id, lv, a.cond[k], lv > a.cond[k], bool(a.acked[k]), bool(a.fault[k]), self.since[k],
                        "bad reading" if a.fault[k] else ""))
        return out

    def send_alarms(self, now, state=False):
        """Publish the pending events (one alarm message, QoS 1) and then the retained state (also when
        `state`). False (and disconnected) when the broker did not acknowledge; the events stay pending."""
        if self.net_left() < _NET_MIN_MS:
            return False  # the events stay pending: the next cycle sends them first
        try:
            ev = self.pending_events
            while ev:
                # events stamped before and after the clock was set never share a message (wire key 6)
                side = ev[0][4] < CLOCK_FLOOR_MS
                n = 1
                while n < len(ev) and (ev[n][4] < CLOCK_FLOOR_MS) == side:
                    n += 1
                part = ev if n == len(ev) else ev[:n]
                self.arm()
                old = part[0][4] < now - _HISTORICAL_MS
                payload = encode_alarm(self.writer, self.state.session, self.alarm_seq, part, old)
                self.client.publish(self.t_alarm, payload, 1)
                self.alarm_seq += 1
                for _ in range(n):
                    ev.pop(0)
                self._save_alarms()
                state = True
            if state:
                self.arm()
                payload = encode_alarms(self.writer, self.state.session, now, self.alarm_states())
                self.client.publish(self.t_alarms, payload, 1, True)
        except (MQTTError, OSError) as e:
            self.lost(e)
            return False
        return True

    def _load_alarms(self):
        try:
            with open(self.alarms_path) as f:
                d = json.loads(f.read())
            if d["session"] == self.state.session:
                self.alarm_seq = int(d["seq"])
            self.pending_events = [tuple(e[:5]) + (binascii.unhexlify(e[5]), e[6], e[7]) for e in d["events"]]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            pass

    def _save_alarms(self):
        """The alarm seq and the unsent events, on flash (a rare write: alarms change seldom)."""
        ev = [list(e[:5]) + [binascii.hexlify(e[5]).decode(), e[6], e[7]] for e in self.pending_events]
        write_json(self.alarms_path, {"session": self.state.session, "seq": self.alarm_seq, "events": ev})

    # ------------------------------------------------------------ commands

    def on_command(self, topic_, payload):
        """From inside the MQTT client's poll: keep the bytes; handle_command runs once poll() returned."""
        if len(self.inbox) < _INBOX:
            self.inbox.append(bytes(payload))
        else:  # a burst beyond what we hold: refused, never dropped unsaid (logged)
            self.log("yujing: command refused: %d already waiting" % _INBOX)

    def _load_commands(self):
        """The last accepted counter (per key) and the thresholds commands have set, which stay set over
        restarts; a stored threshold now outside the configured limits is dropped."""
        try:
            with open(self.commands_path) as f:
                d = json.loads(f.read())
        except (OSError, ValueError):
            return
        if self.cmd_kid is not None and d.get("kid") == binascii.hexlify(self.cmd_kid).decode():
            self.cmd_counter = int(d.get("counter", 0))
        for rid, entries in d.get("thresholds", {}).items():
            for level, set_, clear in entries:
                try:
                    self.set_threshold(rid, level, set_, clear)
                except ValueError as e:
                    self.log("yujing: stored threshold for %s not applied: %s" % (rid, e))

    def _save_commands(self, counter, thresholds):
        write_json(self.commands_path, {"kid": binascii.hexlify(self.cmd_kid).decode(), "counter": counter,
                                        "thresholds": thresholds})

    def rule_index(self, rid):
        """The index of the rule with id `rid` (the last, as the rules are searched), or None."""
        k = None
        for j, r in enumerate(self.cfg.rules):
            if r.id == rid:
                k = j
        return k

    def set_threshold(self, rid, level, set_s, clear_s, dry=False):
        """Move rule `rid`'s rung `level` to set/clear (decimal text; clear None keeps the rung's gap) within
        the rule's limits, keeping the ladder ordered. ValueError says why not. Returns (old set, new set, clear)."""
        from . import dec

        k = self.rule_index(rid)
        if k is None:
            raise ValueError("no rule %s" % rid)
        rule = self.cfg.rules[k]
        if rule.limits is None:
            raise ValueError("rule %s has no limits configured: its thresholds are not remotely settable" % rid)
        idx = None
        for j, (lv, _, _) in enumerate(rule.levels):
            if lv == level:
                idx = j
        if idx is None:
            raise ValueError("rule %s has no level %s" % (rid, level))
        _, old_set, old_clear = rule.levels[idx]
        sm, se = dec.parse(set_s)
        if clear_s is None:  # keep the hysteresis gap: clear = set - (old set - old clear)
            e = min(se, old_set[1], old_clear[1])
            cm = sm * 10 ** (se - e) - (old_set[0] * 10 ** (old_set[1] - e) - old_clear[0] * 10 ** (old_clear[1] - e))
            ce = e
        else:
            cm, ce = dec.parse(clear_s)
        (lo_m, lo_e), (hi_m, hi_e) = rule.limits
        for m, e in ((sm, se), (cm, ce)):
            if dec.cmp(m, e, lo_m, lo_e) < 0 or dec.cmp(m, e, hi_m, hi_e) > 0:
                raise ValueError("%s is outside the limits %s..%s" % (dec.to_str(m, e), dec.to_str(lo_m, lo_e),
                                                                      dec.to_str(hi_m, hi_e)))
        c = dec.cmp(cm, ce, sm, se)
        if (rule.high and c > 0) or (not rule.high and c < 0):
            raise ValueError("clear %s is on the wrong side of set %s" % (dec.to_str(cm, ce), dec.to_str(sm, se)))
        for j, (_, ps, _) in enumerate(rule.levels):
            if j != idx:
                c = dec.cmp(sm, se, ps[0], ps[1])
                if (j < idx and (c <= 0 if rule.high else c >= 0)) or (j > idx and (c >= 0 if rule.high else c <= 0)):
                    raise ValueError("set %s would break the order of the rule's levels" % dec.to_str(sm, se))
        new_set, new_clear = dec.to_str(sm, se), dec.to_str(cm, ce)
        if not dry:
            rule.levels[idx] = (level, (sm, se, sm * 10.0**se), (cm, ce, cm * 10.0**ce))
            self.thresholds[rid] = _with_rung(self.thresholds.get(rid, []), level, new_set, new_clear)
        return dec.to_str(old_set[0], old_set[1]), new_set, new_clear

    def handle_command(self):
        """Verify, check freshness and replay, persist the counter, carry out, answer on reply."""
        from . import command as cm

        raw = self.inbox.pop(0)
        tag = cm.digest(raw)
        rid = None
        try:
            payload = cm.verify(raw, self.secrets.command_key, self.cmd_kid)
            c = cm.parse(payload, self.cfg.site, self.cfg.node_id)
            rid = c.id
            clock = self.clock
            if hasattr(clock, "valid") and clock.valid():
                skew = c.ts - clock.epoch_ms()
                if skew > 300000 or skew < -300000:
                    raise cm.Rejected(
                        "stale", "stale or future timestamp (%+d s from the node's clock)" % (skew // 1000)
                    )
            if c.counter <= self.cmd_counter:
                raise cm.Rejected("replay", "replayed (counter %d is not above %d)" % (c.counter, self.cmd_counter))
            k = self.rule_index(c.rule)
            if c.command != "report" and k is None:
                raise cm.Rejected("content", "no rule %s on this node" % c.rule)
            thresholds = self.thresholds
            if c.command == "threshold":
                try:
                    _, new_set, new_clear = self.set_threshold(c.rule, c.level, c.value, c.clear, True)
                except ValueError as e:
                    raise cm.Rejected("content", str(e)) from None
                thresholds = dict(thresholds)  # as it will be once the command ran (clear worked out)
                thresholds[c.rule] = _with_rung(thresholds.get(c.rule, []), c.level, new_set, new_clear)
            try:
                self._save_commands(c.counter, thresholds)  # before it runs: a replay fails after a reboot too
            except OSError as e:
                raise cm.Rejected("storage", "cannot record its counter against replay (%s)" % e) from None
            self.cmd_counter = c.counter
        except cm.Rejected as e:
            self.log("yujing: command %s rejected (%s): %s" % (binascii.hexlify(tag).decode(), e.reason, e))
            now = self.clock.ticks_ms()
            if self.clock.ticks_diff(now, self._reject_window) >= 60000:
                self._reject_window, self._rejects = now, 0
            self._rejects += 1
            if self._rejects <= _REJECT_BURST:
                self.reply(rid, False, "rejected (%s): %s" % (e.reason, e), tag)
            return
        now = self.clock.epoch_ms()
        if c.command == "ack":
            lv = self.alarms.level[k]
            ok = self.alarms.acknowledge(k, c.by)
            self.take_events(now, None)
            msg = "acknowledged %s at %s" % (c.rule, _LEVEL_NAMES[lv]) if ok else "%s: nothing to acknowledge" % c.rule
        elif c.command == "threshold":
            old, new, clear = self.set_threshold(c.rule, c.level, c.value, c.clear)
            msg = "%s %s set %s clear %s (was %s)" % (c.rule, _LEVEL_NAMES[c.level], new, clear, old)
            ok = True
        else:
            self.report_now = True
            msg, ok = "report requested", True
        self.log("yujing: command %s by %s: %s" % (c.command, c.by, msg))
        self.reply(rid, ok, msg, tag)
        if self.connected and c.command == "ack" and ok and self.cfg.alarm_events:
            self.send_alarms(now, True)

    def reply(self, rid, ok, msg, tag):
        if self.connected and self.net_left() >= _NET_MIN_MS:
            try:
                self.arm()
                self.client.publish(self.t_reply, encode_reply(self.writer, rid, ok, msg, tag), 1)
            except (MQTTError, OSError) as e:
                self.lost(e)

    def idle(self):
        """Between cycles: serve keep-alive and incoming messages, and carry out a command that came."""
        if self.connected:
            try:
                self.client.poll()
                self.client.ping_if_due()
            except (MQTTError, OSError) as e:
                self.lost(e)
        while self.inbox:
            self.handle_command()

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
                if left <= 0 or self.report_now:
                    self.report_now = False
                    break
                self.feed()
                self.idle()
                self.clock.sleep_ms(left if left < 1000 else 1000)


def same_clock(b, k):
    """The first of the k readings in Batch b that share a side of the clock floor (stamped before the clock was
    set, or after): a data message never mixes them (wire key 6). Truncates b to them; returns how many."""
    first = b.ts(0) < CLOCK_FLOOR_MS if k else False
    for i in range(1, k):
        if (b.ts(i) < CLOCK_FLOOR_MS) != first:
            b.n = i
            return i
    return k


def _with_rung(entries, level, set_s, clear_s):
    """A rule's persisted thresholds ([level, set, clear] lists) with `level`'s replaced."""
    return [x for x in entries if x[0] != level] + [[level, set_s, clear_s]]
