# Fuzz the node's MQTT client with generated and mutated packets, inside real MicroPython.
# argv: inputs seed. Prints one JSON line: inputs, crashes (exceptions other than MQTTError), the first
# crash examples, the slowest input and the 99.9th percentile (µs), and the most heap one poll() allocated
# (gc.mem_alloc after minus before, sampled on every 64th input after a collection).
import gc
import json
import random
import sys
import time

from simboard import SimClock
from yujing_node.mqtt import Client, MQTTError

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
random.seed(int(sys.argv[2]) if len(sys.argv) > 2 else 1)


def rb(n):
    return bytes(random.getrandbits(8) for _ in range(n))


class Stream:
    def __init__(self, data):
        self.data = data
        self.pos = 0
        self.sent = 0

    def readinto(self, buf):
        if self.pos >= len(self.data):
            return None
        n = min(len(buf), len(self.data) - self.pos)
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def write(self, buf):
        self.sent += len(buf)
        return len(buf)

    def settimeout(self, t):
        pass

    def close(self):
        pass


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def valid():
    r = random.getrandbits(3)
    if r < 4:
        topic = b"yujing/v1/s/n/cmd" if random.getrandbits(1) else rb(random.getrandbits(5))
        qos = random.getrandbits(1)
        body = bytes([len(topic) >> 8, len(topic) & 0xFF]) + topic
        if qos:
            body += bytes([random.getrandbits(8), random.getrandbits(8) | 1])
        body += rb(random.getrandbits(6))
        return bytes([0x30 | (qos << 1) | random.getrandbits(1)]) + varint(len(body)) + body
    if r == 4:
        return b"\x40\x02" + rb(2)
    if r == 5:
        return b"\x90\x03" + rb(2) + bytes([random.choice((0, 1, 0x80))])
    if r == 6:
        return b"\xd0\x00"
    return bytes([random.getrandbits(8)]) + varint(random.getrandbits(9)) + rb(random.getrandbits(4))


def mutate(b):
    b = bytearray(b)
    for _ in range(1 + random.getrandbits(2)):
        if not b:
            b.extend(rb(4))
            continue
        i = random.getrandbits(16) % len(b)
        op = random.getrandbits(3)
        if op == 0:
            b[i] ^= 1 << random.getrandbits(3)
        elif op == 1:
            b = b[:i] + b[i + 1 :]
        elif op == 2:
            b = b[:i] + rb(1 + random.getrandbits(3)) + b[i:]
        elif op == 3:
            b = b[:i]
        else:
            b[i] = random.getrandbits(8)
    return bytes(b)


crashes, examples, slowest, slowest_input, peak = 0, [], 0, "", 0
times = []
slow = []  # the 20 slowest (µs, input): timed again at the end, so a GC pause is not "an input"


def one(data):
    cl.sock = Stream(data)
    try:
        cl.poll()
    except MQTTError:
        pass
clock = SimClock()
cl = Client(b"node-1", clock, rx_bytes=256)
cl.on_message = lambda topic, payload: None
for i in range(N):
    data = b"".join(valid() for _ in range(1 + random.getrandbits(2)))
    if random.getrandbits(2):
        data = mutate(data)
    cl.sock = Stream(data)
    sample = i % 64 == 0
    if sample:
        gc.collect()
        before = gc.mem_alloc()
    t = time.ticks_us()
    try:
        cl.poll()
    except MQTTError:
        pass
    except Exception as e:  # noqa: BLE001 - anything else is a crash
        crashes += 1
        if len(examples) < 3:
            examples.append("%s: %s <- %s" % (type(e).__name__, e, data[:40].hex()))
    dt = time.ticks_diff(time.ticks_us(), t)
    if sample:
        peak = max(peak, gc.mem_alloc() - before)
    times.append(dt)
    if len(slow) < 20 or dt > slow[-1][0]:
        slow.append((dt, data))
        slow.sort(key=lambda x: -x[0])
        del slow[20:]
worst = slow[0][0] if slow else 0
for _, data in slow:
    runs = []
    for _ in range(5):
        gc.collect()
        t = time.ticks_us()
        try:
            one(data)
        except Exception:  # noqa: BLE001 - counted above
            pass
        runs.append(time.ticks_diff(time.ticks_us(), t))
    runs.sort()
    if runs[2] >= slowest:
        slowest, slowest_input = runs[2], "%s (%d bytes)" % (data[:40].hex(), len(data))
times.sort()
print(json.dumps({"inputs": N, "crashes": crashes, "examples": examples, "slowest_us": slowest, "worst_us": worst,
                  "p999_us": times[min(len(times) - 1, len(times) * 999 // 1000)] if times else 0,
                  "slowest_input": slowest_input, "peak_heap": peak}))
