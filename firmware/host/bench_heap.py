# Heap and flash-wear figures for the node, measured under real MicroPython (run by run.mjs;
# bench/firmware_bench.py and tests/test_firmware_bench.py drive it). Prints one JSON line.
#
#   node run.mjs --mount ../yujing_node:/lib/yujing_node --mount sim:/lib bench_heap.py [CYCLES]
#
# Heap: the code of every firmware module once imported (from .py or .mpy, as mounted), the
# node's objects and preallocated buffers, and then one sample -> alarm -> encode -> publish
# cycle per host_step(). This port only collects garbage between steps (see run.mjs), so
# within a step nothing is freed: the bytes
# gc.mem_alloc() grows by during one cycle are everything the cycle allocates, an upper bound
# on the peak heap above the resident baseline. The resident heap after collection is sampled
# at every step to show it does not grow. The broker is a minimal ack-only stream with
# preallocated replies, so its own allocations do not count; the simulated I2C/UART devices
# still allocate a few small bytes objects per cycle (included in the figure).
#
# Flash: an hour of 10 s cycles with the broker unreachable; the ring counts its block writes.
import gc
import json
import sys

CYCLES = int(sys.argv[1]) if len(sys.argv) > 1 else 30


class AckStream:
    """Answers CONNECT, PUBLISH QoS 1, SUBSCRIBE and PINGREQ from preallocated buffers."""

    def __init__(self):
        self.out = bytearray(8)
        self.n = 0
        self.bytes_in = 0

    def open(self):
        self.n = 0
        return self

    def settimeout(self, t):
        pass

    def close(self):
        pass

    def write(self, buf):
        self.bytes_in += len(buf)
        t = buf[0] & 0xF0
        if t == 0x10 and len(buf) <= 5:  # CONNECT fixed header -> CONNACK
            self._reply(0x20, 0, 0)
        elif t == 0x30 and buf[0] & 0x06 and len(buf) > 4:  # PUBLISH header+topic+pid -> PUBACK
            self._reply(0x40, buf[len(buf) - 2], buf[len(buf) - 1])
        elif t == 0xC0:
            self.out[self.n] = 0xD0
            self.out[self.n + 1] = 0
            self.n += 2
        return len(buf)

    def _reply(self, ptype, a, b):
        o = self.out
        o[self.n] = ptype
        o[self.n + 1] = 2
        o[self.n + 2] = a
        o[self.n + 3] = b
        self.n += 4

    def readinto(self, buf):
        if not self.n:
            return None
        k = min(len(buf), self.n)
        buf[:k] = memoryview(self.out)[:k]
        self.out[: self.n - k] = memoryview(self.out)[k : self.n]
        self.n -= k
        return k


result = {"cycles": CYCLES, "cycle_alloc": [0] * CYCLES, "resident": [0] * CYCLES}
phase = 0
step = 0
ctx = {}


def host_step():
    """Called by run.mjs until it returns False; the port collects garbage between calls."""
    global phase, step
    if phase == 0:  # what the firmware's code costs once loaded
        result["heap_start"] = gc.mem_alloc()
        import yujing_node.app  # noqa: F401
        import yujing_node.node  # noqa: F401
        import yujing_node.sensors.adc  # noqa: F401
        import yujing_node.sensors.modbus  # noqa: F401
        import yujing_node.sensors.pulse  # noqa: F401
        import yujing_node.sensors.sht4x  # noqa: F401
    elif phase == 1:
        result["firmware_code_bytes"] = gc.mem_alloc() - result["heap_start"]
        result["heap_sim"] = gc.mem_alloc()
        import fixtures  # noqa: F401  (the simulated board: not part of a board's heap)
    elif phase == 2:
        import fixtures

        result["heap_sim"] = gc.mem_alloc() - result["heap_sim"]
        result["heap_before_node"] = gc.mem_alloc()
        stream = AckStream()
        board = fixtures.board(broker=stream)
        fixtures.wipe(board)
        fixtures.provision(board, fixtures.config())
        node = fixtures.make_node(board)
        node.boot()
        for _ in range(3):
            node.cycle()
        ctx.update(stream=stream, board=board, node=node)
        ctx["logs"] = [p.history for p in board.pins.values()] + [board.slaves[2].requests]
    elif phase == 3:
        result["node_objects_bytes"] = gc.mem_alloc() - result["heap_before_node"]
        return measure()
    phase += 1
    return True


def measure():
    """One measured cycle per call."""
    global step
    for log in ctx["logs"]:  # the simulated devices' own records are not firmware state
        log.clear()
    node = ctx["node"]
    result["resident"][step] = gc.mem_alloc()
    before = gc.mem_alloc()
    node.cycle()
    node.idle()
    result["cycle_alloc"][step] = gc.mem_alloc() - before
    gc.collect()  # performed by the port when this call returns
    step += 1
    if step < CYCLES:
        return True
    finish()
    return False


def finish():
    r = result["resident"]
    a = result["cycle_alloc"]
    result["resident_bytes"] = min(r)
    result["resident_growth"] = max(r[len(r) // 2 :]) - min(r[: len(r) // 2])
    result["peak_cycle_alloc"] = max(a)
    result["points"] = len(ctx["node"].catalogue)
    result["published_bytes"] = ctx["stream"].bytes_in
    result.update(offline_hour())
    print(json.dumps(result))


def offline_hour():
    import fixtures

    b = fixtures.board(broker=None)
    fixtures.wipe(b)
    b.net_ok = False
    fixtures.provision(b, fixtures.config(sample_period_s=10))
    n = fixtures.make_node(b)
    n.boot()
    cycles = 3600 // 10
    for _ in range(cycles):
        n.cycle()
        b.clock.sleep_ms(10000 - 10)
    block_sync = {
        "writes": n.ring.writes,
        "bytes": n.ring.bytes_written,
        "readings": cycles * len(n.catalogue),
        "cap": n.ring.cap,
        "block_bytes": n.ring.bsize,
    }
    b2 = fixtures.board(broker=None)
    fixtures.wipe(b2)
    b2.net_ok = False
    fixtures.provision(
        b2, fixtures.config(sample_period_s=10, buffer={"blocks": 8, "block_bytes": 512, "sync": "cycle"})
    )
    n2 = fixtures.make_node(b2)
    n2.boot()
    for _ in range(cycles):
        n2.cycle()
        b2.clock.sleep_ms(10000 - 10)
    n2.ring.close()
    return {
        "offline_hour": block_sync,
        "offline_hour_sync_cycle": {"writes": n2.ring.writes, "bytes": n2.ring.bytes_written},
    }
