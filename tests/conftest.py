"""Real peers for the test session: a mosquitto broker on loopback, started once per session."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


@dataclass
class Broker:
    host: str
    port: int
    process: subprocess.Popen
    conf: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)

    def start(self) -> None:
        """(Re)start on the same port, for outage tests."""
        self.stop()
        self.process = _spawn(self.conf)
        wait_port(self.host, self.port)


def _spawn(conf: Path) -> subprocess.Popen:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    return subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_mosquitto(workdir: Path, *, persistent: bool = False) -> Broker:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        pytest.fail("mosquitto is not installed: run scripts/test.sh, which installs it (apt-get install mosquitto)")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    # A persistent broker keeps subscribers' sessions and queued QoS 1 messages across its own restarts,
    # as a production broker does: a consumer that registered before an outage misses nothing after it.
    # Run as root, mosquitto drops to the `mosquitto` user and then cannot write its database into the test's
    # 0700 folder: it said "Error saving in-memory database ... Permission denied" on stop (to a log nobody read),
    # and every "persistent" broker restart silently lost the sessions and what they had queued. `user` keeps the
    # invoking user (root or not), so the database is written.
    persistence = (f"persistence true\npersistence_location {workdir}/\nuser {getpass.getuser()}\n" if persistent
                   else "persistence false\n")
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n{persistence}"
        f"max_queued_messages 1000000\nmax_inflight_messages 100\n"
    )
    broker = Broker("127.0.0.1", port, _spawn(conf), conf)
    wait_port("127.0.0.1", port)
    return broker


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture
def private_mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A broker of the test's own, which the test may stop and restart (with persistent sessions)."""
    broker = start_mosquitto(tmp_path, persistent=True)
    yield broker
    broker.stop()
