"""Signed commands: COSE_Sign1 with Ed25519, checked against an independent implementation (pycose), and
the command inbox refusing what it must — before decoding anything it cannot yet trust."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import cbor2
import pytest
from pycose.algorithms import EdDSA
from pycose.headers import KID, Algorithm
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.messages import Sign1Message

from gateway import cborcheck, commands, wire
from gateway.command_inbox import CommandInbox
from gateway.commands import CommandRejected, Keyring, ReplayStore
from gateway.config import ConfigError, parse

T = 1_780_000_000_000
SITE, GW = "KM-CHEM-01", "gw1"


class Clock:
    def __init__(self) -> None:
        self.ms = T
        self.mono = 0.0

    def time_ms(self) -> int:
        return self.ms

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        self.mono += seconds


@pytest.fixture
def platform_key(tmp_path: Path):  # type: ignore[no-untyped-def]
    commands.new_key_pair(tmp_path / "platform.key")
    return commands.load_private_key(tmp_path / "platform.key")


def _pycose_sign(private, payload: bytes, kid: bytes) -> bytes:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    msg = Sign1Message(phdr={Algorithm: EdDSA, KID: kid}, payload=payload)
    msg.key = OKPKey(crv=Ed25519, d=raw)
    return msg.encode()


def _payload(**over) -> bytes:  # type: ignore[no-untyped-def]
    body = {0: 2, 7: SITE, 8: GW, 20: "ack", 21: "chem.lel1", 22: "li", 23: "r1", 24: T, 28: 1}
    body.update(over)
    return cbor2.dumps(body, canonical=True)


def test_pycose_verifies_what_the_platform_signs(platform_key) -> None:  # type: ignore[no-untyped-def]
    signed = commands.sign_command(platform_key, site=SITE, gateway=GW, command="ack", rule="chem.lel1", by="li",
                                   request_id="r1", ts_ms=T, counter=7)
    tag = cbor2.loads(signed)
    assert tag.tag == 18
    # pycose 1.1's decode() expects a list where cbor2 6 gives a tuple; from_cose_obj is its own parser.
    obj = list(tag.value)
    obj[1] = dict(obj[1])
    msg = Sign1Message.from_cose_obj(obj, True)
    msg.key = OKPKey(crv=Ed25519, x=commands.public_raw(platform_key.public_key()))
    assert msg.verify_signature()
    assert cbor2.loads(msg.payload)[28] == 7


def test_the_gateway_verifies_what_pycose_signs(platform_key) -> None:  # type: ignore[no-untyped-def]
    kid = commands.kid_of(commands.public_raw(platform_key.public_key()))
    signed = _pycose_sign(platform_key, _payload(), kid)
    keys = Keyring([platform_key.public_key()])
    got_kid, payload = commands.verify(signed, keys)
    cmd = commands.parse_payload(payload, got_kid, site=SITE, gateway=GW)
    assert (cmd.command, cmd.rule, cmd.by, cmd.request_id, cmd.counter) == ("ack", "chem.lel1", "li", "r1", 1)


def test_a_flipped_bit_anywhere_is_refused(platform_key) -> None:  # type: ignore[no-untyped-def]
    signed = commands.sign_command(platform_key, site=SITE, gateway=GW, command="ack", rule="chem.lel1", by="li", request_id="r1")
    keys = Keyring([platform_key.public_key()])
    for i in range(len(signed)):
        for bit in (0x01, 0x80):
            tampered = bytearray(signed)
            tampered[i] ^= bit
            with pytest.raises(CommandRejected):
                commands.verify(bytes(tampered), keys)


HOSTILE = {
    "bignum request id (old path: ValueError while formatting the error)": cbor2.dumps({0: 1, 23: 10**5000}),
    "unknown keys of mixed type (old path: TypeError in sorted())": cbor2.dumps({0: 1, "x": 1, 99: 2}),
    "bignum version": cbor2.dumps({0: 10**5000}),
    "half a megabyte of decimal (old path: 45 s on the event loop)": cbor2.dumps({0: 1, 23: cbor2.CBORTag(4, [-2, 10**400_000])}),
    "indefinite-length map": b"\xbf\x00\x01\xff",
    "nested 10,000 deep": b"\x81" * 10_000 + b"\x00",
    "a tag 18 around a bignum": cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"", 10**100])),
    "duplicate keys in the header": cbor2.dumps(cbor2.CBORTag(18, [b"\xa2\x01\x27\x01\x27", {}, b"", b"x" * 64])),
    "float in the envelope": cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"", 1.5])),
    "empty": b"",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_envelopes_are_refused_before_anything_is_decoded(platform_key, name: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real_loads = cbor2.loads
    decoded: list[int] = []

    def counting_loads(data):  # type: ignore[no-untyped-def]
        decoded.append(len(data))
        return real_loads(data)

    monkeypatch.setattr(commands.cbor2, "loads", counting_loads)
    with pytest.raises(CommandRejected) as exc:
        commands.verify(HOSTILE[name], Keyring([platform_key.public_key()]))
    assert exc.value.reason in ("size", "shape", "unauthorised")
    assert len(str(exc.value)) < 300
    assert all(n <= commands.MAX_COMMAND_BYTES for n in decoded)  # nothing large ever reached the decoder


def _inbox(tmp_path: Path, keys: Keyring, clock: Clock, done: list) -> CommandInbox:  # type: ignore[type-arg]
    replay = ReplayStore(tmp_path / "commands.json")
    replay.load()

    async def save(counters):  # type: ignore[no-untyped-def]
        replay.save(counters)

    def execute(cmd):  # type: ignore[no-untyped-def]
        done.append(cmd)
        return True, f"{cmd.rule} acknowledged by {cmd.by}"

    return CommandInbox(keys, replay, site=SITE, gateway=GW, clock=clock, execute=execute, save_counters=save)


def _sign(key, **kw) -> bytes:  # type: ignore[no-untyped-def]
    args = dict(site=SITE, gateway=GW, command="ack", rule="chem.lel1", by="li", request_id="r1", ts_ms=T)
    args.update(kw)
    return commands.sign_command(key, **args)


async def test_a_captured_command_does_not_replay_after_a_restart_nor_on_another_gateway(tmp_path: Path, platform_key) -> None:  # type: ignore[no-untyped-def]
    keys, clock, done = Keyring([platform_key.public_key()]), Clock(), []
    good = _sign(platform_key, counter=100)
    assert wire.decode_reply((await _inbox(tmp_path, keys, clock, done).handle(good))).ok
    restarted = _inbox(tmp_path, keys, clock, done)  # the counter was on disk before the command ran
    reply = wire.decode_reply(await restarted.handle(good))
    assert not reply.ok and "replayed" in reply.message and reply.request_id == "r1"
    assert reply.digest == commands.digest(good)
    other = tmp_path / "other"
    other.mkdir()
    replay_elsewhere = CommandInbox(keys, ReplayStore(other / "c.json"), site=SITE, gateway="gw2", clock=clock,
                                    execute=lambda c: (True, ""), save_counters=restarted.save_counters)
    reply = wire.decode_reply(await replay_elsewhere.handle(good))
    assert not reply.ok and "rejected (target)" in reply.message
    assert len(done) == 1
    newer = _sign(platform_key, counter=101, request_id="r2")
    assert wire.decode_reply(await restarted.handle(newer)).ok


async def test_stale_retained_unsigned_and_unknown_key_commands_change_nothing(tmp_path: Path, platform_key) -> None:  # type: ignore[no-untyped-def]
    keys, clock, done = Keyring([platform_key.public_key()]), Clock(), []
    inbox = _inbox(tmp_path, keys, clock, done)
    commands.new_key_pair(tmp_path / "mallory.key")
    mallory = commands.load_private_key(tmp_path / "mallory.key")
    cases = [
        (_sign(platform_key, ts_ms=T - 301_000, counter=5), {}, "stale"),
        (_sign(platform_key, counter=6), {"retained": True}, "retained"),
        (_sign(mallory, counter=7), {}, "unauthorised"),
        (cbor2.dumps(cbor2.CBORTag(18, [b"", {}, _payload(), b"\0" * 64])), {}, "shape"),
        (_sign(platform_key, counter=8, by="li\nWARNING forged log line"), {}, "content"),
        (_sign(platform_key, counter=9, request_id="x" * 65), {}, "content"),
        (_sign(platform_key, counter=10, command="open_valve"), {}, "content"),
    ]
    for payload, kw, reason in cases:
        reply = wire.decode_reply(await inbox.handle(payload, **kw))
        assert not reply.ok and f"rejected ({reason})" in reply.message, (reason, reply)
        assert "\n" not in reply.message and len(reply.message) < 300
    assert done == [] and inbox.stats.accepted == 0


async def test_rejections_are_rate_limited_and_quote_at_most_a_short_escaped_prefix(tmp_path: Path, platform_key) -> None:  # type: ignore[no-untyped-def]
    keys, clock, done = Keyring([platform_key.public_key()]), Clock(), []
    inbox = _inbox(tmp_path, keys, clock, done)
    huge_id = _sign(platform_key, counter=1, request_id="a" * 60 + "\n" * 4)
    reply = wire.decode_reply(await inbox.handle(huge_id))
    assert not reply.ok and len(reply.message) < 300 and "\n" not in reply.message
    replies = [await inbox.handle(os.urandom(64)) for _ in range(50)]
    assert sum(r is not None for r in replies) == inbox.reject_burst - 1  # one was used above
    assert inbox.stats.unanswered == 50 - (inbox.reject_burst - 1)
    clock.mono += inbox.reject_window_s  # a minute later, answers again
    assert await inbox.handle(b"\x00") is not None


async def test_a_command_is_refused_when_its_counter_cannot_be_recorded(tmp_path: Path, platform_key) -> None:  # type: ignore[no-untyped-def]
    keys, clock, done = Keyring([platform_key.public_key()]), Clock(), []
    replay = ReplayStore(tmp_path / "commands.json")

    async def full_disk(counters):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    inbox = CommandInbox(keys, replay, site=SITE, gateway=GW, clock=clock, execute=lambda c: done.append(c) or (True, ""),
                         save_counters=full_disk)
    reply = wire.decode_reply(await inbox.handle(_sign(platform_key, counter=3)))
    assert not reply.ok and "rejected (storage)" in reply.message and done == []


def test_the_replay_store_survives_a_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "commands.json").write_bytes(b"\0\0\0")
    store = ReplayStore(tmp_path / "commands.json")
    store.load()
    assert store.counters == {} and store.lost and "corrupt" in store.lost
    store.save({"ab": 3})
    assert oct((tmp_path / "commands.json").stat().st_mode & 0o777) == "0o600"


SITE_TOML = """
[site]
id = "S"
gateway = "g"
[uplink]
host = "127.0.0.1"
tls = false
{key}
[[buses]]
name = "b"
type = "tcp"
host = "127.0.0.1"
[[devices]]
name = "d"
bus = "b"
interval_s = 1
  [[devices.points]]
  name = "p"
  address = 0
