"""A small MQTT 3.1.1 client: CONNECT with a will and credentials, PUBLISH at QoS 0/1 (waiting for
PUBACK), SUBSCRIBE, PINGREQ keep-alive, DISCONNECT. All MQTT lives in this module, so a board
can swap in umqtt.simple behind the same five calls.

The socket is passed in (the board layer opens it). It needs write(buf) (writes everything or
raises OSError), readinto(buf) (bytes read; 0 at EOF; None or OSError EAGAIN/ETIMEDOUT when
nothing arrived in time), settimeout(seconds) and close(): a MicroPython socket has them.
Topics and payloads are bytes; the packet header and the receive buffer are allocated once.
Errors (broker refusal, timeouts, a closed connection) raise MQTTError; the caller reconnects.
Every inbound packet is bounds-checked before it is used (remaining length against what the packet
type needs, topic length against the packet, packet ids non-zero, topics valid UTF-8 without wildcards):
a malformed one is a protocol error (MQTTError), never an IndexError or a read of stale buffer bytes.
"""

import errno

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_CONNECT = const(0x10)
_CONNACK = const(0x20)
_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_SUBSCRIBE = const(0x82)
_SUBACK = const(0x90)
_PINGREQ = const(0xC0)
_PINGRESP = const(0xD0)
_DISCONNECT = const(0xE0)
_IDLE = (None, errno.EAGAIN, errno.ETIMEDOUT)

CONNACK_REASONS = (
    "accepted",
    "bad protocol version",
    "client id rejected",
    "server unavailable",
    "bad user name or password",
    "not authorised",
)


class MQTTError(Exception):
    pass


def _put_str(buf, i, s):
    buf[i] = len(s) >> 8
    buf[i + 1] = len(s) & 0xFF
    buf[i + 2 : i + 2 + len(s)] = s
    return i + 2 + len(s)


