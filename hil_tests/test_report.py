"""The HIL report (hil_tests/plugin.py) and the `python -m hil_tests` command, on a pytest run of their own: every
outcome a scenario can have, the rerun of a failed one with the same seed, the JUnit XML, the hashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .__main__ import main_figures, summary
from .plugin import FIRMWARE, firmware_id, software_id, tree_hash

ROOT = Path(__file__).parent.parent

SCENARIOS = '''
import os
from pathlib import Path

import pytest

from hil_tests.report import InfraError

pytestmark = pytest.mark.hil
ATTEMPTS = Path(os.environ["ATTEMPTS"])


def test_passes(hil_report, tmp_path):
    hil_report.seed = int(os.environ["YUJING_HIL_SEED"])
    hil_report.fault("net.blackhole", 1.5, seconds=8.0)
    hil_report.fault("rs485.flip", flip_rate=0.5)
    hil_report.figures.update(lost=0, duplicates=3, latency_p50_s=0.12, latency_p99_s=0.9, recovery_s=1.25)
    hil_report.log("gateway", "/var/log/gw.log")


def test_fails(hil_report):
    hil_report.seed = 7
    assert 1 + 1 == 3, "the gateway lost 4 readings"


def test_flaky(hil_report):
    seed = int(os.environ["YUJING_HIL_SEED"])
    hil_report.seed = seed
    with ATTEMPTS.open("a") as f:
        f.write(f"{seed}\\n")
    assert len(ATTEMPTS.read_text().split()) > 1, "failed on the first attempt"


@pytest.fixture
def no_pty():
    raise OSError("out of pseudo-terminals")


def test_cannot_build_its_rig(no_pty):
    pass


def test_says_its_rig_failed(hil_report):
    with hil_report.infrastructure():
        raise ConnectionRefusedError("mosquitto did not start")


def test_skips():
    pytest.skip("no relay on this bench")


@pytest.mark.xfail(strict=True, reason="a known bug, see issue 11")
def test_known_bug():
    assert False


@pytest.mark.needs("node_kill")
def test_needs_the_sim():
    pass

'''


def scenario_dir(tmp_path: Path) -> Path:
    d = tmp_path / "scenarios"
    d.mkdir()
    (d / "pytest.ini").write_text("[pytest]\n")  # its own rootdir: the repository's options do not apply
    (d / "test_outcomes.py").write_text(SCENARIOS)
    (d / "test_plain.py").write_text("def test_plain():\n    pass\n")  # no hil marker: not in the report
    return d


def env_for(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "YUJING_HIL_SEED": "4242", "ATTEMPTS": str(tmp_path / "attempts")}
    env.pop("YUJING_HIL_TARGET", None)
    env.pop("YUJING_HIL_SITE", None)
    return env


def test_the_report_has_every_outcome_the_rerun_and_the_junit(tmp_path: Path) -> None:
    d = scenario_dir(tmp_path)
    report_path, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "hil_tests.plugin", "-q", "-p", "no:cacheprovider",
                          str(d), "--hil-report", str(report_path), f"--junitxml={junit}"],
                         cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1, out.stdout + out.stderr  # a failure and infra errors fail the run; flaky does not
    report = json.loads(report_path.read_text())
    by = {s["nodeid"].split("::")[-1]: s for s in report["scenarios"]}
    assert {k: v["outcome"] for k, v in by.items()} == {
        "test_passes": "pass", "test_fails": "fail", "test_flaky": "flaky", "test_cannot_build_its_rig": "infra",
        "test_says_its_rig_failed": "infra", "test_skips": "skip", "test_known_bug": "xfail",
        "test_needs_the_sim": "pass"}
    assert report["totals"] == {"pass": 2, "fail": 1, "flaky": 1, "infra": 2, "skip": 1, "xfail": 1}
    assert report["flaky"] == [by["test_flaky"]["nodeid"]] and report["flaky_fails_run"] is False

    p = by["test_passes"]
    assert p["seed"] == 4242
    assert p["faults"][0] == {"kind": "net.blackhole", "t": 1.5, "seconds": 8.0}
    assert p["faults"][1]["kind"] == "rs485.flip" and p["faults"][1]["flip_rate"] == 0.5 and p["faults"][1]["t"] >= 0
    assert p["figures"] == {"lost": 0, "duplicates": 3, "latency_p50_s": 0.12, "latency_p99_s": 0.9, "recovery_s": 1.25}
    assert p["logs"] == {"gateway": "/var/log/gw.log"} and p["duration_s"] >= 0
    assert "the gateway lost 4 readings" in by["test_fails"]["reason"] and by["test_fails"]["phase"] == "call"
    assert "first_attempt" in by["test_fails"]  # it was run again, and failed again
    # Flaky: run twice, with the same seed, and the first attempt's error is kept.
    assert (tmp_path / "attempts").read_text().split() == ["4242", "4242"]
    assert "failed on the first attempt" in by["test_flaky"]["first_attempt"]["reason"]
    assert by["test_flaky"]["first_attempt"]["outcome"] == "fail"
    assert by["test_cannot_build_its_rig"]["phase"] == "setup"
    assert "out of pseudo-terminals" in by["test_cannot_build_its_rig"]["reason"]
    assert "first_attempt" not in by["test_cannot_build_its_rig"]  # infra is not retried
    assert "mosquitto did not start" in by["test_says_its_rig_failed"]["reason"]
    assert "first_attempt" not in by["test_says_its_rig_failed"]
    assert by["test_skips"]["reason"] == "no relay on this bench"
    assert by["test_known_bug"]["reason"] == "a known bug, see issue 11"

    assert report["target"] == "sim" and report["hardware"]["simulated"] is True
    assert report["seed"] == 4242 and report["seed_source"] == "YUJING_HIL_SEED"
    assert report["firmware"] == firmware_id()
    assert report["software"] == software_id()
    assert "FLAKY: 1 HIL scenario(s) failed once and passed when run again" in out.stdout
    assert "INFRA: 2 HIL scenario(s) could not run" in out.stdout

    # JUnit: one testcase per test (the second attempt's), with the HIL outcome as a property.
    cases = ET.parse(junit).getroot().iter("testcase")
    props = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")} for c in cases}
    assert set(props) == set(by) | {"test_plain"}
    assert props["test_flaky"]["hil_outcome"] == "flaky"
    assert props["test_flaky"]["hil_first_attempt"].startswith("fail: ")
    assert props["test_says_its_rig_failed"]["hil_outcome"] == "infra"
    assert props["test_plain"] == {}


HANGS_SECOND_TIME = """
import os, time
from pathlib import Path
import pytest

