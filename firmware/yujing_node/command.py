"""Signed commands to a node: COSE_Mac0 (RFC 9052, CBOR tag 17) with HMAC 256/256 (RFC 9053, alg 5) under
the node's own 32-byte key (/secrets.json "command_key"), so a captured node exposes only itself.

Why not the gateway's COSE_Sign1/Ed25519: this MicroPython has no Ed25519 (hashlib: md5, sha1, sha256;
cryptolib: aes), and a pure-Python verify costs seconds and tens of KB of heap on an ESP32
(bench/node_heap_tls.py measures it). HMAC-SHA256 is two hardware-backed SHA-256 passes.

Checked in the gateway's order (gateway/commands.py), before anything inside is trusted:
    1. size: more than MAX_COMMAND_BYTES is refused unread;
    2. shape: a strict walk (definite lengths, shortest heads, no floats or simple values, no tags but the
       envelope's 17, integer map keys ascending without duplicates, bounded depth and item count), then
       17([protected: bstr, unprotected: {}, payload: bstr, tag: bstr .size 32]), protected {1: 5, 4: kid};
    3. MAC: HMAC-SHA256 over MAC_structure ["MAC0", protected, h'', payload] built from the bytes as
       received, compared in constant time; kid must name this node's key;
    4. only then the payload, walked as strictly: {0: 2, 7: site, 8: node, 20: command, 22: by, 23: id,
       24: ts, 28: counter, ?21: rule, ?30: level, ?31: value, ?32: clear}. The caller checks ts (when its
       clock is set) and the counter against the last accepted one, persisted before the command runs.
"""

import hashlib

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


MAX_COMMAND_BYTES = const(384)
TAG_MAC0 = const(17)
ALG_HMAC256 = const(5)
VERSION = const(2)
K_VERSION = const(0)
K_SITE = const(7)
K_GATEWAY = const(8)
K_COMMAND = const(20)
K_RULE = const(21)
K_BY = const(22)
K_ID = const(23)
K_TS = const(24)
K_COUNTER = const(28)
K_LEVEL = const(30)
K_VALUE = const(31)
K_CLEAR = const(32)
COMMANDS = ("ack", "threshold", "report")
MAX_TEXT = const(64)
_MAX_DEPTH = const(3)
_MAX_ITEMS = const(48)
_TEXT_KEYS = (K_SITE, K_GATEWAY, K_COMMAND, K_RULE, K_BY, K_ID, K_VALUE, K_CLEAR)
_INT_KEYS = (K_VERSION, K_TS, K_COUNTER, K_LEVEL)


class Rejected(Exception):
    """A command not carried out; `reason` is one of the gateway's words (size, shape, unauthorised, target,
    content, stale, replay, storage)."""

    def __init__(self, reason, msg):
        super().__init__(msg)
        self.reason = reason


def digest(raw):
    """The first 8 bytes of SHA-256: how a reply names a command (of its raw bytes, as the gateway), and as
    kid_of the key's id (of the 32-byte key: a random key, so the hash reveals nothing)."""
    return hashlib.sha256(raw).digest()[:8]


kid_of = digest


def _bstr_head(n):
    if n < 24:
        return bytes((0x40 | n,))
    if n < 256:
        return bytes((0x58, n))
    return bytes((0x59, n >> 8, n & 0xFF))


def hmac_sha256(key, parts):
    """RFC 2104 over the concatenation of `parts` (no hmac module in MicroPython)."""
    k = bytearray(64)
    k[: len(key)] = key
    for i in range(64):
        k[i] ^= 0x36
    h = hashlib.sha256(k)
    for p in parts:
        h.update(p)
    inner = h.digest()
    for i in range(64):
        k[i] ^= 0x36 ^ 0x5C
    h = hashlib.sha256(k)
    h.update(inner)
    return h.digest()


def mac0_tag(key, protected, payload):
    return hmac_sha256(key, (b"\x84\x64MAC0", _bstr_head(len(protected)), protected, b"\x40",
                             _bstr_head(len(payload)), payload))


def same(a, b):
    """Constant-time comparison of two byte strings of equal length."""
    if len(a) != len(b):
        return False
    acc = 0
    for i in range(len(a)):
        acc |= a[i] ^ b[i]
    return acc == 0


