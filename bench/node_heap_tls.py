"""Node firmware under the MicroPython unix port with TLS: the smallest heap that connects and publishes, the
firmware's .mpy size, the time to connect with TLS, and what Ed25519 would cost on the node.

    .venv/bin/python bench/node_heap_tls.py

- heap: bisection over `-X heapsize` (1 KB steps) of a node (.mpy firmware, one ADC point, a latched rule,
  commands and alarm events on) that must connect over TLS with its client certificate and have a data
  message acknowledged by mosquitto; the same without TLS for the difference. The unix port is 64-bit
  (8-byte words and pointers): the same objects take up to twice an ESP32's 32-bit heap. mbedTLS allocates
  through MicroPython's tracked allocator here, so its handshake buffers count inside the cap.
- Ed25519: one pure-Python scalar multiplication (extended coordinates, 255 doublings and additions on
  Python big integers) under the capped heap; a verify needs two (sB and kA), plus SHA-512, which this
  MicroPython's hashlib does not have.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.node_commands import new_node_key
from provisioning.simboard import micropython_executable
from tests.conftest import start_mosquitto
from tests.firmware_helpers import compile_firmware
from tests.unix_node import (
    PREFIX,
    SITE,
    UNIX_HOST,
    UnixNode,
    make_pki,
    node_config,
    platform_client,
    start_tls_broker,
    take,
)

_ED25519 = r"""
import gc, time
p = 2**255 - 19
d = -121665 * pow(121666, p - 2, p) % p
def add(P, Q):
    x1, y1, z1, t1 = P
    x2, y2, z2, t2 = Q
    a = (y1 - x1) * (y2 - x2) % p
    b = (y1 + x1) * (y2 + x2) % p
    c = 2 * t1 * t2 * d % p
    dd = 2 * z1 * z2 % p
    e, f, g, h = b - a, dd - c, dd + c, b + a
    return (e * f % p, g * h % p, f * g % p, e * h % p)
def mul(s, P):
    Q = (0, 1, 1, 0)
    while s:
        if s & 1:
            Q = add(Q, P)
        P = add(P, P)
        s >>= 1
    return Q
