"""The reference decoder's sequence accounting: gaps, late arrivals, duplicates, unknown sessions."""

from __future__ import annotations

from gateway import wire
from gateway.consumer import Decoder
from gateway.model import PointInfo, Reading

T = 1_764_390_000_000
PREFIX = "yujing/v1/KM-SLP-01/gw2"


def birth(session: int) -> bytes:
    return wire.encode_birth(session=session, ts_ms=T, site="KM-SLP-01", gateway="gw2", software="t",
                             catalogue=[PointInfo("crack", "opening", "mm", "int16")])


def data(seq: int, session: int = 1) -> bytes:
    return wire.encode_data(session, seq, [Reading(0, T + seq, seq)])


def test_records_carry_names_units_and_sequence() -> None:
    d = Decoder()
    d.feed(f"{PREFIX}/birth", birth(1))
    res = d.feed(f"{PREFIX}/data", data(1))
    assert res.records == [{
        "site": "KM-SLP-01", "gateway": "gw2", "device": "crack", "point": "opening", "ts": T + 1, "value": 1,
        "unit": "mm", "quality": "good", "session": 1, "seq": 1,
    }]
    assert res.notices == []


def test_gap_then_late_fill_then_duplicate() -> None:
    d = Decoder()
    d.feed(f"{PREFIX}/birth", birth(1))
    assert d.feed(f"{PREFIX}/data", data(1)).notices == []
    assert d.feed(f"{PREFIX}/data", data(4)).notices == ["KM-SLP-01/gw2 session 1: gap: seq 2..3 missing (2 messages)"]
    assert d.feed(f"{PREFIX}/data", data(2)).notices == ["KM-SLP-01/gw2 session 1: late: seq 2 arrived after later ones"]
    res = d.feed(f"{PREFIX}/data", data(4))
    assert res.notices == ["KM-SLP-01/gw2 session 1: duplicate: seq 4 again"]
    assert res.records[0]["duplicate"] is True
    assert (d.gaps, d.duplicates) == (1, 1)


def test_each_session_is_accounted_on_its_own() -> None:
    d = Decoder()
    d.feed(f"{PREFIX}/birth", birth(1))
    d.feed(f"{PREFIX}/data", data(7, session=1))
    d.feed(f"{PREFIX}/birth", birth(2))
    assert d.feed(f"{PREFIX}/data", data(1, session=2)).notices == []  # a new session numbers from 1
    assert d.feed(f"{PREFIX}/data", data(8, session=1)).notices == []  # the old one's backlog carries on
    assert d.feed(f"{PREFIX}/data", data(1, session=2)).notices == ["KM-SLP-01/gw2 session 2: duplicate: seq 1 again"]


def test_unknown_session_and_malformed_payloads_are_reported_not_fatal() -> None:
    d = Decoder()
    res = d.feed(f"{PREFIX}/data", data(1, session=9))
    assert res.notices == ["KM-SLP-01/gw2: no birth seen for session 9; points shown by index"]
    assert res.records[0]["point"] == 0
    bad = d.feed(f"{PREFIX}/data", b"\x00garbage")
    assert bad.records == [] and "rejected message on yujing/v1/KM-SLP-01/gw2/data" in bad.notices[0]
    assert "rejected" in d.feed("some/other/topic", b"").notices[0]


def test_senders_are_tracked_separately() -> None:
    d = Decoder()
    d.feed("yujing/v1/A/g/data", data(1))
    assert not any("gap" in n for n in d.feed("yujing/v1/B/g/data", data(10)).notices)
