"""`yujing provision install`: two simulated boards (real MicroPython behind ptys, real mpremote) found by USB serial
number through a udev-style by-id folder, provisioned in parallel, killed mid-copy, resumed from the journal, and
verified online on a real mosquitto that runs the broker files the run itself rewrote and reloaded.

The boards' `machine.reset()` is a fake in the simulated board's boot code (the unix port has no `machine`): it notes
the reset on the board's flash and ends the interpreter, which the simulated board restarts. Since the node firmware
does not run under the unix port in these tests, a stand-in thread plays the node's network side at each reset: it
reads /config.json and /secrets.json from the board's flash (what the run wrote there) and publishes a genuine birth
and data with those credentials (tests/test_provision_verify.py's publish_as_node).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provisioning import discover
from provisioning.inventory import Inventory
from provisioning.simboard import SimBoard, micropython_executable
from provisioning.workflow import Site
from tests.test_provision_board import FLASH
from tests.test_provision_verify import PREFIX, SITE, SiteBroker, publish_as_node, start_site_broker

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"
PAD = 60_000  # random bytes, as hex: a 120 kB config takes seconds over the pty, long enough to be cut
# machine.reset() as on a board: the board restarts (here: the interpreter ends and the simulated board starts a
# new one); the note on flash tells the stand-in node that it booted
FAKE_RESET = ("import sys\nclass machine:\n    @staticmethod\n    def reset():\n"
              "        f = open('/resets.txt', 'a')\n        f.write('r\\n')\n        f.close()\n"
              "        sys.exit()\nsys.modules['machine'] = machine\ndel machine, sys")


def by_id_name(serial: str) -> str:
    return f"usb-MicroPython_Board_in_FS_mode_{serial}-if00"  # as udev names a MicroPython board's USB CDC port


class StandInNodes:
    """At every reset of a board, publish as the node that the board's flash says it is."""

    def __init__(self, boards: list[SimBoard], broker: SiteBroker) -> None:
        self.boards, self.broker = boards, broker
        self.seen = {b.port: 0 for b in boards}
        self.births: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StandInNodes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        session = 100
        while not self._stop.wait(0.05):
            for b in self.boards:
                resets = b.flash / "resets.txt"
                n = resets.read_text().count("r") if resets.exists() else 0
                if n <= self.seen[b.port]:
                    continue
                self.seen[b.port] = n
                config = json.loads((b.flash / "config.json").read_text())
                secrets = json.loads((b.flash / "secrets.json").read_text())
                session += 1
                asyncio.run(publish_as_node(self.broker.port, secrets["mqtt_username"], secrets["mqtt_password"],
                                            site=config["site"], birth_id=config["node_id"], session=session))
                self.births.append(config["node_id"])


Bench = tuple[Site, SiteBroker, list[SimBoard], Path]  # the site, its broker, two boards, the by-id folder


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    try:
        micropython_executable()
    except RuntimeError as exc:
        pytest.fail(f"{exc} (the test extra installs it)")
    site = Site(tmp_path / "site")
    site.init(SITE, PREFIX)
    broker = start_site_broker(tmp_path, site)
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    boards = []
    try:
        for serial in ("e6614c311b2a0a07", "e6614c311b2a0a08"):
            b = SimBoard(tmp_path / f"flash-{serial}", flash_size=FLASH, boot_code=FAKE_RESET).start()
            boards.append(b)
            (by_id / by_id_name(serial)).symlink_to(b.port)
        yield site, broker, boards, by_id
    finally:
        for b in boards:
            b.stop()
        broker.stop()


def firmware_snapshot(tmp_path: Path) -> Path:
    """The firmware as it is now, so every run of a test installs the same bytes (the tree may be edited meanwhile)."""
    fw = tmp_path / "firmware"
    if not fw.exists():
        fw.mkdir()
        shutil.copy(FIRMWARE / "main.py", fw / "main.py")
        shutil.copytree(FIRMWARE / "yujing_node", fw / "yujing_node", ignore=shutil.ignore_patterns("__pycache__"))
    return fw


def write_plan(tmp_path: Path, broker: SiteBroker, configs: dict[str, bytes], timeout_s: float = 20) -> Path:
    nodes = ""
    for node_id, cfg in configs.items():
        (tmp_path / f"{node_id}.json").write_bytes(cfg)
        serial = "e6614c311b2a0a" + node_id[-2:]
        nodes += (f'\n[[nodes]]\nid = "{node_id}"\nserial = "{serial}"\nlocation = "slope 3, post {node_id[-2:]}"\n'
                  f'config = "{node_id}.json"\n')
    plan = tmp_path / "plan.toml"
    plan.write_text(f'firmware = "{firmware_snapshot(tmp_path)}"\nbroker_files = "{broker.files}"\n'
                    f'broker_reload = "kill -HUP {broker.proc.pid}"\n'
                    f'[broker]\nhost = "127.0.0.1"\nport = {broker.tls_port}\ntls = true\n'
                    f'timeout_s = {timeout_s}\n{nodes}')
    return plan


