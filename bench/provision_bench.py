"""`yujing provision install` timings on simulated boards (provisioning.simboard: the MicroPython unix port behind a
pty, driven by real mpremote), with a real mosquitto running the generated broker files.

Prints: the time to provision one node and ten nodes at once (pre-flight, identity, config and secrets, firmware
as .mpy, reset, online check), and the bytes copied by a rerun with nothing changed — with the journal (the node
is skipped whole) and with --fresh (every step redone; the copies are skipped by the SHA-256 on the board).

The online check waits for a stand-in node (tests/test_provision_install.py: CPython publishing a genuine birth
and data at each reset with the credentials found on the board's flash), since the firmware does not run under
the unix port here: its time is the MQTT round trip, not a real node's boot and Wi-Fi join. A pty copies much
faster than a board's 115200-baud UART, and every board shares this machine's cores: on a 2-core machine ten
simulated boards compete for CPU (the unix port, mpremote and mpy-cross all run here), which a laptop with ten
USB boards would not.

    .venv/bin/python bench/provision_bench.py [--boards 10]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provisioning.runner import NodePlan, Plan, PlainProgress, Runner, VerifyPlan  # noqa: E402
from provisioning.simboard import SimBoard  # noqa: E402
from provisioning.workflow import Site  # noqa: E402
from tests.test_provision_install import (  # noqa: E402
    FAKE_RESET, FLASH, StandInNodes, by_id_name, config, firmware_snapshot)
from tests.test_provision_verify import PREFIX, SITE, start_site_broker  # noqa: E402


def provision(work: Path, count: int) -> tuple[float, float, int, int]:
    """(seconds for the first run, for a rerun with --fresh, bytes copied by that rerun, bytes by a journal rerun)."""
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
            b = SimBoard(work / f"flash-{i}", flash_size=FLASH, boot_code=FAKE_RESET).start()
            boards.append(b)
            (by_id / by_id_name(serial)).symlink_to(b.port)
            (work / f"{node_id}.json").write_bytes(config(node_id))
            nodes.append(NodePlan(node_id, f"bench {i}", work / f"{node_id}.json", serial=serial))
        plan = Plan(tuple(nodes), firmware_snapshot(work), VerifyPlan("127.0.0.1", broker.tls_port, True, 60.0),
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

        with StandInNodes(boards, broker):
            first, copied = run(fresh=False)
            journal_s, journal_bytes = run(fresh=False)
            fresh_s, fresh_bytes = run(fresh=True)
        print(f"  first run: {first:.1f} s, {copied} bytes copied ({copied // count} per board)")
        print(f"  rerun, nothing changed, journal: {journal_s:.2f} s, {journal_bytes} bytes copied")
        print(f"  rerun, nothing changed, --fresh (every step redone, copies skipped by hash): {fresh_s:.1f} s, "
              f"{fresh_bytes} bytes copied")
        return first, fresh_s, fresh_bytes, journal_bytes
    finally:
        for b in boards:
            b.stop()
        broker.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--boards", type=int, default=10, help="boards for the parallel run (default: %(default)s)")
    args = p.parse_args()
    print(f"{os.cpu_count()} CPU cores on this machine; simulated boards, pty serial lines, stand-in nodes")
    for count in (1, args.boards):
        print(f"{count} board{'s' if count > 1 else ''}:")
        with tempfile.TemporaryDirectory(prefix="yujing-provision-bench-") as d:
            provision(Path(d), count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
