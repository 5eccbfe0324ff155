"""The board side of provisioning against a simulated board: the MicroPython unix port behind a pseudo-terminal
(provisioning.simboard), driven by the real mpremote. Figures are printed (pytest -s)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning import board
from provisioning.simboard import SimBoard, micropython_executable

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"
FLASH = 4 * 1024 * 1024 - 1536 * 1024  # an ESP32 with 4 MB: about 2.5 MB of littlefs after MicroPython


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimBoard]:
    try:
        micropython_executable()
    except RuntimeError as exc:
        pytest.fail(f"{exc} (the test extra installs it)")
    with SimBoard(tmp_path / "flash", flash_size=FLASH) as b:
        yield b
    assert b.pid is None


def test_preflight_reports_version_abi_and_free_flash(sim: SimBoard) -> None:
    pf = board.preflight(sim.port)
    print("\n" + "\n".join(pf.lines()))
    assert pf.version.startswith("1.") and pf.mpy_version.startswith("6.")
    assert pf.flash_total == FLASH and 0 < pf.flash_free <= FLASH
    assert pf.sha256 and pf.ctrl_c
    assert "no machine.RTC" in pf.clock


def test_preflight_refuses_a_full_flash(sim: SimBoard) -> None:
    (sim.flash / "junk.bin").write_bytes(b"\0" * (FLASH - 32 * 1024))
    with pytest.raises(board.BoardError, match="KiB of flash free.*remove old files"):
        board.preflight(sim.port)


def test_sync_copies_only_what_changed(sim: SimBoard) -> None:
    files = board.compile_firmware(FIRMWARE)
    mpy = {p: d for p, d in files.items() if p.endswith(".mpy")}
    t0 = time.monotonic()
    board.preflight(sim.port)
    first = board.sync_firmware(sim.port, files)
    elapsed = time.monotonic() - t0
    second = board.sync_firmware(sim.port, files)
    print(f"\n.mpy: {len(mpy)} files, {sum(map(len, mpy.values()))} bytes; main.py {len(files['/main.py'])} bytes")
    print(f"pre-flight + first sync of one simulated board: {elapsed:.2f} s ({first.line()})")
    print(f"rerun with nothing changed: {second.line()}")
    assert first.bytes_copied == first.bytes_total and len(first.copied) == len(files)
    assert second.bytes_copied == 0 and second.copied == []
    for path, data in files.items():
        assert (sim.flash / path.lstrip("/")).read_bytes() == data
    # one file changed: only it goes over
    changed = dict(files, **{"/main.py": files["/main.py"] + b"# v2\n"})
    third = board.sync_firmware(sim.port, changed)
    assert third.copied == ["/main.py"] and third.bytes_copied == len(changed["/main.py"])
    # and the firmware imports from the .mpy files on the board
    out = board.mpremote(sim.port, "exec", "from yujing_node import cbor; print(cbor.__file__)")
    assert "/lib/yujing_node/cbor.mpy" in out


def test_killed_copy_leaves_the_old_config_and_a_rerun_completes(sim: SimBoard, tmp_path: Path) -> None:
    old = b'{"node_id": "slope-07", "v": 1}'
    board.write_file_atomic(sim.port, "/config.json", old)
    assert (sim.flash / "config.json").read_bytes() == old
    new = os.urandom(200_000).hex().encode()  # 400 kB: several seconds over the pty
    new_file = tmp_path / "new.json"
    new_file.write_bytes(new)
    script = ("import sys; from pathlib import Path; from provisioning import board; "
              "board.write_file_atomic(sys.argv[1], '/config.json', Path(sys.argv[2]).read_bytes())")
    proc = subprocess.Popen([sys.executable, "-c", script, sim.port, str(new_file)], cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 20
    tmp_on_board = sim.flash / ("config.json" + board.TMP_SUFFIX)
    while time.monotonic() < deadline and (not tmp_on_board.exists() or tmp_on_board.stat().st_size < 20_000):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the laptop dies: the tool and its mpremote
    proc.wait(5)
    partial = tmp_on_board.stat().st_size
    print(f"\nkilled with {partial} of {len(new)} bytes copied")
    assert 0 < partial < len(new)
    assert (sim.flash / "config.json").read_bytes() == old  # the board still boots with the old config
    t0 = time.monotonic()
    assert board.write_file_atomic(sim.port, "/config.json", new) == len(new)
    print(f"rerun: {len(new)} bytes in {time.monotonic() - t0:.2f} s")
    assert (sim.flash / "config.json").read_bytes() == new
    assert not tmp_on_board.exists()


def test_a_damaged_copy_is_not_put_in_force(sim: SimBoard, monkeypatch: pytest.MonkeyPatch) -> None:
    board.write_file_atomic(sim.port, "/secrets.json", b"{}")
    real = board.hashlib.sha256
    monkeypatch.setattr(board.hashlib, "sha256", lambda data=b"": real(data + b"x"))  # as if a byte flipped
    with pytest.raises(board.BoardError, match="damaged.*old files are still in place"):
        board.write_file_atomic(sim.port, "/secrets.json", b'{"mqtt_password": "p"}')
    assert (sim.flash / "secrets.json").read_bytes() == b"{}"


def test_preflight_sets_the_clock_where_the_port_has_an_rtc(tmp_path: Path) -> None:
    fake_rtc = ("import sys, time\nclass machine:\n    class RTC:\n        def datetime(self, t):\n"
                "            open('/rtc.txt', 'w').write(repr(t))\nsys.modules['machine'] = machine\n"
                "del machine, sys, time")
    with SimBoard(tmp_path / "flash", boot_code=fake_rtc) as b:
        now = time.gmtime(1_800_000_000)  # 2027-01-15 08:00:00 UTC, a Friday
        pf = board.preflight(b.port, now=now)
        assert pf.clock.startswith("set to 2027-01-15 08:00:00 UTC")
        assert (b.flash / "rtc.txt").read_text() == "(2027, 1, 15, 4, 8, 0, 0, 0)"


def test_a_board_without_sha256_is_checked_by_reading_back(tmp_path: Path) -> None:
    no_sha = "import sys\nclass _H:\n    pass\nsys.modules['hashlib'] = _H\ndel _H, sys"
    with SimBoard(tmp_path / "flash", boot_code=no_sha) as b:
        pf = board.preflight(b.port)
        assert not pf.sha256 and any("reading them back" in n for n in pf.notes)
        board.write_file_atomic(b.port, "/config.json", b'{"v": 1}')
        assert (b.flash / "config.json").read_bytes() == b'{"v": 1}'
        report = board.sync_firmware(b.port, {"/main.py": b"print(1)\n"})
        assert report.bytes_copied == 9  # without a hash on the board every file is copied
        assert (b.flash / "main.py").read_bytes() == b"print(1)\n"


@pytest.mark.parametrize("port", ["/dev/ttyUSB-nothere", "/dev/null"])
def test_a_wrong_port_says_what_to_check(port: str) -> None:
    with pytest.raises(board.BoardError, match=f"cannot open {port}: check the cable and the port name"):
        board.preflight(port)


def test_a_port_where_nothing_answers_times_out_with_advice() -> None:
    import pty

    master, slave = pty.openpty()  # a serial port with no board behind it
    try:
        with pytest.raises(board.BoardError, match="unplug and replug the board, or close other programs"):
            board.mpremote(os.ttyname(slave), "exec", "print(1)", timeout=8)
    finally:
        os.close(master)
        os.close(slave)


def test_soft_reset_restarts_the_interpreter_and_stop_leaves_no_process(tmp_path: Path) -> None:
    with SimBoard(tmp_path / "flash") as b:
        first = b.pid
        board.mpremote(b.port, "exec", "x = 1")
        board.mpremote(b.port, "soft-reset")
        out = board.mpremote(b.port, "resume", "exec", "print('x' in globals())")
        assert "False" in out and b.soft_resets >= 2 and b.pid != first
        last = b.pid
    assert b.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(last, 0)


def test_cli_preflight_and_flash(sim: SimBoard, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"node_id": "slope-07"}')
    cmd = [sys.executable, "-m", "provisioning.cli", "--site-dir", str(tmp_path / "nosite")]
    pre = subprocess.run([*cmd, "preflight", sim.port], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert pre.returncode == 0 and ".mpy ABI: v6." in pre.stdout, pre.stderr
    flash = [*cmd, "flash", sim.port, "--firmware", str(FIRMWARE), "--config", str(config)]
    first = subprocess.run(flash, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(flash, capture_output=True, text=True, cwd=ROOT, timeout=120)
    print("\n" + again.stdout)
    assert "firmware: 0 files copied (0 bytes)" in again.stdout and "node files: 0 files copied" in again.stdout
    assert (sim.flash / "config.json").read_text() == '{"node_id": "slope-07"}'
    wrong = subprocess.run([*cmd, "preflight", "/dev/ttyUSB-nothere"], capture_output=True, text=True, cwd=ROOT)
    assert wrong.returncode == 2 and "cannot open /dev/ttyUSB-nothere" in wrong.stderr
