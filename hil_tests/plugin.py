"""The HIL session plugin: the target, capability skips, the bench lock, one rerun of a failed scenario, and the
report (test-artifacts/hil/report.json).

Loaded by hil_tests/conftest.py (`pytest_plugins`), or with `-p hil_tests.plugin`. Options:

    --target sim | bench:<name>   (or $YUJING_HIL_TARGET; $YUJING_HIL_SITE is a bench of its own, see targets.py)
    --hil-report PATH             where the JSON report goes (default test-artifacts/hil/report.json)
    --hil-no-rerun                a failed scenario is not run again

A scenario is an item with the `hil` marker. Its outcome in the report:

    pass, fail, skip (with the reason), xfail (an expected failure, strict or not),
    flaky  – it failed, was run again once with the same seed, and passed; it does NOT fail the run (pytest sees the
             second attempt), but it is listed loudly at the end and in the report with the first attempt's error,
    infra  – the rig could not be built: an error in setup (a fixture that could not start mosquitto, open a pty, find
             the bench's adapter), in teardown after a passing test, or an InfraError (hil_tests/report.py) in the
             test. It fails the run, as pytest counts it, but it says "the scenario did not run", not "it failed".

The rerun is this plugin's own (pytest's runtestprotocol, run twice) rather than pytest-rerunfailures: that one reruns
setup errors too (an infra error would be retried as if it were a flaky scenario) and writes both attempts into the
JUnit XML as two testcases. Here only a failure in the test body is retried; JUnit gets one testcase per scenario,
the second attempt's, with the property `hil_outcome` (and `hil_first_attempt` when it was rerun).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from _pytest.runner import runtestprotocol

from gateway.storefiles import write_atomic

from .report import ARTIFACTS, RECORD_KEY, InfraError, ScenarioRecord
from .targets import (
    CAPABILITIES,
    BenchBusy,
    BenchLock,
    Target,
    TargetError,
    find_port,
    missing_hardware,
    resolve,
    target_of,
)

ROOT = Path(__file__).parent.parent
FIRMWARE = (ROOT / "firmware" / "main.py", ROOT / "firmware" / "yujing_node")
SOFTWARE = ("gateway", "device_drivers", "provisioning", "hil_tests", "pyproject.toml")  # without git: these, hashed
FORMAT = "yujing-hil-report/1"

ATTEMPT_KEY = pytest.StashKey[list[pytest.TestReport]]()
RERAN_KEY = pytest.StashKey[bool]()
_UNKNOWN_KEY = pytest.StashKey[list[str]]()  # a `needs` mark naming capabilities no target has


# ------------------------------------------------------------------------------------------ hashes


def _files(paths: tuple[Path, ...] | list[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_file():
            yield p
        elif p.is_dir():
            yield from (f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc")


def tree_hash(paths: tuple[Path, ...] | list[Path], root: Path = ROOT) -> tuple[str, int]:
    """SHA-256 over the files' paths (relative to root) and contents, in path order: (hex digest, file count)."""
    h = hashlib.sha256()
    files = sorted(_files(paths), key=lambda f: f.relative_to(root).as_posix())
    for f in files:
        data = f.read_bytes()
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest(), len(files)


def firmware_id() -> dict[str, Any]:
    digest, n = tree_hash(FIRMWARE)
    return {"sha256": digest, "files": n, "of": ["firmware/main.py", "firmware/yujing_node/"]}


def software_id(root: Path = ROOT) -> dict[str, Any]:
    """The git commit and whether the tree differs from it; without git, a hash of the package tree."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                                timeout=30, check=True).stdout
        return {"git_commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        digest, n = tree_hash([root / p for p in SOFTWARE], root)
        return {"git_commit": None, "tree_sha256": digest, "files": n, "of": list(SOFTWARE)}


# ------------------------------------------------------------------------------------------ outcomes


@dataclass
class Result:
    nodeid: str
    outcome: str
    reason: str = ""
    phase: str = ""
    duration_s: float = 0.0
    record: ScenarioRecord | None = None
    first_attempt: Result | None = None

    def as_dict(self) -> dict[str, Any]:
        rec = self.record
        out: dict[str, Any] = {
            "nodeid": self.nodeid, "outcome": self.outcome, "reason": self.reason, "phase": self.phase,
            "duration_s": round(self.duration_s, 3),
            "seed": rec.seed if rec else None,
            "faults": [{"kind": f.kind, "t": round(f.t, 3), **f.detail} for f in rec.faults] if rec else [],
            "figures": rec.figures if rec else {},
            "logs": rec.logs if rec else {},
        }
        if self.first_attempt is not None:
            out["first_attempt"] = self.first_attempt.as_dict()
        return out


def _reason(rep: pytest.TestReport) -> str:
    lr = rep.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:  # a skip: (file, line, "Skipped: why")
        return str(lr[2]).removeprefix("Skipped: ")
    crash = getattr(lr, "reprcrash", None)
    if crash is not None:
        return str(crash.message)[:2000]
    return (rep.longreprtext or "")[-2000:]


def classify(reports: list[pytest.TestReport], reran: bool = False) -> tuple[str, str, str]:
    """(outcome, reason, phase) of one attempt's setup/call/teardown reports."""
    by = {r.when: r for r in reports}
    setup, call, teardown = by.get("setup"), by.get("call"), by.get("teardown")
    if setup is not None and setup.failed:
        return "infra", _reason(setup), "setup"
    if setup is not None and setup.skipped:
        return "skip", _reason(setup), "setup"
    if call is None:
        return "infra", "no call phase", "setup"
    if hasattr(call, "wasxfail"):
        return ("xfail", str(call.wasxfail), "call") if call.skipped else ("pass", f"XPASS {call.wasxfail}", "call")
    if call.failed:
        return ("infra" if getattr(call, "hil_infra", False) else "fail"), _reason(call), "call"
    if call.skipped:
        return "skip", _reason(call), "call"
    if teardown is not None and teardown.failed:
        return "infra", _reason(teardown), "teardown"
    return ("flaky" if reran else "pass"), "", "call"


