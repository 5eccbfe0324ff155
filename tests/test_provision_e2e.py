"""End to end with real parts only (issue 9, "Tests"): `yujing provision` (the CLI, as a subprocess) installs two
simulated boards attached at once, in parallel, over their ptys with real mpremote; each board is the MicroPython
unix port running the **real node firmware** (.mpy, with only the silicon faked: firmware/host/unix/hook.py), which
comes online over TLS with its own certificate on a real mosquitto configured from the files `yujing provision
broker-files` wrote (TLS listener, require_certificate, use_identity_as_username, the generated ACL, CRL and
password file); `yujing consume` (the CLI, as a subprocess, as the platform account with its certificate) decodes
what the nodes publish.

Then, on the same broker and boards (a module-scoped rig; the tests run in file order and each says what it needs):
a node's identity cannot publish on another node's topics; a copy killed mid-file leaves the old config in force (the
board, power-cycled, runs and publishes with its old config) and a rerun completes; a wrong port and an ambiguous
attach are refused with a clear message; `replace` + regenerated broker files + SIGHUP: the old node's certificate
is refused at the TLS handshake (the CRL) while the new node comes online.

Nothing is mocked but the silicon: the unix port has no pins, ADC or radio (firmware/host/unix fakes them; the
ADC reads <sim>/adc34) and no USB, so the by-id folder is a folder of udev-style symlinks to the boards' ptys.
"""

from __future__ import annotations

import getpass
import json
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provisioning.inventory import Inventory
from provisioning.node_files import Broker as NodeBroker
from provisioning.node_files import tls_config
from provisioning.simboard import SimBoard, micropython_executable
from provisioning.workflow import Site
from tests.conftest import free_port, wait_port
from tests.test_provision_install import FLASH, by_id_name, firmware_snapshot

ROOT = Path(__file__).resolve().parents[1]
UNIX_HOST = ROOT / "firmware" / "host" / "unix"
YUJING = str(Path(sys.executable).parent / "yujing")
SITE, PREFIX = "xishan", "yujing/v1"
SERIALS = {"slope-07": "e6614c311b2a0a07", "slope-08": "e6614c311b2a0a08"}
HEAP = "200K"  # the unix port is 64-bit: about an ESP32's ~100 KB for the same objects (bench/node_heap_tls.py)
FIRMWARE_VERSION = next(ln.split('"')[1] for ln in (ROOT / "firmware" / "yujing_node" / "__init__.py")
                        .read_text().splitlines() if ln.startswith("VERSION ="))  # what the node's birth says
ADC_RAW = 5338  # x 0.01 - 2.5 = 50.88 mm with the first config, x 0.01 - 1.5 = 51.88 mm with the second


def boot_code(sim: Path) -> str:
    sys.path.insert(0, str(UNIX_HOST))
    try:
        from hook import boot_code as hook_boot_code
    finally:
        sys.path.pop(0)
    # main.py is run by the SimBoard (run_main), not by the hook: only after power-on and hard resets, as a board
    # does, so mpremote's soft reset into the raw REPL is not taken over by the node's loop
    return str(hook_boot_code(sim, run_main=False))


def node_config(node_id: str, offset: str = "-2.5") -> dict[str, Any]:
    """A node's config as a technician writes it: the broker's host, no TLS settings (the tool sets them)."""
    return {
        "node_id": node_id, "site": SITE, "sample_period_s": 1, "watchdog_s": 30,
        "mqtt": {"host": "127.0.0.1", "keepalive_s": 60},
        "network": {"type": "wifi", "ssid": "site-ap"},
        "alarm_output": {"pin": 4, "level": "blue"},
        "sensors": [{"kind": "adc", "device": "crack", "point": "opening", "unit": "mm", "pin": 34,
                     "scale": "0.01", "offset": offset, "samples": 1}],
        "rules": [{"id": "crack.opening", "point": "crack/opening",
                   "levels": [{"level": "IV_BLUE", "set": "80", "clear": "79"}]}],
    }


# ---------------------------------------------------------------------------------------------- the rig