"""


def _check(tmp_path: Path, key_line: str) -> list[str]:
    try:
        parse(SITE_TOML.format(key=key_line), str(tmp_path / "site.toml"), base=tmp_path)
    except ConfigError as exc:
        return exc.lines()
    return []


@pytest.mark.parametrize(("content", "mode", "expected"), [
    (None, 0o644, "cannot read"),
    (b"", 0o644, "empty"),
    (b"   \n\t ", 0o644, "empty"),
    (b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n", 0o644, "not a PEM public key"),
    ("valid", 0o664, "can be changed by others"),
    ("valid", 0o646, "can be changed by others"),
    ("rsa", 0o644, "not an Ed25519 public key"),
])
def test_yujing_check_refuses_unusable_command_keys(tmp_path: Path, content, mode: int, expected: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "platform.pub"
    if content == "valid":
        commands.new_key_pair(tmp_path / "platform")
    elif content == "rsa":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        path.write_bytes(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    elif content is not None:
        path.write_bytes(content)
    if path.exists():
        os.chmod(path, mode)
    lines = _check(tmp_path, 'command_public_key_file = "platform.pub"')
    assert any("uplink.command_public_key_file" in line and expected in line for line in lines), lines


def test_a_good_public_key_passes_and_the_old_hmac_key_is_refused_with_a_way_forward(tmp_path: Path) -> None:
    commands.new_key_pair(tmp_path / "platform")
    assert _check(tmp_path, 'command_public_key_file = "platform.pub"') == []
    assert _check(tmp_path, 'command_public_key_file = ["platform.pub", "platform.pub"]') == []
    (tmp_path / "hmac.key").write_bytes(b"k" * 32)
    lines = _check(tmp_path, 'command_key_file = "hmac.key"')
    assert any("command_key_file" in line and "yujing command-key new" in line for line in lines), lines


def test_a_signing_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    commands.new_key_pair(tmp_path / "platform")
    os.chmod(tmp_path / "platform", 0o640)
    with pytest.raises(commands.KeyFileError, match="readable by others"):
        commands.load_private_key(tmp_path / "platform")
    assert oct((tmp_path / "platform").stat().st_mode & 0o777) == "0o640"


def test_the_strict_walk_accepts_every_message_the_gateway_makes() -> None:
    from decimal import Decimal

    from gateway.model import PointInfo, Reading

    msgs = [
        wire.encode_data(1, 1, [Reading(0, T, Decimal("1953.38")), Reading(1, T, 1.5), Reading(2, T, None, 1), Reading(3, T, 2**64 - 1)]),
        wire.encode_birth(session=1, ts_ms=T, site="s", gateway="g", software="x", catalogue=[PointInfo("d", "p", "m", "int16")]),
        wire.encode_alarm(1, 1, [wire.Event("raised", "r", 0, 3, T, {0: Decimal("52.5")}, "m")]),
        wire.encode_reply("r1", True, "ok", b"12345678"),
    ]
    for m in msgs:
        cborcheck.check(m, wire.RECEIVE_POLICY)


def test_a_huge_scaled_value_is_never_a_bignum_on_the_wire() -> None:
    from decimal import Decimal

    from gateway.model import Reading

    payload = wire.encode_data(1, 1, [Reading(0, T, Decimal(2**70) * Decimal("0.001")), Reading(1, T, 10**30)])
    cborcheck.check(payload, wire.RECEIVE_POLICY)  # would raise on a tag 2 or 3
    values = [r.value for r in wire.decode_data(payload).readings]
    assert float(values[0]) == pytest.approx(float(2**70) * 0.001) and float(values[1]) == 1e30


async def test_inbox_handles_a_burst_without_blocking(tmp_path: Path, platform_key) -> None:  # type: ignore[no-untyped-def]
    keys, clock, done = Keyring([platform_key.public_key()]), Clock(), []
    inbox = _inbox(tmp_path, keys, clock, done)
    replies = await asyncio.gather(*(inbox.handle(_sign(platform_key, counter=1000 + i, request_id=f"r{i}")) for i in range(20)))
    oks = [wire.decode_reply(r).ok for r in replies if r is not None]
    assert oks.count(True) >= 1 and len(done) == oks.count(True)
