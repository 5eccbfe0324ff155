"""Targets (hil_tests/targets.py): bench files and their errors, capabilities and the skips they cause, the bench lock.

The lock is tested with real processes: a holder that sleeps, and a pytest run that is refused while it lives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .targets import (
    BENCH_DIR,
    CAPABILITIES,
    HOST_SIDE,
    SIM,
    BenchBusy,
    BenchLock,
    TargetError,
    capabilities_of,
    load_bench,
    resolve,
)

ROOT = Path(__file__).parent.parent
EXAMPLE = BENCH_DIR / "example-pi-bench.toml"
SITE = BENCH_DIR / "example-pi-bench.site.toml"


def bench_dir(tmp_path: Path, name: str = "lab", text: str | None = None) -> Path:
    """A bench folder with the example's site file and a bench file (the example's unless `text` is given)."""
    d = tmp_path / "benches"
    d.mkdir(exist_ok=True)
    shutil.copy(SITE, d / SITE.name)
    (d / f"{name}.toml").write_text(EXAMPLE.read_text() if text is None else text)
    return d / f"{name}.toml"


def test_the_example_bench_validates_and_says_what_it_can_do() -> None:
    b = load_bench(EXAMPLE)
    assert b.name == "example-pi-bench"
    assert b.site == SITE and b.config is not None and {d.name for d in b.config.devices} == {"radar", "rain"}
    assert [a.usb_serial for a in b.adapters] == ["A10K4S2B"]
    assert [n.device_id for n in b.nodes] == ["bench-node-01", "bench-node-02"]
    assert b.relay is not None and [c.cuts for c in b.relay.channels] == [
        "node:bench-node-01", "node:bench-node-02", "device:radar", "device:rain"]
    assert b.fault_injector is not None and b.fault_injector.bus == "rs485"
    caps = capabilities_of(b)
    assert caps == HOST_SIDE | {"rs485", "rs485_fault_injection", "nodes", "node_power", "sensor_power"}
    ids = b.hardware_ids()
    assert ids["gateway"]["serial_number"] == "10000000a1b2c3d4"
    assert {n["usb_serial"] for n in ids["nodes"]} == {"0001A3F2", "0001A40C"}
    assert set(b.serial_ports()) == {"adapter rs485", "node bench-node-01", "node bench-node-02", "relay",
                                     "fault injector"}


@pytest.mark.parametrize(("change", "field", "says"), [
    (('cuts = "node:bench-node-02"', 'cuts = "node:bench-node-09"'), "relay.channels[1].cuts",
     "no node 'bench-node-09'"),
    (('usb_serial = "0001A3F2"', 'usb_seral = "0001A3F2"'), "nodes[0].usb_serial", "is 'usb_seral' a typo for it?"),
    (('location = "bench, right"', 'locaton = "bench, right"'), "nodes[1].locaton",
     "unknown key; did you mean 'location'?"),
    (("unit = 2\nmeasures", "unit = 3\nmeasures"), "devices[1].unit", "polls 'rain' on bus 'rs485' unit 2"),
    (('by_id = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A10K4S2B-if00-port0"\n  model = "FTDI',
      'by_id = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A10K4S2B-if00-port1"\n  model = "FTDI'),
     "gateway.adapters[0].by_id", "opens"),
    (('by_id = "/dev/serial/by-id/usb-Silicon_Labs_CP2102_USB_to_UART_Bridge_Controller_0001A40C-if00-port0"',
      'by_id = "/dev/ttyUSB3"'), "nodes[1].by_id", "not a /dev/serial/by-id/ path"),
    (('site = "example-pi-bench.site.toml"', 'site = "nowhere.toml"'), "gateway.site", "no such file"),
    (('device_id = "bench-node-02"', 'device_id = "bench-node-01"'), "nodes[1].device_id", "listed twice"),
    (('device_id = "bench-node-02"', 'device_id = "bench/node+2"'), "nodes[1].device_id", "use 1-64 letters"),
    (('driver = "modbus_rtu"', 'driver = "gpio"'), "relay.driver", "not one of modbus_rtu"),
    (('bus = "rs485"\nusb_serial = "A10K9Z7M"', 'bus = "rs232"\nusb_serial = "A10K9Z7M"'), "fault_injector.bus",
     "not an RTU bus"),
])
def test_a_bad_bench_file_is_refused_naming_the_file_and_the_field(tmp_path: Path, change: tuple[str, str], field: str,
                                                                   says: str) -> None:
    old, new = change
    assert old in EXAMPLE.read_text(), f"the example no longer has {old!r}: update the test"
    path = bench_dir(tmp_path, text=EXAMPLE.read_text().replace(old, new, 1))
    with pytest.raises(TargetError) as err:
        load_bench(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {field}: "), message
    assert says in message, message


def test_bench_file_syntax_and_site_errors_name_the_file(tmp_path: Path) -> None:
    path = bench_dir(tmp_path, text="[gateway\nsite = 1")
    with pytest.raises(TargetError, match=rf"^{path}: not valid TOML"):
        load_bench(path)
    path = bench_dir(tmp_path, text='[gateway]\nsite = "example-pi-bench.site.toml"\n')
    (path.parent / SITE.name).write_text(SITE.read_text().replace('interval_s = 2', 'interval_s = -2', 1))
    with pytest.raises(TargetError) as err:
        load_bench(path)
    assert str(err.value).startswith(f"{path}: gateway.site: the site file is not valid")
    assert "interval_s" in str(err.value)


def test_capabilities_come_from_what_the_bench_file_provides(tmp_path: Path) -> None:
    bare = load_bench(bench_dir(tmp_path, "bare", '[gateway]\nsite = "example-pi-bench.site.toml"\n'))
    assert capabilities_of(bare) == HOST_SIDE | {"rs485"}
    relay_for_a_sensor_only = EXAMPLE.read_text().split("[relay]")[0].split("[[nodes]]")[0] + textwrap.dedent("""
        [relay]
        driver = "modbus_rtu"
        usb_serial = "B20M7Q1X"
        unit = 1
          [[relay.channels]]
          channel = 2
          cuts = "device:radar"
    """)
    caps = capabilities_of(load_bench(bench_dir(tmp_path, "sensor-relay", relay_for_a_sensor_only)))
    assert "sensor_power" in caps and "node_power" not in caps and "nodes" not in caps
    assert SIM.capabilities == frozenset(CAPABILITIES)
    assert SIM.lacks({"node_power", "simulated_devices"}) == []


def test_targets_resolve_from_the_option_the_environment_or_the_old_site_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = bench_dir(tmp_path, "lab")
    monkeypatch.setenv("YUJING_HIL_BENCH_DIR", str(path.parent))
    monkeypatch.delenv("YUJING_HIL_TARGET", raising=False)
    monkeypatch.delenv("YUJING_HIL_SITE", raising=False)
    assert resolve(None) is SIM and resolve("sim") is SIM
    t = resolve("bench:lab")
    assert (t.kind, t.name, t.label) == ("bench", "lab", "bench:lab") and "node_power" in t.capabilities
    monkeypatch.setenv("YUJING_HIL_TARGET", "bench:lab")
    assert resolve(None).label == "bench:lab"
    assert resolve("sim") is SIM  # the option wins over the environment
    with pytest.raises(TargetError, match=r"no bench file .*nope\.toml \(benches there: lab\)"):
        resolve("bench:nope")
    with pytest.raises(TargetError, match="write `sim` or `bench:<name>`"):
        resolve("hardware")
    monkeypatch.delenv("YUJING_HIL_TARGET")
    monkeypatch.setenv("YUJING_HIL_SITE", str(SITE))  # the older way: a bench that is a site file only
    t = resolve(None)
    assert (t.kind, t.name) == ("bench", "example-pi-bench.site") and t.bench is not None and t.bench.site == SITE
    assert t.capabilities == HOST_SIDE | {"rs485"}


def run_pytest(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "hil_tests.plugin", "-q", "-rs",
                           "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


SCENARIOS = '''
import pytest

pytestmark = pytest.mark.hil


@pytest.mark.needs("node_power")
def test_cuts_a_nodes_power():
    pass


@pytest.mark.needs("simulated_devices", "network_faults")
def test_builds_its_own_devices():
    pass


def test_runs_anywhere(hil_target):
    assert hil_target.label in ("sim", "bench:lab")
'''


def test_a_scenario_is_skipped_naming_the_missing_capability_and_the_target(tmp_path: Path) -> None:
    path = bench_dir(tmp_path, "lab", '[gateway]\nsite = "example-pi-bench.site.toml"\n')
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_caps.py").write_text(SCENARIOS)
    (tests / "pytest.ini").write_text("[pytest]\n")
    env = {**os.environ, "YUJING_HIL_BENCH_DIR": str(path.parent), "YUJING_HIL_LOCK_DIR": str(tmp_path / "locks")}
    env.pop("YUJING_HIL_TARGET", None)
    out = run_pytest([str(tests), "--target", "bench:lab", "--hil-report", str(tmp_path / "r.json")], env)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    by = {s["nodeid"].split("::")[-1]: s for s in report["scenarios"]}
    assert by["test_cuts_a_nodes_power"]["outcome"] == "skip"
    assert by["test_cuts_a_nodes_power"]["reason"].startswith("needs node_power; target bench:lab lacks it (it has: ")
    assert by["test_builds_its_own_devices"]["reason"].startswith("needs simulated_devices; target bench:lab lacks it")
    assert by["test_runs_anywhere"]["outcome"] == "pass"
    assert report["target"] == "bench:lab" and report["hardware"]["simulated"] is False
    assert "needs node_power; target bench:lab lacks it" in out.stdout  # -rs shows the reason too
    out = run_pytest([str(tests), "--hil-report", str(tmp_path / "r.json")], env)  # sim has them all
    assert out.returncode == 0 and "3 passed" in out.stdout, out.stdout + out.stderr
    # A bench whose adapters are not plugged in: a scenario that uses it is an infra error naming them.
    bench_dir(tmp_path, "full")
    out = run_pytest([str(tests), "--target", "bench:full", "--hil-report", str(tmp_path / "r.json")], env)
    assert out.returncode == 1, out.stdout + out.stderr
    by = {s["nodeid"].split("::")[-1]: s for s in json.loads((tmp_path / "r.json").read_text())["scenarios"]}
    assert by["test_runs_anywhere"]["outcome"] == "infra"
    assert "bench full: not plugged in: adapter rs485 (USB serial A10K4S2B" in by["test_runs_anywhere"]["reason"]
    assert by["test_cuts_a_nodes_power"]["outcome"] == "pass"  # it takes no bench fixture


def test_an_unknown_capability_is_an_error_not_a_silent_skip(tmp_path: Path) -> None:
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "pytest.ini").write_text("[pytest]\n")
    (tests / "test_typo.py").write_text("import pytest\n\n@pytest.mark.hil\n@pytest.mark.needs('rs485_faults')\n"
                                        "def test_typo():\n    pass\n")
    out = run_pytest([str(tests), "--hil-report", str(tmp_path / "r.json")], dict(os.environ))
    assert out.returncode == 1
    assert "unknown capabilities ['rs485_faults']" in out.stdout


HOLD = """
import sys, time
from hil_tests.targets import BenchLock
lock = BenchLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_two_runs_cannot_use_one_bench_and_a_dead_holder_does_not_block(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    locks = tmp_path / "locks"
    monkeypatch.setenv("YUJING_HIL_LOCK_DIR", str(locks))
    env = {**os.environ, "YUJING_HIL_LOCK_DIR": str(locks)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "lab"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(BenchBusy) as err:
            BenchLock("lab").acquire()
        assert f"bench 'lab' is in use by pid {holder.pid} on " in str(err.value)
        assert str(locks / "lab.lock") in str(err.value)
        with BenchLock("other") as other:  # another bench is free
            assert other.holder()["pid"] == os.getpid()
        # A whole second run is refused before anything runs, and says who holds the bench.
        path = bench_dir(tmp_path, "lab", '[gateway]\nsite = "example-pi-bench.site.toml"\n')
        env["YUJING_HIL_BENCH_DIR"] = str(path.parent)
        out = run_pytest(["hil_tests/test_scenarios.py", "--target", "bench:lab"], env)
        assert out.returncode == 4, out.stdout + out.stderr
        assert f"bench 'lab' is in use by pid {holder.pid}" in out.stderr
        # Another file that describes the same bench (by its name) is refused too.
        bench_dir(tmp_path, "lab-nodes", '[bench]\nname = "lab"\n[gateway]\nsite = "example-pi-bench.site.toml"\n')
        out = run_pytest(["hil_tests/test_scenarios.py", "--target", "bench:lab-nodes"], env)
        assert out.returncode == 4 and f"bench 'lab' is in use by pid {holder.pid}" in out.stderr, out.stderr
    finally:
        holder.send_signal(signal.SIGKILL)  # a run that dies without cleaning up: the kernel drops its flock
        holder.wait()
    with BenchLock("lab") as lock:
        assert lock.holder()["pid"] == os.getpid()
        assert json.loads((locks / "lab.lock").read_text())["pid"] == os.getpid()
    assert (locks / "lab.lock").read_text() == ""  # released: nobody named as the holder


def test_the_bench_format_document_shows_the_example_as_it_is() -> None:
    doc = (ROOT / "docs" / "hil-bench.md").read_text()
    assert EXAMPLE.read_text() in doc and SITE.read_text() in doc