@dataclass
class Broker:
    conf: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_port("127.0.0.1", self.port)
        except TimeoutError:
            pytest.fail(f"mosquitto did not start with the generated files:\n{self.log.read_text()}")

    def reload(self) -> None:
        """SIGHUP: what a technician does after broker-files (mosquitto rereads passwd, ACL and the CRL)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


class Consumer:
    """`yujing consume` as the platform account (its certificate), every decoded line kept."""

    def __init__(self, broker: Broker, files: Path, platform: Path, err: Path) -> None:
        self.records: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.err = err
        self.proc = subprocess.Popen(
            [YUJING, "consume", "--broker", f"127.0.0.1:{broker.port}", "--ca-file", str(files / "ca.crt"),
             "--cert-file", str(platform / "client.crt"), "--key-file", str(platform / "client.key"),
             "--topic", f"{PREFIX}/{SITE}/#"],
            stdout=subprocess.PIPE, stderr=err.open("wb"), text=True, cwd=ROOT)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.records.append(json.loads(line))
                self.cond.notify_all()

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float, after: int = 0) -> dict[str, Any]:
        """The first record after index `after` for which pred holds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for r in self.records[after:]:
                    if pred(r):
                        return r
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"yujing consume printed no such record within {timeout} s; last: "
                                         f"{self.records[-4:]}; stderr: {self.err.read_text()[-800:]}")
                self.cond.wait(left)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


@dataclass
class Rig:
    work: Path
    site: Site
    files: Path  # what `broker-files` wrote, which mosquitto runs on
    broker: Broker
    boards: dict[str, SimBoard]  # by node id
    by_id: Path
    consumer: Consumer
    installs: list[str] = field(default_factory=list)  # stdout of each install run, for the report

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([YUJING, "provision", "--site-dir", str(self.site.root), "--technician", "li", *args],
                              capture_output=True, text=True, cwd=ROOT, check=False, timeout=timeout)

    def plan(self, name: str, nodes: dict[str, dict[str, Any]], ports: dict[str, str] | None = None) -> Path:
        """A plan file: the nodes with their configs, by USB serial number (or by port)."""
        body = ""
        for node_id, cfg in nodes.items():
            (self.work / f"{name}-{node_id}.json").write_text(json.dumps(cfg, indent=1))
            where = (f'port = "{ports[node_id]}"' if ports and node_id in ports
                     else f'serial = "{SERIALS.get(node_id) or SERIALS["slope-08"]}"')
            body += (f'\n[[nodes]]\nid = "{node_id}"\n{where}\nlocation = "slope 3, post {node_id[-2:]}"\n'
                     f'config = "{name}-{node_id}.json"\n')
        assert self.broker.proc is not None
        plan = self.work / f"{name}.toml"
        plan.write_text(f'firmware = "{firmware_snapshot(self.work)}"\nbroker_files = "{self.files}"\n'
                        f'broker_reload = "kill -HUP {self.broker.proc.pid}"\n'
                        f'[broker]\nhost = "127.0.0.1"\nport = {self.broker.port}\ntls = true\ntimeout_s = 40\n{body}')
        return plan

    def install(self, plan: Path) -> list[str]:
        return [YUJING, "provision", "--site-dir", str(self.site.root), "--technician", "li", "install",
                "--plan", str(plan), "--by-id-dir", str(self.by_id)]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    try:
        micropython_executable()
    except RuntimeError as exc:
        pytest.fail(f"{exc} (the test extra installs it)")
    work = tmp_path_factory.mktemp("provision-e2e")
    site = Site(work / "site")
    files = work / "broker"
    for args in (["init-site", SITE], ["broker-files", str(files), "--server-name", "127.0.0.1"]):
        done = subprocess.run([YUJING, "provision", "--site-dir", str(site.root), *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
    port = free_port()
    conf = work / "mosquitto.conf"
    # `user`: started as root, mosquitto would drop to "mosquitto", which cannot read the 0600 passwd
    conf.write_text(
        f"user {getpass.getuser()}\nper_listener_settings false\npersistence false\nallow_anonymous false\n"
        f"password_file {files / 'passwd'}\nacl_file {files / 'acl'}\n"
        f"listener {port} 127.0.0.1\ncafile {files / 'ca.crt'}\ncertfile {files / 'server.crt'}\n"
        f"keyfile {files / 'server.key'}\nrequire_certificate true\nuse_identity_as_username true\n"
        f"crlfile {files / 'crl.pem'}\n")
    broker = Broker(conf, port, work / "mosquitto.log")
    broker.start()
    by_id = work / "by-id"
    by_id.mkdir()
    boards: dict[str, SimBoard] = {}
    consumer = None
    try:
        for node_id, serial in SERIALS.items():
            sim = work / f"sim-{serial}"
            sim.mkdir()
            (sim / "adc34").write_text(str(ADC_RAW))
            b = SimBoard(work / f"flash-{serial}", flash_size=FLASH, heapsize=HEAP, boot_code=boot_code(sim),
                         run_main=True).start()
            boards[node_id] = b
            (by_id / by_id_name(serial)).symlink_to(b.port)  # both attached at once
        consumer = Consumer(broker, files, site.store.folder("platform"), work / "consume.err")
        yield Rig(work, site, files, broker, boards, by_id, consumer)
    finally:
        if consumer is not None:
            consumer.stop()
        for b in boards.values():
            b.stop()
        broker.stop()


@pytest.fixture(scope="module")
def installed(rig: Rig) -> tuple[subprocess.CompletedProcess[str], float]:
    """Both boards provisioned in parallel by `yujing provision install` (the first run on empty boards)."""
    plan = rig.plan("first", {n: node_config(n) for n in SERIALS})
    t0 = time.monotonic()
    done = subprocess.run(rig.install(plan), capture_output=True, text=True, cwd=ROOT, check=False, timeout=180)
    seconds = time.monotonic() - t0
    print(f"\nfirst install, two boards in parallel, {seconds:.1f} s:\n{done.stdout}{done.stderr}")
    rig.installs.append(done.stdout)
    return done, seconds


def pem_files(work: Path, name: str, cert_der: bytes, key_der: bytes) -> tuple[Path, Path]:
    """A node's DER files as taken off its flash, as PEM for Python's ssl."""
    cert, key = work / f"{name}.crt", work / f"{name}.key"
    cert.write_bytes(x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM))
    k = serialization.load_der_private_key(key_der, password=None)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))
    return cert, key