gy = 4 * pow(5, p - 2, p) % p
x = 15112221349535400772501151409588531511454012693041857206046113283949847762202
B = (x, gy, 1, x * gy % p)
s = 0x1f2e3d4c5b6a79881726354453627180f1e2d3c4b5a6978877665544332211
gc.collect()
base = gc.mem_alloc()
t = time.ticks_ms()
mul(s, B)
print("ED", time.ticks_diff(time.ticks_ms(), t), gc.mem_alloc() - base)
"""


def heap_ok(kb: int, work: Path, pki, port: int, mpy: Path,  # type: ignore[no-untyped-def]
            tls: bool) -> tuple[bool, float | None]:
    """Whether a node with a `kb` KB heap connects (to the TLS or the plain broker on `port`) and gets a data
    message acknowledged; the connect time."""
    name = f"h{kb}{'t' if tls else 'p'}"
    d = work / name
    shutil.rmtree(d, ignore_errors=True)
    cfg = node_config("n1", port, mqtt={"commands": True, "alarm_events": True, "tls": tls})
    node = UnixNode(d, mpy, cfg, {"command_key": new_node_key().hex()}, pki.node_files("n1") if tls else {},
                    heapsize=f"{kb}K")
    sub = platform_client(pki if tls else None, port, f"{PREFIX}/{SITE}/n1/data")
    t0 = time.monotonic()
    node.start()
    try:
        line = node.wait_for("yujing: connect", 8)
        if "connected" not in line:
            return False, None
        took = time.monotonic() - t0
        take(sub, 2, timeout=4)  # two cycles' data acknowledged after the connect: it keeps working
        return not any("memory" in x for x in node.stop_and_drain()), took
    except AssertionError:
        return False, None
    finally:
        node.stop()
        sub.loop_stop()


def bisect(lo: int, hi: int, ok) -> int:  # type: ignore[no-untyped-def]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="yujing-heap-") as tmp:
        work = Path(tmp)
        mpy = work / "mpy"
        sizes = compile_firmware(mpy)
        total = sum(sizes.values())
        print(f"firmware .mpy (mpy-cross, {len(sizes)} files): {total} bytes ({total / 1024:.1f} KB)")
        pki = make_pki(work, ("n1",))
        broker = start_tls_broker(pki, work, ("n1",))
        plain = start_mosquitto(work)
        port = plain.port
        try:
            times: list[float] = []

            def tls_ok(kb: int) -> bool:
                ok, took = heap_ok(kb, work, pki, broker.port, mpy, True)
                if ok and took is not None:
                    times.append(took)
                return ok

            tls_min = bisect(64, 400, tls_ok)
            print(f"smallest -X heapsize that connects with TLS and publishes: {tls_min} KB (64-bit unix port)")
            plain_min = bisect(64, 400, lambda kb: heap_ok(kb, work, pki, port, mpy, False)[0])
            print(f"the same without TLS: {plain_min} KB; TLS needs {tls_min - plain_min} KB more heap here")
            big = [heap_ok(400, work, pki, broker.port, mpy, True)[1] for _ in range(3)]
            big = [t for t in big if t is not None]
            if big:
                print(f"start to 'connected' with TLS (process start, boot, TLS handshake with client certificate, "
                      f"CONNECT, birth, alarm state; 400 KB heap): median {statistics.median(big) * 1000:.0f} ms")
            for tls in (True, False):
                d = work / f"probe-{tls}"
                cfg = node_config("n1", broker.port if tls else port, mqtt={"commands": True, "alarm_events": True,
                                                                            "tls": tls})
                node = UnixNode(d, mpy, cfg, {"command_key": new_node_key().hex()}, pki.node_files("n1") if tls else {})
                probe = [micropython_executable(), "-X", "heapsize=400K", str(UNIX_HOST / "heap_probe.py"),
                         str(node.flash), str(node.sim)]
                proc = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=False)
                lines = proc.stdout.splitlines()
                stages = {ln.split()[1]: int(ln.split()[2]) for ln in lines if ln.startswith("HEAP ")}
                ms = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("TLS_MS ")]
                what = "TLS" if tls else "plain"
                print(f"heap after gc ({what}): firmware code {stages.get('imported', 0) / 1024:.1f} KB, "
                      f"+ node objects {(stages.get('node', 0) - stages.get('imported', 0)) / 1024:.1f} KB, "
                      f"+ connected {(stages.get('connected', 0) - stages.get('node', 0)) / 1024:.1f} KB, "
                      f"after 3 cycles {stages.get('cycles', 0) / 1024:.1f} KB; connect (socket"
                      f"{', TLS handshake' if tls else ''}, CONNECT, birth, alarm state) {ms[0] if ms else '?'} ms")
        finally:
            broker.stop()
            plain.stop()
        for heap in ("100K", "200K"):
            proc = subprocess.run([micropython_executable(), "-X", f"heapsize={heap}", "-c", _ED25519],
                                  capture_output=True, text=True, timeout=120, check=False)
            out = proc.stdout.strip().split()
            if proc.returncode == 0 and out and out[0] == "ED":
                print(f"Ed25519, one pure-Python 253-bit scalar multiplication ({heap} heap, this host): {out[1]} ms, "
                      f"{int(out[2]) / 1024:.0f} KB of big-integer garbage made meanwhile (collected as it goes); a "
                      f"verify needs two (sB, kA) plus SHA-512, which this MicroPython's hashlib lacks")
            else:
                print(f"Ed25519 scalar multiplication under a {heap} heap failed: {(proc.stdout + proc.stderr)[-200:]}")


if __name__ == "__main__":
    main()
