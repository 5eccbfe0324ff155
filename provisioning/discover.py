"""Which boards are attached, by USB serial number, and which one the technician means.

Two sources, merged by the device node they lead to:
- pyserial's `serial.tools.list_ports.comports()`: VID, PID and the USB serial number read from sysfs;
- udev's `/dev/serial/by-id/` symlinks (`usb-MicroPython_Board_in_FS_mode_e6614c311b2a1234-if00`): a stable
  name per board, the one to give mpremote (`/dev/ttyACM0` changes with the order of plugging).

Choosing refuses to guess: with more than one board attached, the technician names one by `--serial` or by its
by-id path (mpremote's `auto` silently takes the first). Both sources are parameters, so the tests give a real
folder of udev-style symlinks to simulated boards' ptys (list_ports cannot see a pty) and ListPortInfo objects.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ProvisionError

BY_ID = Path("/dev/serial/by-id")
# udev's by-id name: usb-<ID_SERIAL>-if<interface>[-port<n>]; ID_SERIAL is <vendor>_<model>[_<serial>]
_BY_ID_NAME = re.compile(r"usb-(?P<id>.+?)-if(?P<iface>[0-9a-fA-F]{2})(?:-port\d+)?\Z")
# USB chips seen on MicroPython boards, for the listing only (any USB serial port is listed)
CHIPS = {(0x2E8A, 0x0005): "RP2040/RP2350 (MicroPython USB)", (0xF055, 0x9802): "pyboard (MicroPython USB)",
         (0x303A, 0x1001): "ESP32-S3/C3 native USB", (0x303A, 0x4001): "ESP32-S2 native USB",
         (0x10C4, 0xEA60): "CP210x USB-UART", (0x1A86, 0x7523): "CH340 USB-UART",
         (0x1A86, 0x55D4): "CH9102 USB-UART", (0x0403, 0x6001): "FTDI FT232R USB-UART",
         (0x0403, 0x6015): "FTDI FT231X USB-UART"}
DIALOUT_HINT = ("add your user to the group that owns it: sudo usermod -aG dialout $USER, then log out and in "
                "(or run: newgrp dialout)")


class PortError(ProvisionError):
    """A port that does not exist, cannot be opened or is ambiguous; the message says what to do."""


@dataclass(frozen=True)
class Board:
    device: str  # the device node, e.g. /dev/ttyACM0 (a pty for a simulated board)
    by_id: str | None = None  # /dev/serial/by-id/… when udev made one: the stable name, given to mpremote
    serial_number: str | None = None
    vid: int | None = None
    pid: int | None = None
    description: str = ""

    @property
    def port(self) -> str:
        """What to give mpremote: the by-id path (stable across replugging), else the device node."""
        return self.by_id or self.device

    @property
    def chip(self) -> str:
        if self.vid is None or self.pid is None:
            return ""
        return CHIPS.get((self.vid, self.pid), f"USB {self.vid:04x}:{self.pid:04x}")

    def line(self) -> str:
        usb = f" [{self.chip}]" if self.chip else ""
        return (f"serial {self.serial_number or '(none)':20} {self.device:14} {self.by_id or '(no by-id link)'}"
                f"{usb}{' ' + self.description if self.description else ''}")


def parse_by_id(name: str) -> tuple[str | None, str] | None:
    """(serial number or None, description) from a by-id link name; None for a name that is not udev's USB one.

    udev joins vendor, model and serial with `_`, and leaves the serial out when the chip has none (CH340:
    `usb-1a86_USB_Serial-if00-port0`), so the last part is taken as the serial only when it has a digit.
    pyserial's sysfs reading, where it sees the port, replaces this guess."""
    m = _BY_ID_NAME.match(name)
    if m is None:
        return None
    ident = m.group("id")
    head, sep, last = ident.rpartition("_")
    if sep and any(c.isdigit() for c in last):
        return last, head.replace("_", " ")
    return None, ident.replace("_", " ")


def list_boards(by_id_dir: Path = BY_ID, ports: Iterable[Any] | None = None) -> list[Board]:
    """Every USB serial port: by-id links merged with list_ports' entries (ListPortInfo-like objects with
    device, vid, pid, serial_number, description). Sorted by serial number, then device."""
    if ports is None:
        from serial.tools import list_ports  # pyserial, a runtime dependency

        ports = list_ports.comports()
    found: dict[str, Board] = {}
    for p in ports:
        if getattr(p, "vid", None) is None:
            continue  # not USB (a built-in UART, ttyS0): no serial number to choose by
        real = os.path.realpath(p.device)
        desc = p.description if p.description and p.description != "n/a" else (getattr(p, "product", None) or "")
        found[real] = Board(p.device, None, p.serial_number or None, p.vid, p.pid, desc)
    try:
        links = sorted(by_id_dir.iterdir())
    except FileNotFoundError:
        links = []  # no USB serial device plugged in: udev removes the folder
    for link in links:
        parsed = parse_by_id(link.name)
        if parsed is None or not link.is_symlink():
            continue
        real = os.path.realpath(str(link))
        known = found.get(real)
        if known is not None:
            found[real] = Board(known.device, str(link), known.serial_number or parsed[0], known.vid, known.pid,
                                known.description or parsed[1])
        else:
            found[real] = Board(real, str(link), parsed[0], None, None, parsed[1])
    return sorted(found.values(), key=lambda b: (b.serial_number or "~", b.device))


def check_port(path: str) -> None:
    """A port that does not exist, is not a serial device or may not be opened: a PortError saying what to do."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PortError(f"cannot open {path}: it does not exist; is the board plugged in (a charge-only cable has no "
                        f"data lines)? `yujing provision boards` lists the attached boards") from None
    except PermissionError:
        raise PortError(f"cannot open {path}: permission denied; {DIALOUT_HINT}") from None
    if not stat.S_ISCHR(st.st_mode):
        raise PortError(f"cannot open {path}: not a serial port (not a character device); `yujing provision boards` "
                        f"lists them")
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except PermissionError:
        raise PortError(f"cannot open {path}: permission denied; {DIALOUT_HINT}") from None
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise PortError(f"cannot open {path}: busy; close the other program using it (a serial monitor, another "
                            f"mpremote)") from None
        raise PortError(f"cannot open {path} ({exc.strerror}): unplug and replug the board") from None
    try:
        import termios

        termios.tcgetattr(fd)
    except termios.error:
        raise PortError(f"cannot open {path}: not a serial port (it has no terminal settings); "
                        f"`yujing provision boards` lists the attached boards") from None
    finally:
        os.close(fd)


def _listing(boards: Sequence[Board]) -> str:
    return "\n".join("  " + b.line() for b in boards)


def choose(boards: Sequence[Board], *, serial: str | None = None, port: str | None = None) -> Board:
    """The one board the technician means; never a guess between several."""
    if port is not None:
        check_port(port)
        real = os.path.realpath(port)
        for b in boards:
            if os.path.realpath(b.device) == real:
                return b if port == b.device else dataclasses.replace(b, by_id=port)  # connect by the name given
        return Board(real, None if port == real else port)  # no USB identity (a built-in UART): used as named
    if serial is not None:
        mine = [b for b in boards if b.serial_number and b.serial_number.lower() == serial.lower()]
        if len(mine) == 1:
            check_port(mine[0].port)
            return mine[0]
        if not mine:
            attached = f"; attached:\n{_listing(boards)}" if boards else "; no board is attached"
            raise PortError(f"no board with serial number {serial} is attached (check the cable and the number on "
                            f"the plan){attached}")
        raise PortError(f"{len(mine)} boards report serial number {serial}; name one by its port:\n{_listing(mine)}")
    if not boards:
        raise PortError("no board found: plug one in (a charge-only cable has no data lines), or give its port; "
                        "`ls /dev/serial/by-id/` shows what udev sees")
    if len(boards) > 1:
        raise PortError(f"{len(boards)} boards are attached and none was named; choose one with --serial SERIAL or "
                        f"--port /dev/serial/by-id/…:\n{_listing(boards)}")
    check_port(boards[0].port)
    return boards[0]
