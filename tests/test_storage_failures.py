"""Storage failures survived: a really full filesystem (a small tmpfs, mounted for the test), and corrupt,
truncated, zeroed or empty state files at start. The gateway keeps polling and alarming, says what was
lost, never numbers a session backwards, and resumes by itself when space returns.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.model import PointInfo, Reading
from gateway.spool import Spool, SpoolError
from gateway.storage import Storage

from .e2e import collecting, running
from .rig import INTERVAL_S, SLACK_S, gas_config, gas_rig, until

T = 1_764_390_000_000
CAT = [PointInfo("d", "p", "", "uint16")]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs of the test's own: a disk that really fills up (root only, as in CI)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs the suite as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0755", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(fs: Path) -> Path:
    """Take every free byte of the filesystem; returns the filler to delete when space should return."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def poll(i: int, n: int = 50) -> list[Reading]:
    return [Reading(j, T + i * 1000, i * 1000 + j) for j in range(n)]


def test_a_full_disk_at_commit_is_a_spool_error_and_writes_resume_when_space_returns(small_fs: Path) -> None:
    s = Spool(small_fs / "spool.db")
    s.start_session(CAT, T)
    s.append(1, poll(0))
    filler = fill(small_fs)
    errors: list[BaseException] = []
    for i in range(1, 400):
        try:
            s.append(1, poll(i))
        except BaseException as exc:  # noqa: BLE001 - the point is what type it is
            errors.append(exc)
            if len(errors) >= 5:
                break
    assert errors, "the disk never filled"
    assert all(isinstance(e, SpoolError) for e in errors), errors
    assert all(e.full and str(small_fs / "spool.db") in str(e) for e in errors), [str(e) for e in errors]
    filler.unlink()
    s.append(1, poll(1000))  # space is back: the same connection writes again
    stored = s.backlog()
    assert stored >= 100 and stored % 50 == 0
    s.close()
    again = Spool(small_fs / "spool.db")
    assert again.check_integrity() is None and again.backlog() == stored
    again.close()


def test_a_full_disk_when_a_sequence_number_is_reserved_is_a_spool_error_and_no_number_is_used(small_fs: Path) -> None:
    """A block of sequence numbers is reserved (state.json, fsync'd) before one of them is used; a disk too
    full for that refuses the seal, and the number is not issued until the reservation is written."""
    s = Spool(small_fs / "spool.db")
    s.start_session(CAT, T)
    for i in range(20):
        s.append(1, poll(i))
    filler = fill(small_fs)
    with pytest.raises(SpoolError, match="full|space") as info:
        s.seal(100, now_ms=T, historical_after_ms=10**9, live=True)
    assert info.value.full
    filler.unlink()
    m = s.seal(100, now_ms=T, historical_after_ms=10**9, live=True)
    assert m.seq == 1
    s.close()
    again = Spool(small_fs / "spool.db")
    assert again.check_integrity() is None and again.backlog() == 20 * 50 - m.count
    again.close()


async def test_a_full_disk_never_stops_the_siren_and_storing_resumes(small_fs: Path, mosquitto, tmp_path: Path) -> None:
    async with gas_rig() as rig:
        cfg = gas_config(mosquitto.port, tmp_path, rig.port, spool_path=small_fs / "state" / "spool")
        await rig.gas(cfg, 5)
        async with collecting(mosquitto.port) as col, running(Gateway(cfg)) as gw:
            await until(lambda: gw.readings >= 4, what="first polls")
            filler = fill(small_fs)
            await until(lambda: gw.storage.failing is not None, timeout=20, what="the disk refusing writes")
            latency = await rig.siren_latency(cfg)
            readings = gw.readings
            await asyncio.sleep(4 * INTERVAL_S)
            assert gw.readings > readings  # polling goes on
            assert gw.storage.pending_readings > 0  # held in memory, not dropped
            filler.unlink()
            await until(lambda: gw.storage.failing is None, timeout=40, what="writes resuming")
            await col.wait_for(lambda c: any(r.get("alarm") == "gateway_ok" and r["rule"] == "gateway.storage" for r in c.records), timeout=20)
            await col.wait_for(lambda c: any(r.get("alarm") == "raised" for r in c.records), timeout=20)
    assert latency <= INTERVAL_S + SLACK_S, latency
    kinds = [(r["alarm"], r["rule"]) for r in col.records if "alarm" in r]
    assert ("gateway_fault", "gateway.storage") in kinds
    fault = next(r for r in col.records if r.get("alarm") == "gateway_fault" and r["rule"] == "gateway.storage")
    assert "full" in fault["message"]


# ---------------------------------------------------------------------------------------------- corrupt files


def _segments(spool: Path) -> list[Path]:
    return sorted(spool.glob("seg-*.log"))


