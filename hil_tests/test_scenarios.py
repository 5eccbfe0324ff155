"""HIL scenarios: the simulated rig by default, a real bench with --target bench:<name> (see README.md)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pycddl
import pytest

from gateway import wire
from gateway.app import Gateway
from tests.e2e import collecting, running

from .report import ScenarioRecord
from .rig import Rig

pytestmark = pytest.mark.hil
SCHEMA = pycddl.Schema((Path(__file__).parent.parent / "docs" / "wire-format.cddl").read_text())


async def test_every_point_reports_good_quality(mosquitto, hil_rig: Rig, hil_report: ScenarioRecord) -> None:
    r = hil_rig
    wanted = {(p.device, p.name) for p in r.config.catalogue if p.device not in r.skip_devices}
    slowest = max(d.interval_s for d in r.config.devices)
    # Only this gateway's topics: the session's broker keeps other scenarios' retained messages (an alarm state of
    # a rule named radar.gap.high read as a "gap" notice here when the line-fault scenarios ran first).
    own = f"yujing/v1/{r.config.site.id}/{r.config.site.gateway}/#"
    async with collecting(mosquitto.port, own) as col, running(Gateway(r.config)):
        await col.wait_for(
            lambda c: wanted <= {(x["device"], x["point"]) for x in c.records if x.get("quality") == "good"},
            timeout=3 * slowest + 10,
        )
    hil_report.figures.update(points=len(wanted), records=len(col.records),
                              good=sum(1 for x in col.records if x.get("quality") == "good"))
    seqs = [x["seq"] for x in col.records]
    assert seqs == sorted(seqs)
    assert not [n for n in col.notices if "gap" in n or "rejected" in n]
    for _, payload in col.payloads:
        SCHEMA.validate_cbor(payload)


async def test_gateway_process_stops_cleanly_on_sigterm(mosquitto, hil_rig: Rig, hil_report: ScenarioRecord,
                                                        tmp_path: Path) -> None:
    r = hil_rig
    site = tmp_path / "rig.toml"
    site.write_text(r.site_text)
    async with collecting(mosquitto.port, f"yujing/v1/{r.config.site.id}/{r.config.site.gateway}/#") as col:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", "run", str(site),
                                                    stderr=asyncio.subprocess.PIPE)
        await col.wait_for(lambda c: len(c.records) >= len(r.config.catalogue), timeout=20)
        t0 = asyncio.get_running_loop().time()
        proc.send_signal(signal.SIGTERM)
        hil_report.fault("process.sigterm")
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        took = asyncio.get_running_loop().time() - t0
        await col.wait_for(lambda c: any(t.endswith("/death") for t, _ in c.payloads), timeout=5)
    hil_report.log_path("gateway").write_bytes(err)
    hil_report.figures.update(stop_s=round(took, 3), records=len(col.records))
    assert proc.returncode == 0, err.decode()
    assert took < 5.0
    deaths = [wire.decode_death(p) for t, p in col.payloads if t.endswith("/death")]
    assert deaths[-1].reason == "clean"
