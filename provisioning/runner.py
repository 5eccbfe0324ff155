"""`yujing provision install`: several boards at once, each through the same steps, with a journal to resume.

Per board, in its own thread (the work is mpremote subprocesses and waiting on the broker):

    find       the board by USB serial number (or by-id path): provisioning.discover
    preflight  MicroPython version, .mpy ABI, free flash, the clock set, Ctrl-C: board.preflight (every run: a
               replugged board has lost its clock)
    identity   certificate and password (Site.add_node: "nothing to do" when issued); then the broker files are
               rewritten and the broker reloaded, when the plan says how
    files      /config.json (its mqtt section set for TLS), /secrets.json (MQTT account, command key) and the TLS
               files /ca.der, /cert.der, /key.der (provisioning.node_files), in one copy: each to a temporary
               name, SHA-256 checked on the board, then all renamed
    firmware   the .mpy files whose hash on the board differs
    online     reboot, then its birth (site, id, kind checked) and first readings on the broker (provisioning.verify)

The journal (`<site dir>/journal.json`, rewritten whole after every step) records each node's steps with the
inputs they were done for (hashes of the config, secrets, command key, certificate, key and CA as written,
and of the firmware). A rerun skips a step done for the same inputs
and says so; a step left "running" by a killed run, or "failed", is done again. A node whose journal says
"online" for the same inputs is skipped whole. Nothing is lost by redoing a step: every one is idempotent (the
identity is kept, copies are skipped by hash, the old file stays in force until the new one is checked).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import ProvisionError, board, discover
from .atomic import PUBLIC, write_atomic
from .inventory import utc_now
from .node_files import Broker, node_files
from .verify import BrokerAccess, VerifyResult, verify_online_sync
from .workflow import Site

JOURNAL = "journal.json"
STEPS = ("preflight", "identity", "files", "firmware", "online")


# ---------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class NodePlan:
    node_id: str
    location: str
    config: Path
    serial: str | None = None  # the board's USB serial number …
    port: str | None = None  # … or its port (/dev/serial/by-id/…)


@dataclass(frozen=True)
class VerifyPlan:
    host: str
    port: int
    tls: bool = True
    timeout_s: float = 120.0


@dataclass(frozen=True)
class Plan:
    nodes: tuple[NodePlan, ...]
    firmware: Path
    verify: VerifyPlan | None = None
    broker_files: Path | None = None  # rewrite mosquitto's files here after issuing identities …
    broker_reload: str | None = None  # … and run this to reload the broker (e.g. "sudo systemctl reload mosquitto")
    wifi_password_file: Path | None = None  # its content goes into /secrets.json as wifi_password
    hard_reset: bool = True


def load_plan(path: Path) -> Plan:
    """A TOML plan (paths relative to it); every problem names the key at fault."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProvisionError(f"--plan {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProvisionError(f"{path}: {exc}") from None
    base = path.resolve().parent

    def rel(v: Any, key: str) -> Path:
        if not isinstance(v, str) or not v:
            raise ProvisionError(f"{path}: {key}: a file path (text)")
        return base / v

    nodes = []
    raw = doc.get("nodes")
    if not isinstance(raw, list) or not raw:
        raise ProvisionError(f"{path}: nodes: at least one [[nodes]] table with id, serial (or port), location, config")
    for i, n in enumerate(raw):
        where = f"{path}: nodes[{i}]"
        if not isinstance(n, dict):
            raise ProvisionError(f"{where}: a table")
        unknown = set(n) - {"id", "serial", "port", "location", "config"}
        if unknown:
            raise ProvisionError(f"{where}: unknown key {sorted(unknown)[0]!r} (id, serial, port, location, config)")
        for key in ("id", "location", "config"):
            if not isinstance(n.get(key), str) or not n[key]:
                raise ProvisionError(f"{where}.{key}: required (text)")
        if ("serial" in n) == ("port" in n):
            raise ProvisionError(f"{where}: give the board's USB serial number (serial = …) or its port "
                                 f"(port = \"/dev/serial/by-id/…\"), one of them")
        nodes.append(NodePlan(n["id"], n["location"], rel(n["config"], f"nodes[{i}].config"),
                              str(n["serial"]) if "serial" in n else None, n.get("port")))
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise ProvisionError(f"{path}: node ids must differ (twice: {sorted({x for x in ids if ids.count(x) > 1})})")
    verify = None
    if "broker" in doc:
        b = doc["broker"]
        if not isinstance(b, dict) or not isinstance(b.get("host"), str):
            raise ProvisionError(f"{path}: broker.host: the broker the nodes report to, as the verifier reaches it")
        tls = bool(b.get("tls", True))
        verify = VerifyPlan(b["host"], int(b.get("port", 8883 if tls else 1883)), tls, float(b.get("timeout_s", 120)))
    files = doc.get("broker_files")
    return Plan(tuple(nodes), rel(doc.get("firmware", "firmware"), "firmware"), verify,
                rel(files, "broker_files") if files is not None else None, doc.get("broker_reload"),
                rel(doc["wifi_password_file"], "wifi_password_file") if "wifi_password_file" in doc else None,
                doc.get("reset", "hard") != "soft")


# ---------------------------------------------------------------------------------------------- the journal

class Journal:
    """`<site>/journal.json`: per node, each step's status, inputs, time and outcome; and one line per run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self.doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.doc = {"format": 1, "runs": [], "nodes": {}}
        except ValueError:
            raise ProvisionError(f"{path}: not valid JSON; delete it to start the installation over "
                                 f"(every step is safe to redo)") from None

    def node(self, node_id: str) -> dict[str, Any]:
        return self.doc["nodes"].setdefault(node_id, {"steps": {}})

    def step(self, node_id: str, step: str) -> dict[str, Any] | None:
        entry: dict[str, Any] | None = self.node(node_id)["steps"].get(step)
        return entry

    def done_for(self, node_id: str, step: str, key: str) -> bool:
        s = self.step(node_id, step)
        return s is not None and s.get("status") == "done" and s.get("key") == key

    def record(self, node_id: str, step: str, status: str, *, key: str = "", detail: str = "") -> None:
        with self._lock:
            n = self.node(node_id)
            n["steps"][step] = {"status": status, "key": key, "at": utc_now(), **({"detail": detail} if detail else {})}
            self.save_locked()

    def set_node(self, node_id: str, **fields: Any) -> None:
        with self._lock:
            self.node(node_id).update(fields)
            self.save_locked()

    def run(self, **fields: Any) -> None:
        with self._lock:
            if fields.get("started"):
                self.doc["runs"].append(fields)
            else:
                self.doc["runs"][-1].update(fields)
            self.save_locked()

    def save_locked(self) -> None:
        write_atomic(self.path, (json.dumps(self.doc, indent=1, ensure_ascii=False) + "\n").encode(), PUBLIC)


# ---------------------------------------------------------------------------------------------- progress

class Progress(Protocol):
    def update(self, node_id: str, step: str, status: str, detail: str = "") -> None: ...

    def close(self) -> None: ...


class PlainProgress:
    """One line per step event: what a log file or a test reads (stdout not a terminal)."""

    def __init__(self, out: Any = None) -> None:
        self.out = out or sys.stdout
        self._lock = threading.Lock()

    def update(self, node_id: str, step: str, status: str, detail: str = "") -> None:
        with self._lock:
            print(f"{node_id:16} {step:9} {status:8} {detail}".rstrip(), file=self.out, flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """A live table, one row per board (rich, when installed and stdout is a terminal)."""

    def __init__(self, node_ids: Iterable[str]) -> None:
        from rich.console import Console
        from rich.live import Live

        self.rows: dict[str, tuple[str, str, str]] = {n: ("find", "waiting", "") for n in node_ids}
        self._lock = threading.Lock()
        self.console = Console()
        self.live = Live(self._table(), console=self.console, refresh_per_second=8)
        self.live.start()

    def _table(self) -> Any:
        from rich.table import Table

        t = Table(expand=True)
        for col in ("node", "step", "status", "detail"):
            t.add_column(col, overflow="fold")
        colours = {"done": "green", "skipped": "cyan", "failed": "bold red", "running": "yellow"}
        for node, (step, status, detail) in self.rows.items():
            t.add_row(node, step, f"[{colours.get(status, 'white')}]{status}[/]", detail)
        return t

    def update(self, node_id: str, step: str, status: str, detail: str = "") -> None:
        from rich.markup import escape

        with self._lock:
            self.rows[node_id] = (step, status, escape(detail))  # "[broker]" in a message is text, not markup
            self.live.update(self._table())

    def close(self) -> None:
        self.live.stop()


def make_progress(node_ids: Iterable[str]) -> Progress:
    if sys.stdout.isatty():
        try:
            return RichProgress(node_ids)
        except ImportError:
            pass  # rich is in the provision extra; without it, plain lines
    return PlainProgress()


# ---------------------------------------------------------------------------------------------- running

@dataclass
class NodeOutcome:
    node_id: str
    status: str  # "online", "installed" (no verify), "failed", "interrupted"
    step: str = ""  # the step that failed
    message: str = ""
    bytes_copied: int = 0
    skipped: list[str] = field(default_factory=list)
    verify: VerifyResult | None = None


@dataclass
class RunReport:
    outcomes: dict[str, NodeOutcome]
    seconds: float
    resumed: bool

    @property
    def ok(self) -> bool:
        return all(o.status in ("online", "installed") for o in self.outcomes.values())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Runner:
    def __init__(self, site: Site, plan: Plan, *, technician: str, progress: Progress | None = None,
                 by_id_dir: Path = discover.BY_ID, list_ports: Iterable[Any] | None = None,
                 fresh: bool = False) -> None:
        self.site = site
        self.plan = plan
        self.technician = technician
        self.progress = progress or PlainProgress()
        self.by_id_dir = by_id_dir
        self.list_ports = list_ports
        self.fresh = fresh
        self.journal = Journal(site.root / JOURNAL)
        self._identity_lock = threading.Lock()  # one inventory writer at a time (the site lock is the process's)
        self.outcomes: dict[str, NodeOutcome] = {}
        self._interrupted = threading.Event()

    # -- the whole run --------------------------------------------------------------------------------------

    def run(self) -> RunReport:
        t0 = time.monotonic()
        inv = self.site.load()
        self.site_id, self.prefix = inv.site, inv.prefix
        for n in self.plan.nodes:
            self._check_config(n)
        resumed = any(n.node_id in self.journal.doc["nodes"] for n in self.plan.nodes) and not self.fresh
        self.journal.run(started=utc_now(), nodes=[n.node_id for n in self.plan.nodes], resumed=resumed,
                         technician=self.technician)
        self.firmware_files = board.compile_firmware(self.plan.firmware)
        self.firmware_key = _files_key(self.firmware_files)
        boards = discover.list_boards(self.by_id_dir, self.list_ports)
        threads = []
        for n in self.plan.nodes:
            self.outcomes[n.node_id] = NodeOutcome(n.node_id, "interrupted")
            t = threading.Thread(target=self._node, args=(n, boards), name=f"provision {n.node_id}", daemon=True)
            threads.append(t)
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)  # a short wait, so Ctrl-C reaches this (main) thread
        except KeyboardInterrupt:
            self._interrupted.set()
            board.stop_all()  # the copies under way end; each board keeps its old files
            for node_id, o in self.outcomes.items():
                if o.status not in ("online", "installed"):
                    o.status, o.message = "interrupted", "interrupted: run the same command again to resume"
                    self.journal.set_node(node_id, status="interrupted")
            self.journal.run(finished=utc_now(), outcome="interrupted")
            raise
        finally:
            self.progress.close()
        report = RunReport(self.outcomes, time.monotonic() - t0, resumed)
        self.journal.run(finished=utc_now(), outcome="ok" if report.ok else "failed", seconds=round(report.seconds, 2))
        return report

    def _check_config(self, n: NodePlan) -> None:
        """Before any board is touched: the config must be this node's (a swapped file is the commonest mistake)."""
        try:
            cfg = json.loads(n.config.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ProvisionError(f"{n.node_id}: config {n.config}: no such file") from None
        except ValueError as exc:
            raise ProvisionError(f"{n.node_id}: config {n.config}: not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise ProvisionError(f"{n.node_id}: config {n.config}: a JSON object (firmware/README.md)")
        for key, want in (("node_id", n.node_id), ("site", self.site_id)):
            if cfg.get(key) != want:
                raise ProvisionError(f"{n.node_id}: config {n.config} has {key} {cfg.get(key)!r}, the plan says "
                                     f"{want!r}: is it the right file?")

    # -- one node -------------------------------------------------------------------------------------------

    def _node(self, n: NodePlan, boards: list[discover.Board]) -> None:
        out = self.outcomes[n.node_id]
        step = "find"
        try:
            prev = dict(self.journal.node(n.node_id))
            self.journal.set_node(n.node_id, status="running", serial=n.serial, port=n.port)
            b = discover.choose(boards, serial=n.serial, port=n.port)
            serial = n.serial or b.serial_number or b.port
            self.progress.update(n.node_id, "find", "done", f"{b.port} (serial {b.serial_number or '?'})")
            if not self.fresh and prev.get("status") == "online" and self.site.store.load(n.node_id) is not None:
                files_key = _files_key(self._files(n))
                if (self.journal.done_for(n.node_id, "files", files_key)
                        and self.journal.done_for(n.node_id, "firmware", self.firmware_key)):
                    out.status, out.skipped = "online", list(STEPS)
                    out.message = f"already online (journal, {prev['steps']['online']['at']}); nothing to do"
                    self.progress.update(n.node_id, "online", "skipped", out.message)
                    return

            step = "preflight"
            self._start(n, step)
            pf = board.preflight(b.port)
            self._done(n, step, serial, f"MicroPython {pf.version}, {(pf.flash_free or 0) // 1024} KiB free")

            step = "identity"
            if not self._skip(n, step, serial, out):
                self._start(n, step)
                with self._identity_lock:
                    msg = self.site.add_node(n.node_id, serial=serial, location=n.location, technician=self.technician,
                                             firmware=self.plan.firmware, config=n.config).message
                    if self.plan.broker_files is not None:
                        self.site.broker_files(self.plan.broker_files)
                        self._reload_broker()
                self._done(n, step, serial, msg.split(";")[0])

            step = "files"
            files = self._files(n)
            self._copy(n, step, b.port, files, _files_key(files), out)

            step = "firmware"
            self._copy(n, step, b.port, self.firmware_files, self.firmware_key, out)

            step = "online"
            self._start(n, step, "rebooting" + (", waiting for its birth" if self.plan.verify else ""))
            if self.plan.verify is None:
                board.reboot(b.port, hard=self.plan.hard_reset)
                self._done(n, step, "", "rebooted; not verified (no [broker] in the plan)")
                out.status = "installed"
                self.journal.set_node(n.node_id, status="installed")
                return
            v = self.plan.verify
            access = BrokerAccess.platform(self.site, v.host, v.port, tls=v.tls)
            result = verify_online_sync(access, self.site_id, n.node_id, timeout_s=v.timeout_s, prefix=self.prefix,
                                        after_subscribe=lambda: board.reboot(b.port, hard=self.plan.hard_reset))
            out.verify = result
            if not result.online:
                raise ProvisionError(result.problem or "not online")
            self._done(n, step, "", result.line().split(": ", 1)[1])
            out.status = "online"
            self.journal.set_node(n.node_id, status="online", failed_step=None, error=None)
        except ProvisionError as exc:
            if self._interrupted.is_set():
                return  # its mpremote was ended by Ctrl-C: the main thread records the interruption
            out.status, out.step, out.message = "failed", step, str(exc)
            if step in STEPS:
                self.journal.record(n.node_id, step, "failed", detail=str(exc))
            self.journal.set_node(n.node_id, status="failed", failed_step=step, error=str(exc))
            self.progress.update(n.node_id, step, "failed", str(exc))
        except Exception as exc:  # a bug must not hide the other boards' outcome; it is reported like a failure
            out.status, out.step, out.message = "failed", step, f"{type(exc).__name__}: {exc}"
            self.journal.set_node(n.node_id, status="failed", failed_step=step, error=out.message)
            self.progress.update(n.node_id, step, "failed", out.message)

    def _files(self, n: NodePlan) -> dict[str, bytes]:
        """/config.json (mqtt set for TLS), /secrets.json (with the command key) and the DER TLS files."""
        with self._identity_lock:  # a node installed before command keys existed gets one (an inventory write)
            self.site.ensure_command_key(n.node_id)
        v = self.plan.verify
        return node_files(self.site.store, n.node_id, n.config.read_bytes(), f"{n.node_id}: config {n.config}",
                          broker=Broker(v.host, v.port, v.tls) if v is not None else None,
                          wifi_password_file=self.plan.wifi_password_file)

    def _copy(self, n: NodePlan, step: str, port: str, files: dict[str, bytes], key: str, out: NodeOutcome) -> None:
        """The files or firmware step: one copy (all put in force together, or none) of what changed."""
        if self._skip(n, step, key, out):
            return
        self._start(n, step)
        r = board.sync_firmware(port, files)
        out.bytes_copied += r.bytes_copied
        self._done(n, step, key, f"{len(r.copied)} of {len(files)} files copied ({r.bytes_copied} bytes)")

    def _skip(self, n: NodePlan, step: str, key: str, out: NodeOutcome) -> bool:
        if self.fresh or not self.journal.done_for(n.node_id, step, key):
            return False
        out.skipped.append(step)
        self.progress.update(n.node_id, step, "skipped", "done in an earlier run (journal)")
        return True

    def _start(self, n: NodePlan, step: str, detail: str = "") -> None:
        self.journal.record(n.node_id, step, "running")
        self.progress.update(n.node_id, step, "running", detail)

    def _done(self, n: NodePlan, step: str, key: str, detail: str) -> None:
        self.journal.record(n.node_id, step, "done", key=key, detail=detail)
        self.progress.update(n.node_id, step, "done", detail)

    def _reload_broker(self) -> None:
        if not self.plan.broker_reload:
            return
        proc = subprocess.run(shlex.split(self.plan.broker_reload), capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise ProvisionError(f"broker_reload {self.plan.broker_reload!r} failed: "
                                 f"{(proc.stderr or proc.stdout).strip()[-200:]}")


def _files_key(files: dict[str, bytes]) -> str:
    """A copy step's inputs: every file's hash (for the files step, a new config, a re-key or a new CA changes it;
    for the firmware step, a changed .mpy)."""
    return _sha(json.dumps({p: _sha(d) for p, d in sorted(files.items())}).encode())


def report_lines(report: RunReport) -> list[str]:
    lines = []
    for o in report.outcomes.values():
        skipped = f"; skipped (journal): {', '.join(o.skipped)}" if o.skipped else ""
        if o.status == "online" and o.verify is not None:
            lines.append(o.verify.line() + skipped)
        elif o.status in ("online", "installed"):
            lines.append(f"{o.node_id}: {o.status}{': ' + o.message if o.message else ''}{skipped}")
        else:
            lines.append(f"{o.node_id}: FAILED at {o.step}: {o.message}{skipped}; fix it and run the same command "
                         f"again (steps done are skipped)")
    total = sum(o.bytes_copied for o in report.outcomes.values())
    ok = sum(o.status in ("online", "installed") for o in report.outcomes.values())
    lines.append(f"{ok} of {len(report.outcomes)} nodes done in {report.seconds:.1f} s, {total} bytes copied"
                 + (" (resumed from the journal)" if report.resumed else ""))
    return lines

