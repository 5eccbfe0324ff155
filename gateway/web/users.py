"""Who may acknowledge alarms from the status page: a users file of scrypt hashes, 0600, no default.

    # yujing status page users: name:scrypt:N:r:p:salt:hash (hex)
    li:scrypt:16384:8:1:9f…:4c…

`yujing status-user FILE NAME` adds or replaces a user (the password is asked twice, never echoed, never
logged). scrypt (hashlib, OpenSSL) costs about 16 MB and some tens of milliseconds per check, on a worker
thread: a login never stalls the event loop the pollers run on.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from .. import storefiles

NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,32}$")
N, R, P = 1 << 14, 8, 1
MIN_PASSWORD = 8


class UsersFileError(ValueError):
    """The users file is unreadable, malformed or readable by others; the message names the file and line."""


@dataclass(frozen=True)
class User:
    name: str
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def line(self) -> str:
        return f"{self.name}:scrypt:{self.n}:{self.r}:{self.p}:{self.salt.hex()}:{self.digest.hex()}"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32)


def make_user(name: str, password: str) -> User:
    if not NAME_RE.match(name):
        raise ValueError(f"user name {name!r}: 1–32 letters, digits or _ . @ -")
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"the password must have at least {MIN_PASSWORD} characters")
    salt = secrets.token_bytes(16)
    return User(name, N, R, P, salt, _scrypt(password, salt, N, R, P))


def load(path: Path) -> dict[str, User]:
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsersFileError(f"{path}: {exc.strerror or exc}") from exc
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UsersFileError(f"{path}: readable by others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 {path}")
    users: dict[str, User] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        try:
            name, scheme, n, r, p, salt, digest = parts
            if scheme != "scrypt" or not NAME_RE.match(name):
                raise ValueError
            user = User(name, int(n), int(r), int(p), bytes.fromhex(salt), bytes.fromhex(digest))
            if not (2 <= user.n <= 1 << 20 and 1 <= user.r <= 32 and 1 <= user.p <= 16 and len(user.digest) == 32):
                raise ValueError
        except ValueError:
            raise UsersFileError(f"{path}:{no}: expected name:scrypt:N:r:p:salt:hash (make it with `yujing status-user`)") from None
        users[name] = user
    return users


def save(path: Path, users: dict[str, User]) -> None:
    """Atomically, 0600 from the first byte."""
    text = "# yujing status page users: name:scrypt:N:r:p:salt:hash (hex). Edit with `yujing status-user`.\n"
    text += "".join(u.line() + "\n" for u in users.values())
    storefiles.write_atomic(path, text.encode(), 0o600)


_DUMMY = User("-", N, R, P, b"\0" * 16, b"\0" * 32)


def verify(users: dict[str, User], name: str, password: str) -> bool:
    """Constant work whether or not the user exists (no user-name oracle by timing)."""
    user = users.get(name)
    u = user or _DUMMY
    ok = hmac.compare_digest(_scrypt(password, u.salt, u.n, u.r, u.p), u.digest)
    return ok and user is not None
