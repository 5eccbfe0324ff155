"""Imports run one way (gateway → device_drivers), and the platform's decoder needs nothing but cbor2."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_device_drivers_never_import_the_gateway() -> None:
    for path in sorted((ROOT / "device_drivers").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith("gateway"), f"{path.relative_to(ROOT)} imports {name}"


PLATFORM = r"""
import sys
from gateway import wire
from gateway.consumer import Decoder
from gateway.model import PointInfo, Reading
birth = wire.encode_birth(session=1, ts_ms=1, site="S", gateway="g", software="x", catalogue=[PointInfo("d", "p", "m", "int16")])
d = Decoder()
d.feed("yujing/v1/S/g/birth", birth)
res = d.feed("yujing/v1/S/g/data", wire.encode_data(1, 1, [Reading(0, 1, 5)]))
assert res.records[0]["value"] == 5, res
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("pymodbus", "serial", "aiomqtt", "paho", "cryptography", "pycose"))
print("imported:", heavy)
assert not heavy
"""


def test_the_platform_decoder_needs_only_cbor2(tmp_path: Path) -> None:
    """A fresh virtualenv with cbor2 and Yujing installed without its dependencies, as the README says a
    platform installs it: the decoder and the consumer's Decoder import and work."""
    env = tmp_path / "platform"
    venv.create(env, with_pip=True)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "cbor2>=6.2,<7"], check=True, timeout=300)
    # From a copy of the sources: building in place would leave build/ in the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "node_modules", "__pycache__", "*.egg-info",
                                                                  ".pytest_cache"))
    subprocess.run([*pip, "--no-deps", str(source)], check=True, timeout=300, cwd=tmp_path)
    done = subprocess.run([str(env / "bin" / "python"), "-c", PLATFORM], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "imported: []" in done.stdout


MODBUS_ONLY = r'''
import sys
from gateway.lean import _Deferred, defer_unused_imports
defer_unused_imports()
import gateway.app  # noqa: F401 (what `yujing run` imports)
from gateway.config import parse
from gateway.poll.bus import make_driver
from gateway.uplink.base import kinds as uplink_kinds
cfg = parse(sys.argv[1], "site.toml")
async def build():  # drivers are made on the running loop, as the gateway makes them
    return [make_driver(b, [d for d in cfg.devices if d.bus == b.name]) for b in cfg.buses]
import asyncio
drivers = asyncio.run(build())
assert sorted(uplink_kinds()) == ["sl651", "sms"]  # known by name, not loaded
loaded = sorted(m for m in sys.modules if not isinstance(sys.modules[m], _Deferred))
print("drivers:", [type(d).__name__ for d in drivers])
print("loaded:", [m for m in loaded if m in sys.argv[2].split(",")])
'''


def test_a_modbus_site_does_not_load_what_only_other_sites_use() -> None:
    """Issue 12: code a site does not use costs it resident memory (0.7 MB for the other bus drivers, 3.3 MB
    for urllib.request that paho imports for a proxy lookup the gateway never makes)."""
    site = """
[site]
id = "S"
gateway = "g"
[uplink]
host = "127.0.0.1"
tls = false
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
[[devices]]
name = "d"
bus = "plc"
unit = 1
interval_s = 1
  [[devices.points]]
  name = "p"
  address = 0
"""
    unused = ["device_drivers.drivers.serial_line", "device_drivers.drivers.sl651", "device_drivers.sl651", "gateway.uplink.sms",
              "gateway.uplink.sl651", "gateway.sim", "urllib.request", "email", "http.client"]
    done = subprocess.run([sys.executable, "-c", MODBUS_ONLY, site, ",".join(unused)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "drivers: ['ModbusDriver']" in done.stdout, done.stdout
    assert "loaded: []" in done.stdout, done.stdout
