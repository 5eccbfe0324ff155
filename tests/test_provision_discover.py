"""Board discovery (provisioning.discover) without hardware.

pyserial's list_ports reads sysfs, which has no entry for a pty, so the merge of its entries with the by-id links
is tested here over real ListPortInfo objects filled as list_ports_linux fills them for USB boards (the one
stand-in in these tests: there is no USB device to read). The by-id path with real simulated boards and real
mpremote is tests/test_provision_install.py::test_boards_are_listed_and_an_unnamed_choice_among_two_is_refused.
"""

from __future__ import annotations

import os
import pty
from pathlib import Path

import pytest
from serial.tools.list_ports_common import ListPortInfo

from provisioning import discover
from provisioning.discover import Board, PortError


def usb_port(device: str, vid: int, pid: int, serial: str | None, description: str) -> ListPortInfo:
    p = ListPortInfo(device, skip_link_detection=True)
    p.vid, p.pid, p.serial_number, p.description = vid, pid, serial, description
    return p


@pytest.mark.parametrize(("name", "parsed"), [
    ("usb-MicroPython_Board_in_FS_mode_e6614c311b2a1234-if00", ("e6614c311b2a1234", "MicroPython Board in FS mode")),
    ("usb-Silicon_Labs_CP2102_USB_to_UART_Bridge_Controller_0001-if00-port0",
     ("0001", "Silicon Labs CP2102 USB to UART Bridge Controller")),
    ("usb-1a86_USB_Serial-if00-port0", (None, "1a86 USB Serial")),  # a CH340 has no serial number
    ("pci-0000:00:14.0-usb-0:2:1.0", None),
])
def test_by_id_names(name: str, parsed: tuple[str | None, str] | None) -> None:
    assert discover.parse_by_id(name) == parsed


def test_list_ports_and_by_id_links_are_merged_by_device(tmp_path: Path) -> None:
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    (by_id / "usb-Espressif_USB_JTAG_serial_debug_unit_7C:DF:A1:00:11:22-if00").symlink_to("/dev/ttyACM1")
    (by_id / "usb-1a86_USB_Serial-if00-port0").symlink_to("/dev/ttyUSB0")
    ports = [usb_port("/dev/ttyACM1", 0x303A, 0x1001, "7C:DF:A1:00:11:22", "USB JTAG/serial debug unit"),
             usb_port("/dev/ttyUSB0", 0x1A86, 0x7523, None, "USB Serial"),
             ListPortInfo("/dev/ttyS0", skip_link_detection=True)]  # a built-in UART: no USB, not listed
    boards = discover.list_boards(by_id, ports)
    assert boards == [
        Board("/dev/ttyACM1", str(by_id / "usb-Espressif_USB_JTAG_serial_debug_unit_7C:DF:A1:00:11:22-if00"),
              "7C:DF:A1:00:11:22", 0x303A, 0x1001, "USB JTAG/serial debug unit"),
        Board("/dev/ttyUSB0", str(by_id / "usb-1a86_USB_Serial-if00-port0"), None, 0x1A86, 0x7523, "USB Serial")]
    assert boards[0].port == boards[0].by_id and boards[1].chip == "CH340 USB-UART"
    assert "ESP32-S3/C3 native USB" in boards[0].line()


def test_no_by_id_folder_means_no_usb_board(tmp_path: Path) -> None:
    assert discover.list_boards(tmp_path / "absent", []) == []
    with pytest.raises(PortError, match="no board found: plug one in"):
        discover.choose([])


def test_choosing_refuses_to_guess() -> None:
    a = Board("/dev/ttyACM0", "/dev/serial/by-id/usb-a_1-if00", "1")
    b = Board("/dev/ttyACM1", "/dev/serial/by-id/usb-b_2-if00", "2")
    with pytest.raises(PortError) as exc:
        discover.choose([a, b])
    msg = str(exc.value)
    assert msg.startswith("2 boards are attached and none was named; choose one with --serial SERIAL")
    assert "serial 1 " in msg and "serial 2 " in msg and "/dev/serial/by-id/usb-b_2-if00" in msg
    with pytest.raises(PortError, match="no board with serial number 3 is attached .*attached:\n.*serial 1"):
        discover.choose([a, b], serial="3")


def test_wrong_ports_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(PortError, match="cannot open /dev/ttyUSB-nothere: it does not exist; is the board plugged"):
        discover.check_port("/dev/ttyUSB-nothere")
    with pytest.raises(PortError, match="cannot open /dev/null: not a serial port"):
        discover.check_port("/dev/null")  # a character device, but no terminal
    plain = tmp_path / "file"
    plain.write_text("")
    with pytest.raises(PortError, match="not a serial port .not a character device"):
        discover.check_port(str(plain))


def test_a_port_we_may_not_open_points_to_the_dialout_group() -> None:
    if os.getuid() != 0:
        pytest.skip("plays an unprivileged user with seteuid, which needs root (the pty is our own otherwise)")
    master, slave = pty.openpty()
    try:
        port = os.ttyname(slave)
        discover.check_port(port)  # a terminal we may open: fine
        os.chmod(port, 0o600)  # as /dev/ttyUSB0 is for a user outside its group (root:dialout 0660)
        # as an unprivileged user (nobody), as a technician's account would be: root opens anything
        os.seteuid(65534)  # the effective user only: the saved one (root) takes it back below
        try:
            with pytest.raises(PortError) as exc:
                discover.check_port(port)
        finally:
            os.seteuid(0)
        assert str(exc.value).startswith(f"cannot open {port}: permission denied; add your user to the group")
        assert "usermod -aG dialout" in str(exc.value)
    finally:
        os.close(master)
        os.close(slave)