class _Reader:
    """A strict, bounded CBOR walk over `buf` (a memoryview): what a Yujing command may contain, nothing else."""

    def __init__(self, buf, what):
        self.b = buf
        self.i = 0
        self.n = 0
        self.what = what

    def bad(self, msg):
        return Rejected("shape", "%s: %s at byte %d" % (self.what, msg, self.i))

    def _arg(self):
        b = self.b
        if self.i >= len(b):
            raise self.bad("truncated")
        ib = b[self.i]
        self.i += 1
        major, ai = ib >> 5, ib & 31
        if ai < 24:
            return major, ai
        if ai > 27:
            raise self.bad("indefinite length or reserved value")
        w = 1 << (ai - 24)
        if self.i + w > len(b):
            raise self.bad("truncated")
        v = 0
        for j in range(w):
            v = (v << 8) | b[self.i + j]
        self.i += w
        if v < (24 if w == 1 else 1 << (4 * w)):  # shortest form only (deterministic encoding)
            raise self.bad("non-shortest integer")
        return major, v

    def _take(self, n):
        if n > len(self.b) - self.i:
            raise self.bad("length beyond the message")
        v = self.b[self.i : self.i + n]
        self.i += n
        return v

    def item(self, depth=0, tag_ok=False):
        self.n += 1
        if self.n > _MAX_ITEMS:
            raise self.bad("too many items")
        major, v = self._arg()
        if major == 0:
            return v
        if major == 1:
            return -1 - v
        if major == 2:
            return self._take(v)
        if major == 3:
            try:
                return str(self._take(v), "utf-8")
            except UnicodeError:
                raise self.bad("text is not UTF-8") from None
        if major in (4, 5):
            if depth >= _MAX_DEPTH:
                raise self.bad("nested too deep")
            if v > len(self.b) - self.i:
                raise self.bad("count beyond the message")
            if major == 4:
                return [self.item(depth + 1) for _ in range(v)]
            d = {}
            prev = -1
            for _ in range(v):
                k = self.item(depth + 1)
                if not isinstance(k, int) or k <= prev:
                    raise self.bad("map keys must be unsigned integers in ascending order, without duplicates")
                prev = k
                d[k] = self.item(depth + 1)
            return d
        if major == 6 and tag_ok and v == TAG_MAC0:
            return (v, self.item(depth + 1))
        raise self.bad("a tag, float or simple value where none belongs")

    def whole(self, tag_ok=False):
        v = self.item(0, tag_ok)
        if self.i != len(self.b):
            raise self.bad("bytes after the item")
        return v


def verify(raw, key, kid):
    """Steps 1-3: the authentic payload bytes of a COSE_Mac0 command, or Rejected."""
    if len(raw) > MAX_COMMAND_BYTES:
        raise Rejected("size", "%d bytes, more than the %d a command may have" % (len(raw), MAX_COMMAND_BYTES))
    if key is None:
        raise Rejected("unauthorised", "this node has no command key (secrets.json command_key)")
    top = _Reader(memoryview(raw), "envelope").whole(True)
    if not (isinstance(top, tuple) and isinstance(top[1], list) and len(top[1]) == 4):
        raise Rejected("shape", "not a COSE_Mac0 (tag 17) [protected, unprotected, payload, tag]")
    protected, unprotected, payload, tag = top[1]
    if not (isinstance(protected, memoryview) and isinstance(payload, memoryview) and isinstance(tag, memoryview)):
        raise Rejected("shape", "COSE_Mac0 fields have the wrong types")
    if unprotected != {}:
        raise Rejected("shape", "the unprotected header must be an empty map")
    header = _Reader(protected, "protected header").whole()
    if not isinstance(header, dict) or header.get(1) != ALG_HMAC256 or set(header) != {1, 4}:
        raise Rejected("shape", "protected header must be {1: 5 (HMAC 256/256), 4: kid}")
    if not isinstance(header[4], memoryview) or bytes(header[4]) != kid:
        raise Rejected("unauthorised", "MACed with another key than this node's")
    if not same(mac0_tag(key, protected, payload), tag):
        raise Rejected("unauthorised", "bad MAC")
    return payload


class Command:
    def __init__(self, m):
        self.command = m[K_COMMAND]
        self.rule = m.get(K_RULE)
        self.by = m[K_BY]
        self.id = m[K_ID]
        self.ts = m[K_TS]
        self.counter = m[K_COUNTER]
        self.level = m.get(K_LEVEL)
        self.value = m.get(K_VALUE)
        self.clear = m.get(K_CLEAR)


def parse(payload, site, node):
    """Step 4: the authentic payload's fields, checked against this node. Raises Rejected."""
    m = _Reader(payload, "payload").whole()
    if not isinstance(m, dict):
        raise Rejected("shape", "payload is not a map")
    if m.get(K_VERSION) != VERSION:
        raise Rejected("shape", "payload version is not %d" % VERSION)
    for k, v in m.items():
        if k in _TEXT_KEYS:
            if not isinstance(v, str):
                raise Rejected("shape", "field %d is not text" % k)
        elif k in _INT_KEYS:
            if not isinstance(v, int) or v < 0:
                raise Rejected("shape", "field %d is not an unsigned integer" % k)
        else:
            raise Rejected("shape", "unknown key %d" % k)
    for k in (K_SITE, K_GATEWAY, K_COMMAND, K_BY, K_ID, K_TS, K_COUNTER):
        if k not in m:
            raise Rejected("shape", "field %d missing" % k)
    if m[K_SITE] != site or m[K_GATEWAY] != node:
        raise Rejected("target", "addressed to another site or node")
    c = Command(m)
    if c.command not in COMMANDS:
        raise Rejected("content", "unknown command (known: %s)" % ", ".join(COMMANDS))
    for name, v in (("by", c.by), ("id", c.id), ("rule", c.rule)):
        if v is not None and not (0 < len(v) <= MAX_TEXT and v.strip()):
            raise Rejected("content", "field %s must be 1-%d characters" % (name, MAX_TEXT))
    if c.command != "report" and c.rule is None:
        raise Rejected("content", "%s needs a rule (key 21)" % c.command)
    if c.command == "threshold" and (c.level is None or c.value is None):
        raise Rejected("content", "threshold needs a level (key 30) and a value (key 31)")
    return c