def install(site: Site, plan: Path, by_id: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "provisioning.cli", "--site-dir", str(site.root), "--technician", "li", "install",
            "--plan", str(plan), "--by-id-dir", str(by_id), *extra]


def config(node_id: str, pad: int = 0) -> bytes:
    doc: dict[str, object] = {"node_id": node_id, "site": SITE, "sample_period_s": 60}
    if pad:
        doc["pad"] = os.urandom(pad).hex()  # a long file, so the copy takes seconds over the pty and can be cut
    return json.dumps(doc).encode()


def test_two_boards_in_parallel_killed_mid_copy_then_resumed(bench: Bench, tmp_path: Path) -> None:
    site, broker, (a, b), by_id = bench
    old = b'{"node_id": "slope-07", "site": "xishan", "installed": "last year"}'
    (a.flash / "config.json").write_bytes(old)  # what board A runs with today
    plan = write_plan(tmp_path, broker, {"slope-07": config("slope-07", pad=PAD), "slope-08": config("slope-08")})

    # 1. the laptop dies while board A's new config is on its way
    t0 = time.monotonic()
    proc = subprocess.Popen(install(site, plan, by_id), cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    tmp_on_board = a.flash / "config.json.yjtmp"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not tmp_on_board.exists() or tmp_on_board.stat().st_size < 10_000):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    first_out = proc.communicate(timeout=10)[0]
    print(f"\nfirst run, killed after {time.monotonic() - t0:.1f} s:\n{first_out}")
    assert 0 < tmp_on_board.stat().st_size < len(config("slope-07", pad=PAD))
    assert (a.flash / "config.json").read_bytes() == old  # the old config stays in force
    journal = json.loads((site.root / "journal.json").read_text())
    assert journal["nodes"]["slope-07"]["steps"]["files"]["status"] == "running"  # cut in the middle of it
    assert journal["nodes"]["slope-07"]["steps"]["identity"]["status"] == "done"
    assert "finished" not in journal["runs"][-1]

    # 2. the rerun completes both, skipping what the journal says is done, and both come online
    with StandInNodes([a, b], broker) as nodes:
        t0 = time.monotonic()
        again = subprocess.run(install(site, plan, by_id), cwd=ROOT, capture_output=True, text=True, timeout=120)
        print(f"rerun, {time.monotonic() - t0:.1f} s:\n{again.stdout}{again.stderr}")
        assert again.returncode == 0, again.stdout + again.stderr
    assert sorted(nodes.births) == ["slope-07", "slope-08"]
    # the plan's config with its mqtt section set for TLS (the broker from the plan), and the node's DER TLS files
    want = json.loads((tmp_path / "slope-07.json").read_bytes())
    want["mqtt"] = {"tls": True, "host": "127.0.0.1", "port": broker.tls_port}
    assert json.loads((a.flash / "config.json").read_bytes()) == want
    cert = x509.load_pem_x509_certificate((site.store.folder("slope-07") / "client.crt").read_bytes())
    assert (a.flash / "cert.der").read_bytes() == cert.public_bytes(serialization.Encoding.DER)
    assert serialization.load_der_private_key((a.flash / "key.der").read_bytes(), None).public_key() == \
        cert.public_key()
    assert (a.flash / "ca.der").read_bytes() == x509.load_pem_x509_certificate(
        site.store.ca_cert_path.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert not tmp_on_board.exists()
    lines = again.stdout.splitlines()
    assert any(ln.split()[:3] == ["slope-07", "identity", "skipped"] for ln in lines)  # issued before the kill
    assert any(ln.split()[:3] == ["slope-07", "files", "done"] for ln in lines)  # redone: it was cut
    assert any(ln.startswith("slope-07: online after") and "crack.opening=1.25 mm" in ln for ln in lines)
    assert any(ln.startswith("slope-08: online after") for ln in lines)
    assert "2 of 2 nodes done" in lines[-1] and "(resumed from the journal)" in lines[-1]
    journal = json.loads((site.root / "journal.json").read_text())
    assert journal["runs"][-1]["resumed"] is True and journal["runs"][-1]["outcome"] == "ok"
    assert {n: journal["nodes"][n]["status"] for n in ("slope-07", "slope-08")} == {"slope-07": "online",
                                                                                    "slope-08": "online"}
    # the inventory knows both boards by their USB serial; the secrets on the boards are the identities'
    inv = Inventory.load(site.inventory_path)
    assert inv.devices["slope-07"].board_serial == "e6614c311b2a0a07" and inv.devices["slope-07"].kind == "node"
    assert inv.devices["slope-07"].config_hash and inv.devices["slope-07"].firmware_hash
    on_board = json.loads((b.flash / "secrets.json").read_text())
    assert on_board["mqtt_password"] == site.store.password("slope-08")
    assert on_board["command_key"] == site.store.command_key("slope-08", create=False).hex()
    for out in (first_out, again.stdout, again.stderr, (site.root / "journal.json").read_text()):
        for n in ("slope-07", "slope-08", "platform"):
            assert site.store.password(n) not in out  # no secret printed or journaled
            if n != "platform":
                assert site.store.command_key(n, create=False).hex() not in out

    # 3. once more with nothing changed: nothing is copied and no board is touched
    third = subprocess.run(install(site, plan, by_id), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "already online" in third.stdout and "0 bytes copied" in third.stdout.splitlines()[-1]


def test_an_unknown_serial_and_a_wrong_config_are_refused_before_any_copy(bench: Bench, tmp_path: Path) -> None:
    site, broker, (a, b), by_id = bench
    swapped = write_plan(tmp_path, broker, {"slope-07": config("slope-08"), "slope-08": config("slope-08")})
    out = subprocess.run(install(site, swapped, by_id), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "slope-07: config" in out.stderr and "has node_id 'slope-08', the plan says 'slope-07'" in out.stderr
    assert not (a.flash / "config.json").exists() and not (site.root / "identities" / "slope-07").exists()

    plan = write_plan(tmp_path, broker, {"slope-07": config("slope-07"), "slope-09": config("slope-09")}, timeout_s=2)
    out = subprocess.run(install(site, plan, by_id, "--fresh"), cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert out.returncode == 1  # slope-09 has no board; slope-07 is installed but nothing comes online (no node runs)
    assert "slope-07: FAILED at online: no birth within 2 s: check the node's network" in out.stdout
    assert "slope-09: FAILED at find: no board with serial number e6614c311b2a0a09 is attached" in out.stdout
    assert "e6614c311b2a0a07" in out.stdout and "e6614c311b2a0a08" in out.stdout  # the attached ones are listed
    journal = json.loads((site.root / "journal.json").read_text())
    assert journal["nodes"]["slope-09"]["failed_step"] == "find"


def test_boards_are_listed_and_an_unnamed_choice_among_two_is_refused(bench: Bench) -> None:
    site, broker, (a, b), by_id = bench
    found = discover.list_boards(by_id, ports=[])
    assert [(x.serial_number, x.device, x.by_id) for x in found] == [
        ("e6614c311b2a0a07", os.path.realpath(a.port), str(by_id / by_id_name("e6614c311b2a0a07"))),
        ("e6614c311b2a0a08", os.path.realpath(b.port), str(by_id / by_id_name("e6614c311b2a0a08")))]
    cli = [sys.executable, "-m", "provisioning.cli", "--site-dir", str(site.root)]
    listed = subprocess.run([*cli, "boards", "--by-id-dir", str(by_id)], capture_output=True, text=True, cwd=ROOT)
    assert listed.returncode == 0 and "e6614c311b2a0a07" in listed.stdout and "2 boards: name one" in listed.stdout
    refused = subprocess.run([*cli, "preflight", "--by-id-dir", str(by_id)], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2
    assert "2 boards are attached and none was named; choose one with --serial SERIAL" in refused.stderr
    assert "e6614c311b2a0a07" in refused.stderr and "e6614c311b2a0a08" in refused.stderr
    assert a.soft_resets == b.soft_resets == 0  # neither board was touched
    chosen = subprocess.run([*cli, "preflight", "--serial", "E6614C311B2A0A08", "--by-id-dir", str(by_id)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert chosen.returncode == 0, chosen.stderr
    assert f"board on {by_id / by_id_name('e6614c311b2a0a08')}" in chosen.stdout  # by its stable by-id name
    assert b.soft_resets > 0 and a.soft_resets == 0


def test_ctrl_c_stops_every_board_and_the_journal_says_interrupted(bench: Bench, tmp_path: Path) -> None:
    site, broker, (a, b), by_id = bench
    plan = write_plan(tmp_path, broker, {"slope-07": config("slope-07", pad=PAD), "slope-08": config("slope-08")})
    proc = subprocess.Popen(install(site, plan, by_id), cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    tmp_on_board = a.flash / "config.json.yjtmp"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not tmp_on_board.exists() or tmp_on_board.stat().st_size < 10_000):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: the tool and its mpremote processes
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, out + err
    assert "interrupted: the boards keep their old files" in err and "run the same command again" in err
    assert not (a.flash / "config.json").exists()  # the cut copy was never put in force
    journal = json.loads((site.root / "journal.json").read_text())
    assert journal["runs"][-1]["outcome"] == "interrupted"
    assert journal["nodes"]["slope-07"]["status"] == "interrupted"
    assert journal["nodes"]["slope-07"]["steps"]["files"]["status"] == "running"