def mqtt_connect(rig: Rig, cert: Path, key: Path, client_id: str) -> tuple[str, str]:
    """Connect with this certificate: ("connack", its return code) or ("handshake", the TLS error): who refused."""
    ctx = ssl.create_default_context(cafile=str(rig.files / "ca.crt"))
    ctx.load_cert_chain(str(cert), str(key))
    # TLS 1.2: the broker checks the client certificate inside the handshake, so its refusal (the alert) ends the
    # handshake; with 1.3 it comes after the client's Finished and races the client's first write (EOF or the alert)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid  # MQTT 3.1.1, clean session
    with socket.create_connection(("127.0.0.1", rig.broker.port), 5) as raw:
        try:
            s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        except ssl.SSLError as exc:
            return "handshake", str(exc)
        with s:
            s.sendall(b"\x10" + bytes([len(body)]) + body)
            ack = s.recv(4)
    if len(ack) == 4 and ack[0] == 0x20:
        return "connack", str(ack[3])
    return "closed", ack.hex()


def publish_as(cert: Path, key: Path, rig: Rig, topic: str, payload: bytes) -> None:
    import paho.mqtt.client as paho

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"forger-{os.getpid()}")
    c.tls_set(ca_certs=str(rig.files / "ca.crt"), certfile=str(cert), keyfile=str(key))
    c.connect("127.0.0.1", rig.broker.port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


def platform_subscriber(rig: Rig, topic: str) -> Any:
    import paho.mqtt.client as paho

    q: queue.Queue[tuple[str, bytes]] = queue.Queue()
    subscribed: queue.Queue[bool] = queue.Queue()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"platform-probe-{os.getpid()}")
    d = rig.site.store.folder("platform")
    c.tls_set(ca_certs=str(rig.files / "ca.crt"), certfile=str(d / "client.crt"), keyfile=str(d / "client.key"))
    c.on_message = lambda cl, u, m: q.put((m.topic, bytes(m.payload)))
    c.on_subscribe = lambda *a: subscribed.put(True)
    c.connect("127.0.0.1", rig.broker.port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    subscribed.get(timeout=5)
    c.q = q
    return c


def reading(node: str, value: float) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r.get("gateway") == node and r.get("point") == "opening" and r.get("value") == value


# ---------------------------------------------------------------------------------------------- the tests

def test_two_boards_provisioned_in_parallel_come_online_with_tls_and_consume_decodes_them(
        rig: Rig, installed: tuple[subprocess.CompletedProcess[str], float]) -> None:
    done, _ = installed
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    # in parallel: each board was at work before the other one was done
    first_online = min(i for i, ln in enumerate(lines) if ln.split()[1:3] == ["online", "done"])
    for n in SERIALS:
        assert any(ln.split()[:3] == [n, "firmware", "running"] for ln in lines[:first_online]), lines
    for n in SERIALS:
        # the tool's verify step: a real birth (the firmware's, not a stand-in) and its first reading
        line = next(ln for ln in lines if ln.startswith(f"{n}: online after"))
        assert f"session 1, software {FIRMWARE_VERSION}, 1 points" in line, line
        assert "crack.opening=50.88 mm" in line, line
    assert "2 of 2 nodes done" in lines[-1]

    for n, b in rig.boards.items():
        # the TLS files, DER, each node its own certificate; the config set for TLS; the command key
        store = rig.site.store
        cert = x509.load_der_x509_certificate((b.flash / "cert.der").read_bytes())
        assert cert == x509.load_pem_x509_certificate((store.folder(n) / "client.crt").read_bytes())
        assert cert.subject.rfc4514_string() == f"CN={n}"
        assert (b.flash / "ca.der").read_bytes() == x509.load_pem_x509_certificate(
            store.ca_cert_path.read_bytes()).public_bytes(serialization.Encoding.DER)
        assert serialization.load_der_private_key((b.flash / "key.der").read_bytes(), None).public_key() == \
            cert.public_key()
        cfg = json.loads((b.flash / "config.json").read_text())
        assert cfg["mqtt"] == {"host": "127.0.0.1", "keepalive_s": 60, "tls": True, "port": rig.broker.port}
        secrets = json.loads((b.flash / "secrets.json").read_text())
        key_file = store.command_key_path(n)
        assert secrets["command_key"] == key_file.read_text().strip() and len(secrets["command_key"]) == 64
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert Inventory.load(rig.site.inventory_path).devices[n].command_key_file == f"identities/{n}/command.key"
        assert secrets["command_key"] not in rig.site.inventory_path.read_text()
        assert secrets["command_key"] not in done.stdout + done.stderr
    # the broker took each node by its certificate (use_identity_as_username: the CN is the username)
    log = rig.broker.log.read_text()
    for n in SERIALS:
        assert f"as yujing-{n} (" in log and f"u'{n}')" in log, log[-2000:]
    # and the platform's consumer decodes both nodes' readings
    for n in SERIALS:
        rec = rig.consumer.wait(reading(n, 50.88), timeout=20)
        assert rec["device"] == "crack" and rec["unit"] == "mm" and rec["quality"] == "good"


def test_a_nodes_certificate_cannot_publish_on_another_nodes_topics(rig: Rig, installed: Any) -> None:
    a = rig.boards["slope-07"]
    cert, key = pem_files(rig.work, "slope-07-taken", (a.flash / "cert.der").read_bytes(),
                          (a.flash / "key.der").read_bytes())  # what a thief reads off slope-07's flash
    sub = platform_subscriber(rig, f"{PREFIX}/{SITE}/+/reply")
    try:
        publish_as(cert, key, rig, f"{PREFIX}/{SITE}/slope-08/reply", b"forged by slope-07")
        publish_as(cert, key, rig, f"{PREFIX}/{SITE}/slope-07/reply", b"slope-07 on its own topic")
        seen = [sub.q.get(timeout=5)]
        time.sleep(0.5)  # anything else queued behind it
        while not sub.q.empty():
            seen.append(sub.q.get())
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert seen == [(f"{PREFIX}/{SITE}/slope-07/reply", b"slope-07 on its own topic")]


def test_a_wrong_port_and_an_ambiguous_attach_are_refused(rig: Rig) -> None:
    gone = str(rig.by_id / by_id_name("e6614c311b2a0aff"))
    out = rig.cli("preflight", gone, "--by-id-dir", str(rig.by_id))
    assert out.returncode == 2
    assert f"cannot open {gone}: it does not exist; is the board plugged in" in out.stderr, out.stderr

    # a port that is no serial port, in a plan: refused at `find`, before any identity is issued
    plan = rig.plan("wrong-port", {"slope-10": node_config("slope-10")}, ports={"slope-10": "/dev/null"})
    out = subprocess.run(rig.install(plan), capture_output=True, text=True, cwd=ROOT, check=False, timeout=60)
    assert out.returncode == 1
    assert "slope-10: FAILED at find: cannot open /dev/null: not a serial port" in out.stdout, out.stdout
    assert not rig.site.store.folder("slope-10").exists()

    out = rig.cli("preflight", "--by-id-dir", str(rig.by_id))  # two boards attached, none named
    assert out.returncode == 2
    assert "2 boards are attached and none was named; choose one with --serial SERIAL" in out.stderr, out.stderr
    assert SERIALS["slope-07"] in out.stderr and SERIALS["slope-08"] in out.stderr


def test_a_copy_killed_mid_file_leaves_the_old_config_in_force_and_a_rerun_completes(
        rig: Rig, installed: Any) -> None:
    a = rig.boards["slope-07"]
    old = (a.flash / "config.json").read_bytes()
    rig.consumer.wait(reading("slope-07", 50.88), timeout=20)
    before = [r for r in rig.consumer.records if r.get("gateway") == "slope-07"][-1]["session"]  # it runs now
    plan = rig.plan("second", {"slope-07": node_config("slope-07", offset="-1.5")})
    tmp = a.flash / "config.json.yjtmp"
    new, _ = tls_config((rig.work / "second-slope-07.json").read_bytes(), "new",
                        NodeBroker("127.0.0.1", rig.broker.port))
    proc = subprocess.Popen(rig.install(plan), cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not tmp.exists() or tmp.stat().st_size == 0:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)  # the laptop dies: the tool and its mpremote
    cut = tmp.stat().st_size
    proc.communicate(timeout=10)
    print(f"\nkilled with {cut} of {len(new)} bytes of the new config on the board")
    assert 0 < cut < len(new) and new.startswith(tmp.read_bytes())  # cut in the middle of the new config
    assert (a.flash / "config.json").read_bytes() == old

    # the board is unplugged and plugged in again: it boots (a new session) and runs with its old config
    n = len(rig.consumer.records)
    a.power_cycle()
    rec = rig.consumer.wait(lambda r: r.get("gateway") == "slope-07" and r["session"] != before, timeout=30, after=n)
    assert rec["value"] == 50.88, rec

    t0 = time.monotonic()
    again = subprocess.run(rig.install(plan), capture_output=True, text=True, cwd=ROOT, check=False, timeout=120)
    print(f"rerun, {time.monotonic() - t0:.1f} s:\n{again.stdout}{again.stderr}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert any(ln.startswith("slope-07: online after") and "crack.opening=51.88 mm" in ln
               for ln in again.stdout.splitlines()), again.stdout
    assert not tmp.exists() and (a.flash / "config.json").read_bytes() == new
    rig.consumer.wait(reading("slope-07", 51.88), timeout=20, after=n)


def test_a_replaced_nodes_certificate_is_refused_and_the_new_node_comes_online(rig: Rig, installed: Any) -> None:
    b = rig.boards["slope-08"]
    old_cert, old_key = pem_files(rig.work, "slope-08-old", (b.flash / "cert.der").read_bytes(),
                                  (b.flash / "key.der").read_bytes())  # still on the failed board
    assert mqtt_connect(rig, old_cert, old_key, "probe-before") == ("connack", "0")  # accepted until replaced

    out = rig.cli("replace", "slope-08", "slope-09")
    assert out.returncode == 0, out.stderr
    out = rig.cli("broker-files", str(rig.files), "--server-name", "127.0.0.1")
    assert out.returncode == 0, out.stderr
    rig.broker.reload()

    kind, why = mqtt_connect(rig, old_cert, old_key, "probe-after")
    print(f"\nthe old certificate after the replace: {kind}: {why}")
    assert (kind, "certificate revoked" in why) == ("handshake", True), (kind, why)  # the CRL, not the ACL

    n = len(rig.consumer.records)
    plan = rig.plan("replace", {"slope-09": node_config("slope-09")})  # on slope-08's board (its USB serial)
    done = subprocess.run(rig.install(plan), capture_output=True, text=True, cwd=ROOT, check=False, timeout=120)
    print(f"\nthe replacement:\n{done.stdout}{done.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(ln.startswith("slope-09: online after") for ln in done.stdout.splitlines()), done.stdout
    rig.consumer.wait(reading("slope-09", 50.88), timeout=20, after=n)
    new_cert, new_key = pem_files(rig.work, "slope-09", (b.flash / "cert.der").read_bytes(),
                                  (b.flash / "key.der").read_bytes())
    assert mqtt_connect(rig, new_cert, new_key, "probe-new") == ("connack", "0")
    inv = Inventory.load(rig.site.inventory_path)
    assert inv.devices["slope-08"].status == "revoked" and inv.devices["slope-09"].replaces == "slope-08"
    assert not rig.site.store.command_key_path("slope-08").exists()  # the old node's secrets are gone
