"""Power faults, seeded and replayable (issue 11, the power part): the plans, the gateway's trap launcher and the
node's MicroPython runner. The scenario itself is hil_tests/test_power_faults.py.

Gateway. `python -m hil_tests.powerfault gateway SITE JOURNAL [FAULT-JSON]` runs `yujing run SITE` (gateway.cli)
with two things added from outside, no hook in production code:

- a *trap*: `os` as gateway.spool and gateway.storefiles see it (their module attribute `os` is replaced) counts
  the calls of write, fsync, fdatasync, replace, rename, truncate and ftruncate made on the spool's behalf (a call
  counts when gateway/spool.py is on the stack) and sends the process SIGKILL at the K-th call of the chosen one:
  `before` it runs, `after` it returned, or `torn`: a write that hands the kernel only the first `cut` of its
  bytes and then dies. That puts a kill -9 inside a spool commit: between a record's write and the index, between
  a seq reservation's fsync and its rename, in the middle of a record;
- a *journal* (JSONL, O_APPEND, one os.write per line, so a kill cannot tear a line; it is the test's instrument
  and the kernel keeps it whatever happens to the process; every line has `t`, time.monotonic(), the test's clock
  too): `boot` with the pid, `stored` with every reading of a `Spool.store` call once that call has returned (what
  kill -9 can no longer take), `synced` with a segment's size after each fdatasync (what a power cut can no longer
  take), and `trap` just before the trap fires.

A kill -9 loses nothing the kernel has: the page cache survives the process. Two ways imitate a power cut here: the
torn write (a power cut in the middle of a write: a partial record at the end of the log), and cut_power(), run by
the test after a kill: every segment cut back to its last `synced` size, one never synced removed, the state's boot
id changed (the spool then knows the system went down with it). tests/test_power_cut.py does the same to the spool
alone.

Node. `firmware/host/power_node.py` runs the node firmware (yujing_node.node.Node, unchanged) under the MicroPython
unix port on the simulated board of firmware/host/sim, its flash a real folder. The in-memory broker prints every
PUBLISH to stdout before it acknowledges it (stdout is the platform); a seeded link schedule takes the network
away for runs of cycles so that the ring on flash fills and drains. The node prints what it sampled (`S`), what
went to the ring (`A`) and when the ring was synced to flash (`Y`). Faults: a kill -9 at a random wall time, a
slot or state file write that stops after a random byte (the node prints `TORN` and the test kills it), and a
slot file cut at a random byte after a kill (a brown-out during the write). RTC memory is in the process, so
every kill is a power cut for the node (RTC memory does not survive one either).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NODE_SCRIPT = ROOT / "firmware" / "host" / "power_node.py"

TRAPPED = ("write", "fsync", "fdatasync", "replace", "rename", "truncate", "ftruncate")


# ---------------------------------------------------------------- plans


@dataclass(frozen=True)
class GatewayFault:
    """One kill of the gateway. kind: `power.kill9` (`after_s` after it published), `power.kill9_spool` (at the
    `k`-th call of `fn` on the spool's path, `before` or `after` it), `power.torn_write` (the `k`-th write cut at
    `cut`), `power.cut` (as power.kill9, then the page cache is lost: see cut_power())."""

    kind: str
    after_s: float = 0.0  # power.kill9: seconds after the start; otherwise the latest the trap may take
    fn: str = ""
    k: int = 0
    mode: str = ""  # before | after | torn
    cut: float = 0.0  # torn: the share of the write's bytes that reaches the kernel

    def trap(self) -> dict[str, Any] | None:
        if self.kind in ("power.kill9", "power.cut"):
            return None
        return {"fn": self.fn, "k": self.k, "mode": self.mode, "cut": self.cut}


def gateway_plan(seed_: int, cycles: int = 8) -> list[GatewayFault]:
    """`cycles` kills, drawn from the seed alone, shuffled: at wall times, inside spool calls (write, fdatasync, the
    spool's state.json: fsync and replace), torn writes, and power cuts (a kill at a wall time, then the segments
    cut back to what fdatasync made durable, and a new boot id: what the card holds after the power came back)."""
    rng = random.Random(seed_)
    kinds = ["power.kill9", "power.kill9_spool", "power.torn_write", "power.cut"] * (cycles // 4 + 1)
    kinds = kinds[:cycles]
    rng.shuffle(kinds)
    plan = []
    for kind in kinds:
        if kind in ("power.kill9", "power.cut"):
            plan.append(GatewayFault(kind, after_s=round(rng.uniform(1.0, 3.0), 3)))
        elif kind == "power.kill9_spool":
            fn = rng.choice(["write", "write", "fdatasync", "fsync", "replace"])
            # write: several a second; fdatasync: one per power-cut window (1 s in the scenario); fsync and replace: the
            # spool's state.json (opening, a new session, a seq reservation: the first message of a session, then
            # every 64), two fsyncs (file, folder) per replace.
            # replace 1-3: the spool's opening, the new session, the reservation for the first data message.
            k = {"write": rng.randint(5, 30), "fdatasync": rng.randint(1, 4), "fsync": rng.randint(1, 6),
                 "replace": rng.randint(1, 3)}[fn]
            plan.append(GatewayFault(kind, after_s=20.0, fn=fn, k=k, mode=rng.choice(["before", "after"])))
        else:
            plan.append(GatewayFault(kind, after_s=20.0, fn="write", k=rng.randint(5, 30), mode="torn",
                                     cut=round(rng.uniform(0.05, 0.95), 3)))
    return plan


@dataclass(frozen=True)
class NodeFault:
    """One kill of the node. kind: `power.node_kill9` (at `after_s` of wall time; with `cut_slot`, the newest slot
    file is then cut at `cut` of its length), `power.node_torn_slot` / `power.node_torn_state` (the `k`-th write of
    a ring slot / of state.json.tmp stops after `cut` of its bytes, then the node is killed)."""

    kind: str
    after_s: float = 0.0
    k: int = 0
    cut: float = 0.0
    cut_slot: bool = False
    link_seed: int = 0  # the node's link schedule in this run


def node_plan(seed_: int, cycles: int = 9) -> list[NodeFault]:
    rng = random.Random(seed_ ^ 0x5EED)
    kinds = ["power.node_kill9", "power.node_torn_slot", "power.node_torn_state"] * (cycles // 3 + 1)
    kinds = kinds[:cycles]
    rng.shuffle(kinds)
    plan = []
    for kind in kinds:
        link = rng.randrange(1 << 30)
        if kind == "power.node_kill9":
            plan.append(NodeFault(kind, after_s=round(rng.uniform(0.05, 0.6), 3), cut_slot=rng.random() < 0.5,
                                  cut=round(rng.random(), 3), link_seed=link))
        elif kind == "power.node_torn_slot":
            plan.append(NodeFault(kind, after_s=10.0, k=rng.randint(1, 6), cut=round(rng.random(), 3), link_seed=link))
        else:
            plan.append(NodeFault(kind, after_s=10.0, k=rng.randint(1, 3), cut=round(rng.random(), 3), link_seed=link))
    return plan


def as_dict(fault: GatewayFault | NodeFault) -> dict[str, Any]:
    return {k: v for k, v in asdict(fault).items() if v not in ("", 0, 0.0, False)}


# ---------------------------------------------------------------- the gateway's launcher (runs in the child)


@dataclass
class _Journal:
    fd: int

    def put(self, event: str, **data: Any) -> None:
        line = {"e": event, "t": round(time.monotonic(), 4), **data}  # CLOCK_MONOTONIC: the test's clock too
        os.write(self.fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())


@dataclass
class _Trap:
    """`os` as the spool sees it: everything passes through to the real module; the trapped calls are counted
    when gateway/spool.py is on the stack (gateway.storefiles serves other callers too)."""

    journal: _Journal
    fn: str = ""
    k: int = 0
    mode: str = ""
    cut: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in TRAPPED:
            return real

        def trapped(*args: Any, **kwargs: Any) -> Any:
            if not _from_spool():
                return real(*args, **kwargs)
            n = self.calls[name] = self.calls.get(name, 0) + 1
            if name != self.fn or n != self.k:
                result = real(*args, **kwargs)
                if name == "fdatasync":  # what a power cut can no longer take: this segment up to here
                    path = os.readlink(f"/proc/self/fd/{args[0]}")
                    self.journal.put("synced", file=os.path.basename(path), size=os.fstat(args[0]).st_size)
                return result
            detail = {"fn": name, "k": n, "mode": self.mode, "calls": dict(self.calls)}
            if isinstance(args[0], int):  # which file: a segment, the state's temporary file …
                with contextlib.suppress(OSError):
                    detail["file"] = os.path.basename(os.readlink(f"/proc/self/fd/{args[0]}"))
            elif args:
                detail["file"] = os.path.basename(os.fspath(args[0]))
            if self.mode == "torn":
                fd, data = args[0], bytes(args[1])
                cut = max(1, min(len(data) - 1, int(len(data) * self.cut))) if len(data) > 1 else 0
                os.write(fd, data[:cut])
                self.journal.put("trap", **detail, bytes=len(data), written=cut)
            elif self.mode == "after":
                real(*args, **kwargs)
                self.journal.put("trap", **detail)
            else:
                self.journal.put("trap", **detail)
            os.kill(os.getpid(), signal.SIGKILL)
            raise AssertionError("SIGKILL did not kill")  # pragma: no cover

        return trapped


def _from_spool() -> bool:
    f = sys._getframe(2)
    for _ in range(10):
        if f is None:
            return False
        if f.f_code.co_filename.endswith(os.path.join("gateway", "spool.py")):
            return True
        f = f.f_back
    return False


def launch_gateway(site: str, journal_path: str, fault: dict[str, Any] | None) -> int:
    import gateway.spool
    import gateway.storefiles
    from gateway.cli import main

    journal = _Journal(os.open(journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    journal.put("boot", pid=os.getpid(), fault=fault)
    trap = _Trap(journal, **(fault or {}))
    gateway.spool.os = trap  # type: ignore[assignment]
    gateway.storefiles.os = trap  # type: ignore[assignment]
    store = gateway.spool.Spool.store

    def journaled_store(self: Any, polls: Any, events: Any, **kwargs: Any) -> None:
        store(self, polls, events, **kwargs)
        journal.put("stored", r=[[r.point, r.ts_ms, r.value] for _, rs in polls for r in rs])

    gateway.spool.Spool.store = journaled_store  # type: ignore[method-assign]
    return main(["run", site])


def cut_power(spool: Path, journal: list[dict[str, Any]]) -> dict[str, Any]:
    """After a kill -9, leave the spool as the card would hold it had the power gone instead: each segment cut back
    to the size its last fdatasync made durable (the journal's `synced`), one never synced gone, and the state's
    boot id changed (the system booted again). state.json itself is written with fsync and rename: durable.
    Returns what was cut (file → bytes lost)."""
    synced: dict[str, int] = {}
    for e in journal:
        if e["e"] == "synced":
            synced[e["file"]] = e["size"]
    cut: dict[str, int] = {}
    for seg in sorted(spool.glob("seg-*.log")):
        size = seg.stat().st_size
        keep = synced.get(seg.name, 0)
        if keep == 0:
            seg.unlink()
            cut[seg.name] = size
        elif size > keep:
            os.truncate(seg, keep)
            cut[seg.name] = size - keep
    state = json.loads((spool / "state.json").read_text())
    state["boot"] = "the boot before the power cut"
    (spool / "state.json").write_text(json.dumps(state))
    return cut


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's whole lines (every line is one write: nothing torn to skip but a missing file)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- the node (runs under the MicroPython unix port)

NODE_PERIOD_MS = 10_000  # the reference node's sample period (firmware/host/sim/fixtures.py)
NODE_EPOCH_MS = 1_767_225_600_000
NODE_POINTS = 6
NODE_BUFFER = {"blocks": 6, "block_bytes": 372, "sync": "cycle"}  # 18 readings (3 cycles) a block, on flash every cycle


def provision_node(flash: Path) -> None:
    """The reference node's config.json and secrets.json (firmware/host/sim/fixtures.py) with a small ring
    synced every cycle, so that what the node sampled is on flash within its cycle."""
    sim = str(ROOT / "firmware" / "host" / "sim")
    if sim not in sys.path:
        sys.path.append(sim)
    import fixtures  # firmware/host/sim: the reference node, shared with the firmware tests

    flash.mkdir(parents=True, exist_ok=True)
    (flash / "config.json").write_text(json.dumps(fixtures.config(buffer=NODE_BUFFER)))
    (flash / "secrets.json").write_text("{}")


def node_command(flash: Path, run: dict[str, Any]) -> list[str]:
    """The node's process. YUJING_HIL_NODE_FIRMWARE: another firmware tree (holding yujing_node/) to run, e.g. a
    release, to see how it fares (the simulated board always comes from this tree)."""
    from provisioning.simboard import micropython_executable

    firmware = os.environ.get("YUJING_HIL_NODE_FIRMWARE") or str(ROOT / "firmware")
    return [micropython_executable(), str(NODE_SCRIPT), str(ROOT / "firmware"), str(flash), json.dumps(run), firmware]


def node_torn(fault: NodeFault) -> dict[str, Any] | None:
    if fault.kind == "power.node_torn_slot":
        return {"what": "slot", "k": fault.k, "cut": fault.cut}
    if fault.kind == "power.node_torn_state":
        return {"what": "state", "k": fault.k, "cut": fault.cut}
    return None


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "gateway":
        sys.exit(launch_gateway(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]) if len(sys.argv) > 4 else None))
    sys.exit("usage: python -m hil_tests.powerfault gateway SITE JOURNAL [FAULT-JSON]")
