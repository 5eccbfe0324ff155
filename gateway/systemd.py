"""systemd integration: readiness, the watchdog keep-alive, and the unit file that restarts a dead or hung
gateway.

The notify protocol is a few lines (sd_notify(3)): datagrams of `KEY=VALUE` lines to the AF_UNIX socket
named by $NOTIFY_SOCKET (a leading `@` is the abstract namespace). With `WatchdogSec=` in the unit,
systemd sets $WATCHDOG_USEC and kills and restarts the service when no `WATCHDOG=1` arrives in time.

The keep-alive is sent by a core task, and only while the safety core is healthy: every bus scheduler is
either idle or inside a transaction that has not outlived its bound, and the alarm ticker has ticked
recently. A poll loop stuck in a transaction, or an event loop blocked by anything at all, therefore stops
the keep-alive, and systemd restarts the process.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .clock import Clock

log = logging.getLogger("yujing.systemd")

Check = Callable[[], str | None]  # None: healthy; else what is wrong


class Notifier:
    """Sends sd_notify messages; does nothing when not started by systemd (no $NOTIFY_SOCKET)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1_000_000
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        data = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self.address)
            return True
        except OSError as exc:  # systemd gone, or the socket's queue is full: try again next time
            log.debug("sd_notify %s: %s", lines, exc)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Watchdog:
    """Sends WATCHDOG=1 at half the watchdog interval while every check passes; withholds it otherwise."""

    def __init__(self, notifier: Notifier, clock: Clock, checks: Sequence[Check], *, status: Callable[[], str] | None = None) -> None:
        self.notifier = notifier
        self.clock = clock
        self.checks = list(checks)
        self.status = status
        self.sent = 0
        self.withheld: str | None = None

    async def run(self) -> None:
        interval = (self.notifier.watchdog_s or 10.0) / 2
        while True:
            problems = [p for p in (self._run(c) for c in self.checks) if p]
            if problems:
                text = "; ".join(problems)
                if text != self.withheld:
                    log.error("watchdog keep-alive withheld (systemd restarts the gateway if this lasts): %s", text)
                self.withheld = text
                self.notifier.send(f"STATUS=unhealthy: {text[:200]}")
            else:
                if self.withheld:
                    log.warning("safety core healthy again; watchdog keep-alive resumed")
                self.withheld = None
                lines = ["WATCHDOG=1"] if self.notifier.watchdog_s else []
                if self.status is not None:
                    lines.append(f"STATUS={self.status()[:200]}")
                if lines and self.notifier.send(*lines):
                    self.sent += 1
            await self.clock.sleep(interval)

    @staticmethod
    def _run(check: Check) -> str | None:
        try:
            return check()
        except Exception as exc:
            return f"health check failed: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------- the unit

UNIT = """\
# Yujing gateway for {config} — written by `yujing service install`.
# Install:   sudo cp {target_name} /etc/systemd/system/ && sudo systemctl daemon-reload
#            sudo systemctl enable --now {target_name}
# Logs:      journalctl -u {target_name} -f
[Unit]
Description=Yujing (预警) edge gateway for {config}
Documentation=file://{docs}
Wants=network-online.target
After=network-online.target time-sync.target
# Never give up: an unattended site has nobody to press "start" again.
StartLimitIntervalSec=0

[Service]
Type=notify
NotifyAccess=main
ExecStart={python} -m gateway.cli run {config}
# The safety core sends the keep-alive only while polling and alarms run; without it for this long,
# systemd kills the gateway and starts it again.
WatchdogSec={watchdog_s}
Restart=always
RestartSec=2
TimeoutStopSec=10
{user_lines}UMask=0077
# The spool, alarm state and control socket live in {state_dir}.
ReadWritePaths={state_dir}
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6

[Install]
WantedBy=multi-user.target
"""


def unit_text(config: Path, state_dir: Path, *, python: str = sys.executable, user: str | None = "yujing",
              watchdog_s: int = 30, name: str = "yujing.service") -> str:
    """The unit for one site file. `user` None runs as root (not recommended); otherwise that user needs
    the serial ports (group dialout) and, for GPIO outputs, group gpio."""
    user_lines = ""
    if user:
        user_lines = f"User={user}\nGroup={user}\nSupplementaryGroups=dialout\n"
    docs = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
    return UNIT.format(config=config.resolve(), state_dir=state_dir.resolve(), python=python, watchdog_s=watchdog_s,
                       user_lines=user_lines, target_name=name, docs=docs)