def _truncate(spool: Path) -> None:  # the newest segment cut in the middle of a record: a power cut's torn write
    seg = _segments(spool)[-1]
    os.truncate(seg, seg.stat().st_size * 2 // 3 + 3)


def _garbage(spool: Path) -> None:  # the oldest segment overwritten with noise
    seg = _segments(spool)[0]
    seg.write_bytes(os.urandom(seg.stat().st_size))


def _zero_page(spool: Path) -> None:  # a card that lost a page of the second segment
    with open(_segments(spool)[1], "r+b") as f:
        f.seek(4096)
        f.write(b"\0" * 4096)


def _empty(spool: Path) -> None:  # every segment emptied (a filesystem repair's idea of help)
    for seg in _segments(spool):
        seg.write_bytes(b"")


CORRUPTIONS = {"truncated": _truncate, "garbage": _garbage, "zeroed-page": _zero_page, "zero-length": _empty}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
async def test_a_damaged_spool_at_start_is_read_around_and_the_gateway_runs(mosquitto, tmp_path: Path, name: str) -> None:
    async with gas_rig() as rig:
        cfg = gas_config(mosquitto.port, tmp_path, rig.port)
        await rig.gas(cfg, 5)
        spool_path = cfg.spool.path
        first = Spool(spool_path, segment_bytes=16 * 1024)  # an earlier life: three sessions, a few thousand readings
        for _ in range(3):
            session = first.start_session(CAT, T)
        for i in range(400):
            first.append(session, poll(i))
        first.close()
        Storage(spool_path).boot.write(session)  # as the gateway keeps it beside the spool
        assert len(_segments(spool_path)) >= 4
        CORRUPTIONS[name](spool_path)
        async with collecting(mosquitto.port) as col, running(Gateway(cfg)) as gw:
            await until(lambda: gw.readings >= 2, what="polling")
            latency = await rig.siren_latency(cfg)
            await col.wait_for(lambda c: any(r.get("alarm") == "gateway_fault" for r in c.records), timeout=15)
            new_session = gw.session
    assert latency <= INTERVAL_S + SLACK_S, latency
    assert new_session > session  # never backwards
    fault = next(r for r in col.records if r.get("alarm") == "gateway_fault")
    assert fault["rule"] == "gateway.storage.start" and "lost" in fault["message"], fault
    aside = list(spool_path.glob("seg-*.log.corrupt-*"))
    if name in ("garbage", "zeroed-page"):  # set aside once its readable records were copied forward
        assert len(aside) == 1 and aside[0].name in fault["message"]
    again = Spool(spool_path)
    assert again.check_integrity() is None  # said once: the next start finds nothing to say
    again.close()


@pytest.mark.parametrize("content", [b"{\"version\": 1, \"rules\": {\"gas.lel1\": {\"level\": 3,", b"\0" * 512, b"[1, 2]",
                                     b'{"version": 1, "rules": {"gas.lel1": {"level": 9}}}'],
                         ids=["truncated", "zeroed", "not-an-object", "bad-level"])
async def test_a_corrupt_alarm_state_at_start_is_set_aside_and_the_gateway_runs(mosquitto, tmp_path: Path, content: bytes) -> None:
    async with gas_rig() as rig:
        cfg = gas_config(mosquitto.port, tmp_path, rig.port)
        await rig.gas(cfg, 5)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        (cfg.state_dir / "alarms.json").write_bytes(content)
        async with collecting(mosquitto.port) as col, running(Gateway(cfg)) as gw:
            await until(lambda: gw.readings >= 2, what="polling")
            latency = await rig.siren_latency(cfg)
            await col.wait_for(lambda c: any(r.get("alarm") == "gateway_fault" for r in c.records), timeout=15)
        saved = json.loads((cfg.state_dir / "alarms.json").read_text())  # a fresh state, saved again
    assert latency <= INTERVAL_S + SLACK_S, latency
    fault = next(r for r in col.records if r.get("alarm") == "gateway_fault")
    assert fault["rule"] == "gateway.storage.alarm_state" and "latched alarms" in fault["message"]
    assert saved["rules"]["gas.lel1"]["level"] == 3
    assert len(list(cfg.state_dir.glob("alarms.json.corrupt-*"))) == 1


async def test_state_files_are_private(mosquitto, tmp_path: Path) -> None:
    async with gas_rig() as rig:
        cfg = gas_config(mosquitto.port, tmp_path, rig.port)
        cfg.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(cfg.state_dir, 0o755)  # as a package or a careless mkdir leaves it
        await rig.gas(cfg, 60)
        async with running(Gateway(cfg)) as gw:
            await until(lambda: gw.desk is not None and gw.desk.engine.level("gas.lel1") >= 2, what="alarm")
            await asyncio.sleep(0.5)
    modes = {str(p.relative_to(cfg.state_dir)): stat.S_IMODE(p.stat().st_mode) for p in cfg.state_dir.rglob("*")}
    assert stat.S_IMODE(cfg.state_dir.stat().st_mode) == 0o700
    assert modes["spool"] == 0o700, modes
    for name in ("spool/seg-00000001.log", "spool/state.json", "spool/lock", "alarms.json", "session.json"):
        assert modes[name] == 0o600, modes
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes
