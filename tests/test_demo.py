"""`yujing demo` is the README's first command: it must run with no broker installed (amqtt) and with mosquitto."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("broker", ["amqtt", "mosquitto"])
def test_demo_runs_a_whole_site_and_stops_by_itself(broker: str, tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--duration", "5", "--broker", broker, "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    # readings from the RS-485 devices (pty bus) and the Modbus TCP PLC reach the consumer
    assert any(re.search(r"radar\.level\s+195\d\.\d+ m", line) for line in lines), lines[:10]
    assert any("dam-plc.piezo_p1" in line for line in lines)
    assert any("rain.total" in line for line in lines)
    # the non-Modbus drivers: NMEA lines from the anemometer's pty, SL 651 reports pushed over TCP
    assert any(re.search(r"wind\.speed\s+\d+\.\d m/s", line) for line in lines), lines[:20]
    assert any(re.search(r"upstream\.rain_today\s+1\d\.\d mm", line) for line in lines), lines[:20]
    m = re.search(r"done — (\d+) readings polled, (\d+) readings and (\d+) alarm events decoded", proc.stderr)
    assert m, proc.stderr[-2000:]
    polled, decoded = int(m.group(1)), int(m.group(2))
    assert polled >= 20 and decoded >= polled - 7  # at most the last poll round still in flight at the stop
    assert "death, session 1, reason clean" in proc.stderr
    assert re.search(r"open http://127\.0\.0\.1:\d+/ in a browser", proc.stderr), proc.stderr[-2000:]
    assert "gateway.stage.status" not in proc.stdout + proc.stderr  # the status page served without a fault
    assert (tmp_path / "site.toml").exists() and any((tmp_path / "spool").glob("seg-*.log"))
