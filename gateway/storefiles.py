"""The gateway's small state files: a private directory, atomic JSON replacement, and setting aside a file
that cannot be read (so the gateway starts fresh instead of not starting at all).

Everything here is created for the gateway's user only: the directory 0700, the files 0600.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any


def secure_dir(path: Path) -> str | None:
    """Create `path` (and parents) as 0700, or tighten an existing one that others can enter.

    Returns a note when it changed the mode of an existing directory. Raises OSError when the directory
    cannot be created.
    """
    old = os.umask(0o077)
    try:
        path.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
        return f"state directory {path} was mode {mode:04o}; now {mode & 0o700:04o} (it holds the spool and alarm state)"
    return None


def secret_file_problem(path: Path) -> str | None:
    """Why the secret at `path` cannot be used as it is (missing, not a file, readable by others), or None."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if not stat.S_ISREG(mode):
        return f"{path} is not a file"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
    return None


def read_json(path: Path) -> Any | None:
    """The parsed file, None when it does not exist. Raises ValueError naming the file when it is not
    valid UTF-8 JSON (truncated, zeroed, garbage); OSError when it cannot be read at all."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:80]})") from None


def write_json_atomic(path: Path, obj: Any) -> None:
    """Replace `path` with `obj` as JSON, 0600, atomically (write_atomic)."""
    write_atomic(path, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`: a temporary file beside it created with `mode` (a secret is never readable
    by others, not even for a moment), fsync, rename, fsync the folder.

    A reader (or a restart after a power cut) sees the old content or the new one, never a torn write.
    Raises OSError (a full disk, a read-only filesystem); the old file then stays as it was.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of an interrupted run may carry another mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask; 0644 must really be 0644
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems cannot open a directory; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def quarantine(path: Path, *, companions: tuple[str, ...] = (), now: float | None = None) -> Path:
    """Move an unreadable file aside as `<name>.corrupt-<UTC time>` (with its companions, e.g. SQLite's
    `-wal` and `-shm`), so a fresh one can start and the old one can still be examined. Returns the new path.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, target)
    for suffix in companions:
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            os.replace(extra, target.with_name(target.name + suffix))
    fsync_dir(path.parent)
    return target
