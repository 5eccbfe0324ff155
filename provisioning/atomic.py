"""Whole-file replacement that a power cut cannot tear, with the mode set before any byte is written.

A laptop in the field runs out of battery; a half-written CA key or inventory would be worse than none.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway import storefiles

PRIVATE = 0o600  # keys, passwords, password hashes
PUBLIC = 0o644  # certificates, ACLs, the inventory: nothing secret


def write_atomic(path: Path, data: bytes, mode: int = PRIVATE) -> None:
    """Replace `path` with `data`, created with `mode` before any byte is written (gateway.storefiles)."""
    storefiles.write_atomic(path, data, mode)


def private_dir(path: Path) -> None:
    """Create `path` (and parents) as 0700, or tighten it: it holds keys."""
    old = os.umask(0o077)
    try:
        path.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old)
    os.chmod(path, 0o700)