@pytest.mark.hil
@pytest.mark.timeout(3)
def test_fails_then_hangs():
    marker = Path(os.environ["ATTEMPTS"])
    if not marker.exists():
        marker.write_text("x")
        assert False, "failed on the first attempt"
    time.sleep(8)
"""


def test_the_second_attempt_is_timed_too(tmp_path: Path) -> None:
    """pytest-timeout stops its timer when a test fails (pytest_exception_interact): the rerun sets it again, so a
    second attempt that hangs is stopped at the test's timeout, not left to hang CI."""
    d = tmp_path / "hang"
    d.mkdir()
    (d / "pytest.ini").write_text("[pytest]\n")
    (d / "test_hang.py").write_text(HANGS_SECOND_TIME)
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "hil_tests.plugin", "-q", "-p", "no:cacheprovider",
                          str(d), "--hil-report", str(tmp_path / "r.json")],
                         cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    (scenario,) = json.loads((tmp_path / "r.json").read_text())["scenarios"]
    assert scenario["outcome"] == "fail" and "Timeout (>3.0s)" in scenario["reason"], scenario


def test_the_command_prints_a_table_and_fails_on_a_failure(tmp_path: Path) -> None:
    d = scenario_dir(tmp_path)
    out = subprocess.run([sys.executable, "-m", "hil_tests", "--seed", "99", "--report", str(tmp_path / "r.json"),
                          "--junit", str(tmp_path / "j.xml"), "-k", "passes or skips or flaky", str(d)],
                         cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr  # a flaky scenario does not fail the run…
    lines = out.stdout.splitlines()
    row = next(x for x in lines if "test_passes" in x)
    assert row.split()[1:8] == ["pass", "99", "0", "3", "0.12", "0.9", "1.25"]
    assert any(x.startswith("FLAKY ") and "test_flaky" in x for x in lines)
    assert "totals: flaky 1, pass 1, skip 1" in out.stdout
    (tmp_path / "attempts").unlink()
    out = subprocess.run([sys.executable, "-m", "hil_tests", "--strict-flaky", "--report", str(tmp_path / "r.json"),
                          "--junit", str(tmp_path / "j.xml"), "-k", "flaky", str(d)],
                         cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1, out.stdout + out.stderr  # …unless asked to
    out = subprocess.run([sys.executable, "-m", "hil_tests", "--report", str(tmp_path / "r.json"),
                          "--junit", str(tmp_path / "j.xml"), "-k", "cannot_build", str(d)],
                         cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1 and "INFRA " in out.stdout, out.stdout + out.stderr


def test_the_table_reads_the_usual_shapes_of_figures() -> None:
    assert main_figures({"lost": 0, "duplicate_seqs": 2, "latency_s": {"all": {"p50": 0.1, "p99": 2.0}},
                         "recovery_s": {"a": 0.5, "b": 3.0, "c": None}}) == \
        {"lost": 0, "dups": 2, "p50": 0.1, "p99": 2.0, "recovery": 3.0}
    assert main_figures({"latency_s": {"p50": 0.3, "p99": 0.4}, "max_recovery_s": 1.0})["recovery"] == 1.0
    assert main_figures({}) == {"lost": None, "dups": None, "p50": None, "p99": None, "recovery": None}
    assert main_figures({"recovery_s.restart": 2.5, "recovery_s.refuse": None, "recovery_s.x": 4.0})["recovery"] == 4.0
    text = summary({"target": "bench:lab", "firmware": {"sha256": "ab" * 32}, "software": {"git_commit": None,
                    "tree_sha256": "cd" * 32}, "seed": None, "totals": {"fail": 1},
                    "scenarios": [{"nodeid": "hil_tests/test_x.py::test_y", "outcome": "fail", "seed": 5, "figures": {},
                                   "duration_s": 1.0, "reason": "boom"}]})
    assert "HIL bench:lab  firmware abababababab  software tree cdcdcdcdcdcd  seed per scenario" in text
    assert "FAIL hil_tests/test_x.py::test_y: boom" in text


def test_tree_hash_covers_names_and_contents_and_skips_caches(tmp_path: Path) -> None:
    (tmp_path / "fw" / "pkg").mkdir(parents=True)
    (tmp_path / "fw" / "main.py").write_text("import pkg\n")
    (tmp_path / "fw" / "pkg" / "a.py").write_text("A = 1\n")
    parts = [tmp_path / "fw" / "main.py", tmp_path / "fw" / "pkg"]
    first, n = tree_hash(parts, tmp_path)
    assert n == 2 and len(first) == 64
    (tmp_path / "fw" / "pkg" / "__pycache__").mkdir()
    (tmp_path / "fw" / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert tree_hash(parts, tmp_path) == (first, 2)
    (tmp_path / "fw" / "pkg" / "a.py").write_text("A = 2\n")
    assert tree_hash(parts, tmp_path)[0] != first
    (tmp_path / "fw" / "pkg" / "a.py").write_text("A = 1\n")
    assert tree_hash(parts, tmp_path)[0] == first
    (tmp_path / "fw" / "pkg" / "a.py").rename(tmp_path / "fw" / "pkg" / "b.py")
    assert tree_hash(parts, tmp_path)[0] != first


def test_the_firmware_hash_is_over_main_py_and_the_node_package() -> None:
    fw = firmware_id()
    files = [FIRMWARE[0]] + [p for p in FIRMWARE[1].rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert fw["files"] == len(files) and FIRMWARE[0].name == "main.py"
    assert len(fw["sha256"]) == 64


def test_without_git_the_software_is_a_hash_of_the_package_tree(tmp_path: Path) -> None:
    (tmp_path / "gateway").mkdir()
    (tmp_path / "gateway" / "app.py").write_text("x = 1\n")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    sw = software_id(tmp_path)  # not a git work tree
    assert sw["git_commit"] is None and sw["files"] == 2 and len(sw["tree_sha256"]) == 64
    here = software_id()
    if here.get("git_commit"):
        assert len(here["git_commit"]) == 40 and isinstance(here["dirty"], bool)