def _restart_timeout(item: pytest.Item) -> None:
    """pytest-timeout times the whole protocol (both attempts): give the second attempt a timer of its own."""
    try:
        from pytest_timeout import (
            _get_item_settings,  # its own settings reader (no public one)
        )
    except ImportError:
        return
    settings = _get_item_settings(item)
    if settings.timeout and settings.timeout > 0 and not settings.func_only:
        hook = item.config.pluginmanager.hook
        hook.pytest_timeout_cancel_timer(item=item)
        hook.pytest_timeout_set_timer(item=item, settings=settings)


def _failed_in_body(reports: list[pytest.TestReport]) -> bool:
    return any(r.when == "call" and r.failed and not getattr(r, "hil_infra", False)
               and "XPASS(strict)" not in str(r.longrepr) for r in reports)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def hil_report(request: pytest.FixtureRequest) -> ScenarioRecord:
    """The scenario's record for the HIL report: set `.seed`, call `.fault(kind, t, **detail)`, fill `.figures`."""
    record = ScenarioRecord(request.node.nodeid)
    request.node.stash[RECORD_KEY] = record
    return record


@pytest.fixture(scope="session")
def hil_target(request: pytest.FixtureRequest) -> Target:
    """What this session runs against (--target, $YUJING_HIL_TARGET, $YUJING_HIL_SITE, else the simulated rig).
    On a bench, every USB serial device of its file must be plugged in: else each scenario that uses the bench
    (through this fixture, or `hil_rig`) is an infra error naming what is missing."""
    target = target_of(request.config)
    if target.bench is not None:
        missing = missing_hardware(target.bench)
        if missing:
            raise InfraError(f"bench {target.name}: not plugged in: {'; '.join(missing)}")
    return target


# ------------------------------------------------------------------------------------------ the plugin


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("hil", "hardware-in-the-loop (hil_tests)")
    g.addoption("--target", default=None, metavar="sim|bench:NAME",
                help="what the HIL scenarios run against (default: $YUJING_HIL_TARGET, else sim)")
    g.addoption("--hil-report", default=None, metavar="PATH",
                help="the JSON report (default: test-artifacts/hil/report.json)")
    g.addoption("--hil-no-rerun", action="store_true", help="do not run a failed HIL scenario a second time")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(*capabilities): the HIL scenario runs only on a target that has these "
                                       "(hil_tests/targets.py CAPABILITIES); elsewhere it is skipped, saying why")
    if not any(str(m).startswith("hil:") for m in config.getini("markers")):  # pyproject.toml has it; tmp runs not
        config.addinivalue_line("markers", "hil: hardware-in-the-loop scenario (hil_tests); in the HIL report")
    try:
        target = resolve(config.getoption("--target"))
    except TargetError as exc:
        raise pytest.UsageError(str(exc)) from None
    lock = None
    if target.kind == "bench":
        try:
            # By the bench's name, not its file's: two files that describe one bench name it alike
            lock = BenchLock(target.bench.name if target.bench else target.name).acquire()
        except BenchBusy as exc:
            raise pytest.UsageError(str(exc)) from None
    config.pluginmanager.register(HilSession(config, target, lock), "hil-session")


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.pluginmanager.get_plugin("hil-session")
    if isinstance(session, HilSession) and session.lock is not None:
        session.lock.release()