class Client:
    def __init__(self, client_id, clock, keepalive_s=60, user=None, password=None, timeout_ms=5000, rx_bytes=256):
        self.client_id = client_id
        self.clock = clock
        self.keepalive_ms = keepalive_s * 1000
        self.keepalive_s = keepalive_s
        self.user = user
        self.password = password
        self.timeout_ms = timeout_ms
        self.will = None
        self.sock = None
        self.on_message = None  # callback(topic: bytes, payload: memoryview)
        self.pid = 0
        self.hdr = bytearray(5 + 2 + 256 + 2)  # fixed header, topic, packet id
        self.rx = bytearray(rx_bytes)
        self.rxv = memoryview(self.rx)
        self._b1 = bytearray(1)
        self._acked = 0
        self._suback = 0
        self._last_tx = 0
        self._ping_at = None

    # ------------------------------------------------------------ low level

    def _write(self, buf):
        try:
            self.sock.write(buf)
        except OSError as e:
            raise MQTTError("send failed: %s" % e) from e
        self._last_tx = self.clock.ticks_ms()

    def _fixed(self, ptype, remaining):
        """Fixed header into hdr; returns its length."""
        hdr = self.hdr
        hdr[0] = ptype
        i = 1
        while True:
            b = remaining & 0x7F
            remaining >>= 7
            hdr[i] = b | 0x80 if remaining else b
            i += 1
            if not remaining:
                return i

    def _recv(self, mv):
        """Fill mv completely within the timeout, or raise MQTTError."""
        got = 0
        while got < len(mv):
            try:
                n = self.sock.readinto(mv[got:])
            except OSError as e:
                if e.args and e.args[0] in _IDLE:
                    n = None
                else:
                    raise MQTTError("receive failed: %s" % e) from e
            if n is None:
                raise MQTTError("timed out waiting for the broker")
            if n == 0:
                raise MQTTError("connection closed by the broker")
            got += n

    def _read_packet(self, wait):
        """Read one packet into rx. Returns (first byte, length) or None when none is waiting.

        wait=False only checks whether a packet has started; once one has, the rest is read
        with the normal timeout, so the stream never desynchronises."""
        sock = self.sock
        sock.settimeout(self.timeout_ms / 1000 if wait else 0)
        try:
            n = sock.readinto(self._b1)
        except OSError as e:
            if not (e.args and e.args[0] in _IDLE):
                raise MQTTError("receive failed: %s" % e) from e
            n = None
        if n is None:
            if wait:
                raise MQTTError("timed out waiting for the broker")
            return None
        if n == 0:
            raise MQTTError("connection closed by the broker")
        sock.settimeout(self.timeout_ms / 1000)
        ptype = self._b1[0]
        length = 0
        shift = 0
        while True:
            self._recv(memoryview(self._b1))
            length |= (self._b1[0] & 0x7F) << shift
            shift += 7
            if not self._b1[0] & 0x80:
                break
            if shift > 21:
                raise MQTTError("malformed remaining length")
        if length <= len(self.rx):
            self._recv(self.rxv[:length])
            return ptype, length
        left = length  # too large for rx (a command we cannot hold): read and drop it
        while left:
            k = min(left, len(self.rx))
            self._recv(self.rxv[:k])
            left -= k
        return ptype, -1

    def _dispatch(self, ptype, n):
        t = ptype & 0xF0
        rx = self.rx
        if t == _PUBLISH:
            if n < 0:
                return t  # too large to hold: read and dropped
            qos = (ptype >> 1) & 3
            if qos == 3:
                raise MQTTError("malformed PUBLISH: QoS 3")
            if qos == 2:
                raise MQTTError("QoS 2 PUBLISH: this client subscribes at QoS 0 or 1 only")
            if n < 2:
                raise MQTTError("malformed PUBLISH: %d bytes" % n)
            tlen = rx[0] << 8 | rx[1]
            i = 2 + tlen
            if tlen == 0 or i + (2 if qos else 0) > n:
                raise MQTTError("malformed PUBLISH: topic of %d bytes in a %d-byte packet" % (tlen, n))
            topic = bytes(rx[2:i])
            try:
                topic.decode()
            except UnicodeError:
                raise MQTTError("malformed PUBLISH: topic is not UTF-8") from None
            if b"+" in topic or b"#" in topic or b"\0" in topic:
                raise MQTTError("malformed PUBLISH: wildcard or NUL in the topic")
            pid = 0
            if qos:
                pid = rx[i] << 8 | rx[i + 1]
                i += 2
                if pid == 0:
                    raise MQTTError("malformed PUBLISH: packet id 0")
            if self.on_message:
                self.on_message(topic, self.rxv[i:n])
            if qos == 1:
                hdr = self.hdr
                hdr[0] = _PUBACK
                hdr[1] = 2
                hdr[2] = pid >> 8
                hdr[3] = pid & 0xFF
                self._write(memoryview(hdr)[:4])
        elif t == _PUBACK:
            if n != 2 or ptype != _PUBACK:
                raise MQTTError("malformed PUBACK")
            self._acked = rx[0] << 8 | rx[1]
        elif t == _SUBACK:
            if n < 3 or ptype != _SUBACK:
                raise MQTTError("malformed SUBACK")
            self._suback = rx[0] << 8 | rx[1]
            if rx[2] == 0x80:
                raise MQTTError("subscription refused")
        elif t == _PINGRESP:
            if n != 0 or ptype != _PINGRESP:
                raise MQTTError("malformed PINGRESP")
            self._ping_at = None
        elif t != _CONNACK:
            raise MQTTError("unexpected packet type 0x%02x from the broker" % ptype)
        return t

    def _next_pid(self):
        self.pid = self.pid % 65535 + 1
        return self.pid

    def _wait(self, what, pid):
        """Process packets until `what` with packet id `pid` arrives, within the timeout."""
        clock = self.clock
        deadline = clock.ticks_add(clock.ticks_ms(), self.timeout_ms)
        while True:
            p = self._read_packet(True)
            t = self._dispatch(*p)
            if t == what and (self._acked if what == _PUBACK else self._suback) == pid:
                return
            if clock.ticks_diff(deadline, clock.ticks_ms()) <= 0:
                raise MQTTError("no acknowledgement for packet %d" % pid)

    # ------------------------------------------------------------ API

    def set_will(self, topic, payload, qos=1, retain=True):
        self.will = (topic, payload, qos, retain)

    def connect(self, sock, clean_session=True):
        """Send CONNECT on an open socket and wait for CONNACK; returns the session-present flag."""
        self.sock = sock
        self._ping_at = None
        flags = 0x02 if clean_session else 0
        size = 10 + 2 + len(self.client_id)
        if self.will:
            topic, payload, qos, retain = self.will
            flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
            size += 4 + len(topic) + len(payload)
        if self.user is not None:
            flags |= 0x80
            size += 2 + len(self.user)
        if self.password is not None:
            flags |= 0x40
            size += 2 + len(self.password)
        pkt = bytearray(size)
        i = _put_str(pkt, 0, b"MQTT")
        pkt[i] = 4
        pkt[i + 1] = flags
        pkt[i + 2] = self.keepalive_s >> 8
        pkt[i + 3] = self.keepalive_s & 0xFF
        i = _put_str(pkt, i + 4, self.client_id)
        if self.will:
            i = _put_str(pkt, i, self.will[0])
            i = _put_str(pkt, i, self.will[1])
        if self.user is not None:
            i = _put_str(pkt, i, self.user)
        if self.password is not None:
            i = _put_str(pkt, i, self.password)
        try:
            self._write(memoryview(self.hdr)[: self._fixed(_CONNECT, size)])
            self._write(pkt)
            p = self._read_packet(True)
        except MQTTError:
            self.close()
            raise
        if p[0] != _CONNACK or p[1] != 2:
            self.close()
            raise MQTTError("expected CONNACK, got packet type 0x%02x" % p[0])
        rc = self.rx[1]
        if rc:
            self.close()
            raise MQTTError("broker refused the connection: %s" % (CONNACK_REASONS[rc] if rc < 6 else rc))
        return bool(self.rx[0] & 1)

    def publish(self, topic, payload, qos=0, retain=False):
        """Send one message; at QoS 1, return only once the broker's PUBACK has arrived."""
        if self.sock is None:
            raise MQTTError("not connected")
        if len(topic) > 256:
            raise MQTTError("topic longer than 256 bytes")
        pid = self._next_pid() if qos else 0
        size = 2 + len(topic) + (2 if qos else 0) + len(payload)
        i = self._fixed(_PUBLISH | (qos << 1) | (1 if retain else 0), size)
        i = _put_str(self.hdr, i, topic)
        if qos:
            self.hdr[i] = pid >> 8
            self.hdr[i + 1] = pid & 0xFF
            i += 2
        self._write(memoryview(self.hdr)[:i])
        self._write(payload)
        if qos:
            self._wait(_PUBACK, pid)
        return pid

    def subscribe(self, topic, qos=0):
        pid = self._next_pid()
        i = self._fixed(_SUBSCRIBE, 2 + 2 + len(topic) + 1)
        self.hdr[i] = pid >> 8
        self.hdr[i + 1] = pid & 0xFF
        i = _put_str(self.hdr, i + 2, topic)
        self.hdr[i] = qos
        self._write(memoryview(self.hdr)[: i + 1])
        self._wait(_SUBACK, pid)

    def poll(self):
        """Handle every packet already waiting (incoming commands, PINGRESP) without blocking."""
        while self.sock is not None:
            p = self._read_packet(False)
            if p is None:
                return
            self._dispatch(*p)

    def ping_if_due(self):
        """Keep-alive: PINGREQ after half the keep-alive of silence; MQTTError if the last one
        was never answered within the keep-alive."""
        if not self.keepalive_ms or self.sock is None:
            return
        clock = self.clock
        now = clock.ticks_ms()
        if self._ping_at is not None:
            if clock.ticks_diff(now, self._ping_at) >= self.keepalive_ms:
                raise MQTTError("no PINGRESP within the keep-alive")
            return
        if clock.ticks_diff(now, self._last_tx) >= self.keepalive_ms // 2:
            self.hdr[0] = _PINGREQ
            self.hdr[1] = 0
            self._write(memoryview(self.hdr)[:2])
            self._ping_at = now

    def disconnect(self):
        """Clean end: the broker discards the will."""
        if self.sock is not None:
            try:
                self.hdr[0] = _DISCONNECT
                self.hdr[1] = 0
                self._write(memoryview(self.hdr)[:2])
            except MQTTError:
                pass
        self.close()

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
