# The node's MQTT client against malformed packets from a broker (or something pretending to be one),
# under real MicroPython. The packets arrive through a byte stream in memory: the bytes are exactly
# what a socket would deliver, and the client code reading them is the firmware's own.
from check import eq, raises, run, true
from simboard import SimClock
from yujing_node.mqtt import Client, MQTTError


class Stream:
    """A socket's read side fed from bytes; writes are kept (PUBACKs the client sends back)."""

    def __init__(self, data):
        self.data = bytes(data)
        self.pos = 0
        self.sent = bytearray()

    def readinto(self, buf):
        if self.pos >= len(self.data):
            return None  # nothing more arrives: a timeout
        n = min(len(buf), len(self.data) - self.pos)
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def write(self, buf):
        self.sent.extend(buf)
        return len(buf)

    def settimeout(self, t):
        pass

    def close(self):
        pass


def client(data):
    c = Client(b"node-1", SimClock(), rx_bytes=256)
    c.sock = Stream(data)
    got = []
    c.on_message = lambda topic, payload: got.append((topic, bytes(payload)))
    return c, got


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def publish(topic, payload, qos=1, pid=7, tlen=None, flags=None):
    body = bytearray()
    t = len(topic) if tlen is None else tlen
    body += bytes([t >> 8, t & 0xFF]) + topic
    if qos:
        body += bytes([pid >> 8, pid & 0xFF])
    body += payload
    first = 0x30 | (qos << 1) if flags is None else flags
    return bytes([first]) + varint(len(body)) + body


def fails(data, what):
    c, got = client(data)
    e = raises(MQTTError, c.poll)
    true(what in str(e), "%r not in %r" % (what, str(e)))
    eq(got, [], "nothing delivered")


def test_a_good_publish_is_delivered_and_acknowledged():
    c, got = client(publish(b"yujing/v1/s/n/cmd", b"\x01\x02", pid=0x1234))
    c.poll()
    eq(got, [(b"yujing/v1/s/n/cmd", b"\x01\x02")])
    eq(bytes(c.sock.sent), b"\x40\x02\x12\x34")


def test_topic_longer_than_the_packet():
    fails(publish(b"abc", b"", qos=0, tlen=200), "topic of 200 bytes")


def test_publish_too_short_for_its_topic_length():
    fails(b"\x30\x01\x00", "malformed PUBLISH: 1 bytes")


def test_qos1_without_room_for_a_packet_id():
    fails(b"\x32\x03\x00\x01t", "malformed PUBLISH: topic of 1 bytes in a 3-byte packet")


def test_packet_id_zero():
    fails(publish(b"t", b"x", pid=0), "packet id 0")


def test_non_utf8_topic():
    fails(publish(b"\xff\xfe", b"x"), "not UTF-8")


def test_wildcards_and_nul_in_a_topic():
    for topic in (b"a/+/b", b"a/#", b"a\x00b"):
        fails(publish(topic, b"x"), "wildcard or NUL")


def test_qos_3_and_qos_2():
    fails(publish(b"t", b"x", flags=0x36), "QoS 3")
    fails(publish(b"t", b"x", flags=0x34), "QoS 2")


def test_malformed_acks_and_pings():
    fails(b"\x40\x03\x00\x01\x00", "malformed PUBACK")
    fails(b"\x90\x02\x00\x01", "malformed SUBACK")
    fails(b"\xd0\x01\x00", "malformed PINGRESP")


def test_packets_a_broker_never_sends():
    fails(b"\x10\x00", "unexpected packet type 0x10")
    fails(b"\x82\x00", "unexpected packet type 0x82")


def test_remaining_length_over_four_bytes():
    fails(b"\x30\xff\xff\xff\xff\x01", "malformed remaining length")


def test_a_packet_too_large_to_hold_is_dropped_and_the_next_one_read():
    big = publish(b"t", b"x" * 1000, qos=0)
    c, got = client(big + publish(b"ok", b"1", pid=3))
    c.poll()
    eq(got, [(b"ok", b"1")])


run(globals())
