"""Whole-file replacement that a power cut cannot tear, with the mode set before any byte is written.

A laptop in the field runs out of battery; a half-written CA key or inventory would be worse than none.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE = 0o600  # keys, passwords, password hashes
PUBLIC = 0o644  # certificates, ACLs, the inventory: nothing secret


def write_atomic(path: Path, data: bytes, mode: int = PRIVATE) -> None:
    """Replace `path` with `data`: a temporary file beside it created with `mode` (so a secret is never
    readable by others, not even for a moment), fsync, rename over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of an interrupted run may carry another mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask; PUBLIC must really be 0644
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
    _fsync_dir(path.parent)


def private_dir(path: Path) -> None:
    """Create `path` (and parents) as 0700, or tighten it: it holds keys."""
    old = os.umask(0o077)
    try:
        path.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old)
    os.chmod(path, 0o700)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems cannot open a folder; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
