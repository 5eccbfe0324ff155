"""The platform decoder and `yujing consume` never die on bad input, keep bounded state, and keep their
duplicate accounting across a broker restart."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from pathlib import Path

import aiomqtt
import cbor2
import pycddl

from gateway import wire
from gateway.consumer import Decoder, Gaps
from gateway.model import PointInfo, Reading

T = 1_764_390_000_000
PREFIX = "yujing/v1/S/g"
ROOT = Path(__file__).parent.parent
SCHEMA = pycddl.Schema((ROOT / "docs" / "wire-format.cddl").read_text())


def birth(session: int, points: int = 1) -> bytes:
    return wire.encode_birth(session=session, ts_ms=T, site="S", gateway="g", software="t",
                             catalogue=[PointInfo("d", f"p{i}", "", "int16") for i in range(points)])


def data(seq: int, session: int = 1) -> bytes:
    return wire.encode_data(session, seq, [Reading(0, T + seq, seq)])


HOSTILE = [
    cbor2.dumps({0: 1, 1: 1, 2: 10**5000, 3: T, 4: []}),  # bignum seq
    cbor2.dumps({0: 1, 1: 1, 2: 1, 3: T, 4: [[0, [0], [cbor2.CBORTag(4, [10**9, 1])], {}]]}),  # decimal with a huge exponent
    cbor2.dumps({0: 1, 1: 1, 2: 1, 3: T, 4: [[0, [0], [cbor2.CBORTag(4, [-2, 10**300_000])], {}]]}),  # 120 kB mantissa
    cbor2.dumps({0: 1, 1: -1, 2: 1, 3: T, 4: []}),  # negative session
    cbor2.dumps({0: 1, 1: 1, 2: 1, 3: T, 4: [[0, [2**40], [1], {}]]}),  # a point index no gateway has
    cbor2.dumps({0: 1, 1: 1, 2: 1, 3: T, 4: [[0, [0], [1], {5: 1}]]}),  # a quality for a reading that is not there
    cbor2.dumps({0: 1, 1: 1, 2: 1, 3: T, 4: [[0, [0], [[1, 2]], {}]]}),  # a value that is no value
    cbor2.dumps({0: 1, "x": 1, 99: 2}),
    b"\x9f" * 100_000,
]


def test_hostile_messages_are_rejected_one_by_one_and_the_stream_goes_on() -> None:
    for validate in (None, SCHEMA.validate_cbor):
        d = Decoder(validate=validate)
        d.feed(f"{PREFIX}/birth", birth(1))
        for i, payload in enumerate(HOSTILE):
            res = d.feed(f"{PREFIX}/data", payload)
            assert res.records == [] and res.notices and res.notices[0].startswith("rejected message"), (i, res)
            assert len(res.notices[0]) < 500
        ok = d.feed(f"{PREFIX}/data", data(1))
        assert ok.records and ok.records[0]["value"] == 1
        assert d.rejected == len(HOSTILE)


def test_a_validator_that_panics_does_not_end_the_stream() -> None:
    # pycddl 0.6 panics (pyo3 PanicException, a BaseException) on some inputs; this stands in for one.
    class Panic(BaseException):
        pass

    def validate(payload: bytes) -> None:
        if payload.startswith(b"\xa5"):
            raise Panic("index out of bounds")

    d = Decoder(validate=validate)
    res = d.feed(f"{PREFIX}/data", data(1))
    assert res.records == [] and "rejected" in res.notices[0] and "Panic" in res.notices[0]
    assert d.feed(f"{PREFIX}/birth", birth(1)).notices


def test_gap_bookkeeping_stays_small_for_huge_gaps() -> None:
    d = Decoder()
    d.feed(f"{PREFIX}/data", data(1))
    assert "gap: seq 2..999999999999999 missing" in d.feed(f"{PREFIX}/data", data(10**15)).notices[0]
    state = d.senders[("yujing/v1", "S", "g")].seqs[(1, "data")]
    assert len(state.missing.starts) == 1
    assert "late" in d.feed(f"{PREFIX}/data", data(5 * 10**14)).notices[0]
    assert len(state.missing.starts) == 2  # split in two ranges, not a billion entries
    assert d.feed(f"{PREFIX}/data", data(5 * 10**14)).records[0]["duplicate"] is True


def test_gaps_match_a_plain_set_on_random_sequences() -> None:
    rng = random.Random(7)
    for _ in range(200):
        gaps, plain = Gaps(), set()
        highest = 0
        for _ in range(50):
            if rng.random() < 0.4:
                jump = rng.randint(2, 20)
                gaps.add(highest + 1, highest + jump - 1)
                plain.update(range(highest + 1, highest + jump))
                highest += jump
            seq = rng.randint(1, highest + 1)
            assert gaps.take(seq) == (seq in plain)
            plain.discard(seq)
            assert len(gaps) == len(plain)


def test_a_birth_that_changes_the_catalogue_of_a_session_is_reported() -> None:
    d = Decoder()
    d.feed(f"{PREFIX}/birth", birth(1, points=3))
    assert not any("changed" in n for n in d.feed(f"{PREFIX}/birth", birth(1, points=3)).notices)
    notices = d.feed(f"{PREFIX}/birth", birth(1, points=4)).notices
    assert any("catalogue of session 1 changed (3 → 4 points)" in n for n in notices), notices


def test_state_is_bounded_per_sender_and_in_senders() -> None:
    d = Decoder()
    for session in range(1, 200):
        d.feed(f"{PREFIX}/birth", birth(session))
        d.feed(f"{PREFIX}/data", data(1, session))
    state = d.senders[("yujing/v1", "S", "g")]
    assert len(state.catalogues) <= Decoder.MAX_CATALOGUES and len(state.seqs) <= 2 * Decoder.MAX_CATALOGUES


async def test_consume_reconnects_and_keeps_duplicate_tracking_across_a_broker_restart(private_mosquitto, tmp_path: Path) -> None:
    """`yujing consume` as a process: the broker restarts under it; messages published meanwhile arrive (a
    persistent session), and a message sent again after the restart is still flagged a duplicate."""
    topic = "yujing/v1/S/g"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "consume", "--broker", f"127.0.0.1:{private_mosquitto.port}",
        "--client-id", "platform-1", "--no-validate", "--duration", "30",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []

    async def read_err() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            lines.append(line.decode())

    reader = asyncio.create_task(read_err())

    async def until(pred, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
        deadline = asyncio.get_running_loop().time() + timeout
        while not pred():
            assert asyncio.get_running_loop().time() < deadline, lines[-10:]
            await asyncio.sleep(0.05)

    async def publish(*messages: tuple[str, bytes]) -> None:
        async with aiomqtt.Client("127.0.0.1", private_mosquitto.port) as client:
            for t, p in messages:
                await client.publish(t, p, qos=1)

    try:
        await until(lambda: any("connected" in x for x in lines))
        await publish((f"{topic}/birth", birth(1)), (f"{topic}/data", data(1)))
        private_mosquitto.stop()
        await until(lambda: any("reconnecting" in x for x in lines))
        private_mosquitto.start()
        await until(lambda: sum("connected;" in x for x in lines) >= 2)
        await publish((f"{topic}/data", data(1)), (f"{topic}/data", data(2)))
        await until(lambda: any("duplicate: seq 1 again" in x for x in lines))
        out = []
        while not any(b'"seq": 2' in x or b'"seq":2' in x for x in out):
            out.append(await asyncio.wait_for(proc.stdout.readline(), 10))
    finally:
        proc.terminate()
        await proc.wait()
        reader.cancel()
    import json

    # At least once: seq 1 arrives first as new, then as often as the broker and the publisher repeat it (the
    # persistent broker may also hand back the copy that was in flight when it stopped), every repeat flagged.
    records = [(r["seq"], r.get("duplicate", False)) for r in (json.loads(x) for x in out)]
    assert records[0] == (1, False) and records[-1] == (2, False), records
    assert set(records[1:-1]) == {(1, True)}, records
