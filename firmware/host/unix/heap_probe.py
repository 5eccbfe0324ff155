"""Where the node's heap goes, under the unix port (bench/node_heap_tls.py runs it):

    micropython -X heapsize=N firmware/host/unix/heap_probe.py FLASH_DIR SIM_DIR

Prints `HEAP <stage> <bytes allocated after a collect> <peak so far>` after the firmware is imported (its
code), after the Node is built (its buffers), after the first connect (TLS handshake, CONNECT, birth) and
after a few cycles, plus `TLS_MS <ms>` for the connect (socket, TLS handshake, MQTT CONNECT/CONNACK, birth).
"""

import gc
import sys
import time

import board
import micropython

board.install(sys.argv[2])
board.mount_flash(sys.argv[1])
gc.collect()
base = gc.mem_alloc()


def stage(name):
    gc.collect()
    print("HEAP %s %d %d" % (name, gc.mem_alloc() - base, micropython.mem_peak()))


from yujing_node import app, config
from yujing_node import node as nodemod
from yujing_node.hw import Board

stage("imported")
b = Board()
cfg, sec = config.load(config.CONFIG_FILE, config.SECRETS_FILE)
n = nodemod.Node(cfg, sec, b)
n.boot()
stage("node")
n.net_until = time.ticks_add(time.ticks_ms(), 30000)  # a cycle sets it; this connect comes before any cycle
t = time.ticks_ms()
ok = n.connect(n.clock.epoch_ms())
print("TLS_MS %d %s" % (time.ticks_diff(time.ticks_ms(), t), ok))
stage("connected")
for _ in range(3):
    n.cycle()
stage("cycles")
n.client.disconnect()
del app