class HilSession:
    def __init__(self, config: pytest.Config, target: Target, lock: BenchLock | None) -> None:
        self.config = config
        self.target = target
        self.lock = lock
        self.rerun = not config.getoption("--hil-no-rerun")
        option = config.getoption("--hil-report")
        self.report_path = Path(option) if option else ARTIFACTS / "report.json"
        self.results: dict[str, Result] = {}
        self.scenarios: list[str] = []
        self.started = time.time()

    # -- collection: capabilities

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            needs = {n for m in item.iter_markers("needs") for n in m.args}
            unknown = sorted(n for n in needs if n not in CAPABILITIES)
            if unknown:
                item.stash[_UNKNOWN_KEY] = unknown
                continue
            lacks = self.target.lacks(needs)
            if lacks:
                has = ", ".join(sorted(self.target.capabilities)) or "nothing"
                item.add_marker(pytest.mark.skip(
                    reason=f"needs {', '.join(lacks)}; target {self.target.label} lacks it (it has: {has})"))

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.scenarios = [i.nodeid for i in session.items if i.get_closest_marker("hil") is not None]

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """(After pytest's skip marks, before the fixtures.)"""
        unknown = item.stash.get(_UNKNOWN_KEY, None)
        if unknown:
            pytest.fail(f"@pytest.mark.needs: unknown capabilities {unknown} (known: {', '.join(CAPABILITIES)})",
                        pytrace=False)

    # -- one rerun

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        if not self.rerun or item.get_closest_marker("hil") is None:
            return None
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        if _failed_in_body(reports):
            first = self.results.get(item.nodeid)
            item.stash[RERAN_KEY] = True
            _restart_timeout(item)
            reports = runtestprotocol(item, nextitem=nextitem, log=False)  # the seed comes from the environment: same
            if item.nodeid in self.results:
                self.results[item.nodeid].first_attempt = first
            if first is not None:
                reports[-1].user_properties.append(("hil_first_attempt", f"{first.outcome}: {first.reason}"[:500]))
        for rep in reports:
            ihook.pytest_runtest_logreport(report=rep)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
        rep = yield
        if item.get_closest_marker("hil") is None:
            return rep
        if call.excinfo is not None and call.excinfo.errisinstance(InfraError):
            rep.hil_infra = True  # type: ignore[attr-defined]
        if call.when == "setup":
            item.stash[ATTEMPT_KEY] = []
        attempt = item.stash.setdefault(ATTEMPT_KEY, [])
        attempt.append(rep)
        if call.when == "teardown":
            outcome, reason, phase = classify(attempt, item.stash.get(RERAN_KEY, False))
            duration = sum(r.duration for r in attempt)
            record = item.stash.get(RECORD_KEY, None)
            self.results[item.nodeid] = Result(item.nodeid, outcome, reason, phase, duration, record)
            rep.user_properties.append(("hil_outcome", outcome))
            if self.target.kind == "bench":
                rep.user_properties.append(("hil_target", self.target.label))
        return rep

    # -- the report

    def build(self) -> dict[str, Any]:
        results = [self.results[n] for n in self.scenarios if n in self.results]
        totals: dict[str, int] = {}
        for r in results:
            totals[r.outcome] = totals.get(r.outcome, 0) + 1
        seed = os.environ.get("YUJING_HIL_SEED")
        if self.target.bench is not None:
            hardware: dict[str, Any] = {"simulated": False, "bench": self.target.bench.name,
                                        "bench_file": str(self.target.bench.path),
                                        "site_file": str(self.target.bench.site), **self.target.bench.hardware_ids()}
            hardware["ports_found"] = {label: find_port(usb, by_id)
                                       for label, (usb, by_id) in self.target.bench.serial_ports().items()}
        else:
            hardware = {"simulated": True, "note": "the simulated rig: pymodbus slaves on pty pairs and loopback TCP, "
                                                   "the MicroPython unix port for nodes; no hardware ids"}
        return {
            "format": FORMAT,
            "target": self.target.label,
            "capabilities": sorted(self.target.capabilities),
            "hardware": hardware,
            "host": {"name": socket.gethostname(), "machine": platform.machine(), "python": platform.python_version()},
            "firmware": firmware_id(),
            "software": software_id(),
            "seed": int(seed) if seed else None,
            "seed_source": "YUJING_HIL_SEED" if seed else "each scenario's default seed (see its record)",
            "started": dt.datetime.fromtimestamp(self.started, dt.UTC).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.started, 2),
            "flaky_fails_run": False,
            "totals": totals,
            "flaky": [r.nodeid for r in results if r.outcome == "flaky"],
            "scenarios": [r.as_dict() for r in results],
        }

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not any(n in self.results for n in self.scenarios):
            return  # no HIL scenario ran (e.g. only tests/): leave the last report alone
        self.report_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.report_path, json.dumps(self.build(), indent=2, default=_jsonable).encode(), 0o644)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        ran = [self.results[n] for n in self.scenarios if n in self.results]
        if not ran:
            return
        flaky = [r for r in ran if r.outcome == "flaky"]
        infra = [r for r in ran if r.outcome == "infra"]
        tr = terminalreporter
        if flaky:
            tr.write_sep("!", f"FLAKY: {len(flaky)} HIL scenario(s) failed once and passed when run again",
                         yellow=True, bold=True)
            for r in flaky:
                first = r.first_attempt
                tr.write_line(f"FLAKY {r.nodeid}: first attempt {first.outcome if first else '?'}: "
                              f"{(first.reason if first else '')[:300]}")
        if infra:
            tr.write_sep("!", f"INFRA: {len(infra)} HIL scenario(s) could not run (the rig, not the gateway)", red=True)
            for r in infra:
                tr.write_line(f"INFRA {r.nodeid} ({r.phase}): {r.reason[:300]}")
        tr.write_line(f"HIL report ({self.target.label}): {self.report_path}")


def _jsonable(o: Any) -> Any:
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)


