# The node under power faults (hil_tests/test_power_faults.py), for the MicroPython unix port:
#
#     micropython firmware/host/power_node.py FIRMWARE_DIR FLASH_DIR RUN_JSON [NODE_FIRMWARE_DIR]
#
# Runs yujing_node.node.Node (unchanged) on the simulated board of firmware/host/sim, its flash the real folder
# FLASH_DIR, until it is killed (or for RUN_JSON's "cycles"). RTC memory lives in this process: a kill is a power
# cut for the node. What the test needs to judge the run goes to stdout, one line per event, each written before
# the next step (the unix port's stdout is unbuffered):
#
#     BOOT <session> <seq> <dropped>          after Node.boot()
#     S <ts> <crack raw>                      a cycle sampled (every point's reading has this ts)
#     A <ts>                                  the cycle's readings were appended to the ring (the network was away)
#     Y                                       ring.sync() returned: what was appended is on flash
#     w <slot> <bseq> <ts> <ts> ...           a ring slot is about to be rewritten with these cycles' readings
#     W <slot> <bseq>                         ... and was
#     PUB <topic> <hex> <qos> <retain>        the broker received a PUBLISH (before its PUBACK is sent)
#     TORN <file> <written> <of>              the trap cut this write short; the node now waits to be killed
#
# RUN_JSON: {"start_ms", "cycles" (null: forever), "link_seed" (< 0: always up), "torn": null or
# {"what": "slot"|"state", "k", "cut"}}: the k-th write of a ring slot or of state.json.tmp stops after `cut` of
# its bytes.
# The link: a seeded schedule of up and down runs of cycles (the broker drops the connection when it goes down).
import binascii
import json
import struct
import sys
import time

sys.path.append(sys.argv[4] if len(sys.argv) > 4 else sys.argv[1])  # the firmware under test (yujing_node)
sys.path.append(sys.argv[1] + "/host/sim")

import fixtures
import yujing_node.ring as ringmod
import yujing_node.state as statemod
from simboard import SimBroker, SimClock

FLASH = sys.argv[2]
RUN = json.loads(sys.argv[3])
PERIOD = 10000
_real_open = open


class Printed:
    """The broker's record of PUBLISHes: printed as they arrive."""

    def append(self, item):
        topic, payload, qos, retain = item
        print("PUB", topic.decode(), binascii.hexlify(payload).decode(), qos, int(retain))


class Torn:
    """A file whose first write reaches the flash only in part; then the node waits for the kill."""

    def __init__(self, f, name, cut):
        self.f = f
        self.name = name
        self.cut = cut

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        n = int(len(data) * self.cut)
        self.f.write(data[:n])
        self.f.close()
        print("TORN", self.name, n, len(data))
        while True:
            time.sleep(1)


def trap(module, what, k, cut):
    count = [0]

    def opened(path, mode="r"):
        f = _real_open(path, mode)
        # state.py also writes the node's /alarms.json and /commands.json: only state.json.tmp counts
        if "w" in mode and (what == "slot" or path.endswith("state.json.tmp")):
            count[0] += 1
            if count[0] == k:
                return Torn(f, path[len(FLASH) :], cut)
        return f

    module.open = opened


class LinkClock(SimClock):
    """Virtual time; the link follows a seeded schedule of up and down runs of cycles."""

    def __init__(self, start_ms, seed):
        SimClock.__init__(self, start_ms)
        self.start = start_ms
        self.plan = []  # empty (seed < 0): the link is always up
        x = seed or 1
        up = True
        while seed >= 0 and len(self.plan) < 4000:
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            n = 5 + x % 16 if up else 2 + x % 11  # up 5-20 cycles (drains the ring), down 2-12 (fills at most 12)
            self.plan.extend([up] * n)
            up = not up
        self.board = None

    def sleep_ms(self, ms):
        SimClock.sleep_ms(self, ms)
        b = self.board
        if b is None:
            return
        i = (self.now - self.start) // PERIOD
        up = self.plan[i] if i < len(self.plan) else True
        if up != b.net_ok:
            b.net_ok = up
            if not up:
                b.broker.drop()


def main():
    torn = RUN.get("torn")
    if torn:
        trap(ringmod if torn["what"] == "slot" else statemod, torn["what"], torn["k"], torn["cut"])
    broker = SimBroker()
    broker.published = Printed()
    clock = LinkClock(RUN["start_ms"], RUN.get("link_seed", 0))
    board = fixtures.board(root=FLASH, broker=broker, clock=clock)
    node = fixtures.make_node(board)
    clock.board = board
    ring = node.ring

    boot = node.boot

    def booted():
        cause = boot()
        st = node.state
        print("BOOT", st.session, st.seq, ring.dropped)
        node.boot = lambda: cause  # Node.run() boots; it has been done
        return cause

    evaluate = node.alarms.evaluate

    def sampled(b):
        raw = board.adc(34).value
        print("S", b.ts(0), raw)
        return evaluate(b)

    node.alarms.evaluate = sampled

    append_batch = ring.append_batch

    def appended(b):
        append_batch(b)
        print("A", b.ts(0))

    ring.append_batch = appended
    sync = ring.sync

    def synced():
        sync()
        print("Y")

    ring.sync = synced
    write_stage = ring._write_stage

    def writing():
        slot = ring.head % ring.nblocks
        stamps = []
        for i in range(ring.count):
            t = struct.unpack_from("<Q", ring.stage, 12 + i * 20)[0]
            if not stamps or stamps[-1] != t:
                stamps.append(t)
        print("w", slot, ring.head, " ".join(str(t) for t in stamps))
        write_stage()
        print("W", slot, ring.head)

    ring._write_stage = writing

    def cycling():
        # a new ADC value every cycle: a delivered value says which cycle it came from
        board.adc(34).value = 1000 + ((board.clock.now - RUN["start_ms"]) // PERIOD) % 5000
        cycle()

    cycle = node.cycle
    node.cycle = cycling
    booted()
    node.run(RUN.get("cycles"))
    print("END", node.state.session, node.state.seq, ring.pending(), ring.dropped)


main()
