"""The local status page in a real browser (Debian's Chromium, driven by Playwright's Python API), against a
real gateway polling a real pymodbus device, and `yujing status` through the control socket.

Screenshots go to test-artifacts/status-page/ (or $YUJING_ARTIFACTS/status-page/), kept by CI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.rules import Level
from gateway.sim.devices import SimServer, SimSlave
from gateway.web import users
from tests.conftest import free_port

from .e2e import running, site, until

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("YUJING_ARTIFACTS", ROOT / "test-artifacts")) / "status-page"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
INTERVAL_S = 0.3

BODY = """
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
port = {port}

[[devices]]
name = "lel1"
bus = "plc"
unit = 1
interval_s = {interval}
  [[devices.points]]
  name = "conc"
  address = 0
  scale = 0.1
  unit = "%LEL"
  [[devices.points]]
  name = "temp"
  address = 1
  unit = "degC"

[[rules]]
kind = "threshold"
id = "gas.lel1"
point = "lel1.conc"
direction = "high"
latch = true
levels = [ {{ level = "III_YELLOW", set = 25, clear = 23 }}, {{ level = "I_RED", set = 60, clear = 58 }} ]

[status]
listen = "127.0.0.1:0"
users_file = "status-users"
trend_hours = 0.1
"""


def _site(tmp_path: Path, broker: int, modbus: int):  # type: ignore[no-untyped-def]
    users.save(tmp_path / "status-users", {"li": users.make_user("li", "correct horse")})
    return site(broker, tmp_path, BODY.format(port=modbus, interval=INTERVAL_S))


@pytest.fixture
async def detector(mosquitto, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A simulated gas detector (pymodbus) and a site that polls it, with the status page on a port of its own."""
    port = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", port))
    await server.start()
    try:
        yield server, _site(tmp_path, mosquitto.port, port)
    finally:
        await server.stop()


@pytest.fixture
async def browser():  # type: ignore[no-untyped-def]
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run scripts/test.sh, which installs it (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield b
        finally:
            await b.close()


async def test_the_page_shows_what_the_device_served_and_an_alarm_in_its_colour_and_acknowledging_needs_a_login(
        detector, browser) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server, cfg = detector
    conc, temp = cfg.devices[0].points
    await server.set_point(1, conc, 12.5)
    await server.set_point(1, temp, 21)
    async with running(Gateway(cfg)) as gw:
        await until(lambda: gw.status_server is not None and gw.status_server.bound_port and gw.readings >= 4)
        url = f"http://127.0.0.1:{gw.status_server.bound_port}/"
        page = await browser.new_page(viewport={"width": 390, "height": 844})  # a phone
        await page.goto(url)
        value = page.locator('tr[data-point="lel1.conc"] td.value')
        await page.wait_for_function("() => document.querySelector('tr[data-point=\"lel1.conc\"] td.value')?.textContent === '12.5'")
        assert await value.text_content() == "12.5"
        assert await page.locator('tr[data-point="lel1.temp"] td.value').text_content() == "21"
        assert await page.locator('table[data-device="lel1"] [data-state]').get_attribute("data-state") == "online"
        await page.screenshot(path=str(ARTIFACTS / "1-normal-phone.png"), full_page=True)

        # Over the yellow threshold: the card turns yellow within one poll (plus the page's push second).
        await server.set_point(1, conc, 31)
        began = time.monotonic()
        card = page.locator('.alarm[data-rule="gas.lel1"]')
        await page.wait_for_function("() => document.querySelector('.alarm[data-rule=\"gas.lel1\"]')?.dataset.colour === 'yellow'",
                                     timeout=5000)
        shown_after = time.monotonic() - began
        print(f"status page: alarm shown {shown_after * 1000:.0f} ms after the register changed (poll every {INTERVAL_S} s)")
        assert await card.get_attribute("data-level") == "III_YELLOW"
        colour = await card.evaluate("e => getComputedStyle(e).borderLeftColor")
        assert colour == "rgb(249, 168, 37)", colour  # the yellow of the four warning colours
        # within one poll, plus the page's 0.1 s look and the browser's share
        assert shown_after < INTERVAL_S + 0.5, f"alarm on the page {shown_after:.2f} s after the device changed"
        await page.screenshot(path=str(ARTIFACTS / "2-yellow-alarm.png"), full_page=True)

        # Back below: the latch holds the level until someone acknowledges.
        await server.set_point(1, conc, 10)
        await until(lambda: gw.desk.engine.snapshot()["gas.lel1"].latched)
        await page.locator('button.ack[data-rule="gas.lel1"]').click()
        await page.wait_for_function("() => document.getElementById('message').textContent.includes('Log in first')")
        assert gw.desk.engine.snapshot()["gas.lel1"].level == Level.III_YELLOW  # nothing acknowledged without a login

        await page.fill('#login input[name="user"]', "li")
        await page.fill('#login input[name="password"]', "wrong password")
        await page.click('#login button[type="submit"]')
        await page.wait_for_function("() => document.getElementById('message').textContent.includes('wrong user name or password')")

        await page.fill('#login input[name="user"]', "li")
        await page.fill('#login input[name="password"]', "correct horse")
        await page.click('#login button[type="submit"]')
        await page.wait_for_function("() => document.getElementById('login-state').textContent.includes('Logged in as li')")
        await page.locator('button.ack[data-rule="gas.lel1"]').click()
        await until(lambda: gw.desk.engine.snapshot()["gas.lel1"].level == Level.NONE, timeout=5)
        await page.wait_for_function("() => document.querySelector('.alarm[data-rule=\"gas.lel1\"]')?.dataset.colour === 'none'")
        assert "acknowledged by li" in (await page.locator("#message").text_content() or "")
        await page.screenshot(path=str(ARTIFACTS / "3-acknowledged.png"), full_page=True)

        # The trend of a point: drawn from the gateway's ring, no request leaves the machine.
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        await page.locator('tr[data-point="lel1.conc"]').click()
        await page.wait_for_function("() => document.getElementById('trend-name').textContent === 'lel1.conc'")
        loop = asyncio.get_running_loop()
        raw = await loop.run_in_executor(None, lambda: urllib.request.urlopen(f"{url}api/trend/0", timeout=5).read())
        series = json.loads(raw)["series"]
        assert series[-1][1] == 10.0 and max(hi for _, _, hi in series) == 31.0, series  # the spike stays in the trend
        assert all(r.startswith(url) for r in requests), requests
        await page.screenshot(path=str(ARTIFACTS / "4-trend.png"), full_page=True)


async def test_acknowledging_over_http_needs_the_login_cookie_and_the_header(detector) -> None:
    server, cfg = detector
    await server.set_point(1, cfg.devices[0].points[0], 70)
    async with running(Gateway(cfg)) as gw:
        await until(lambda: gw.status_server is not None and gw.status_server.bound_port
                     and gw.desk.engine.snapshot()["gas.lel1"].level == Level.I_RED)
        base = f"http://127.0.0.1:{gw.status_server.bound_port}"

        def post(path: str, body: dict[str, str], headers: dict[str, str]) -> tuple[int, dict[str, object], str]:
            req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json", **headers})
            try:
                with urllib.request.urlopen(req, timeout=10) as res:
                    return res.status, json.loads(res.read()), res.headers.get("Set-Cookie", "")
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read()), ""

        loop = asyncio.get_running_loop()
        code, _, _ = await loop.run_in_executor(None, post, "/api/ack", {"rule": "gas.lel1"}, {"X-Yujing": "1"})
        assert code == 401
        code, _, _ = await loop.run_in_executor(None, post, "/api/login", {"user": "li", "password": "correct horse"}, {})
        assert code == 403  # no X-Yujing header: what a cross-site form would send
        code, body, cookie = await loop.run_in_executor(None, post, "/api/login", {"user": "li", "password": "correct horse"},
                                                        {"X-Yujing": "1"})
        assert code == 200 and body["user"] == "li"
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        token = cookie.split(";")[0]
        code, body, _ = await loop.run_in_executor(None, post, "/api/ack", {"rule": "gas.lel1"}, {"X-Yujing": "1", "Cookie": token})
        assert code == 200 and "acknowledged by li" in str(body["message"]), body
        assert gw.desk.engine.snapshot()["gas.lel1"].acked
        # five wrong passwords lock the address out, the right one too, for a minute
        for _ in range(5):
            await loop.run_in_executor(None, post, "/api/login", {"user": "li", "password": "nope nope"}, {"X-Yujing": "1"})
        code, _, _ = await loop.run_in_executor(None, post, "/api/login", {"user": "li", "password": "correct horse"}, {"X-Yujing": "1"})
        assert code == 429
        # Prometheus metrics on the same port, built at the first scrape
        from prometheus_client.parser import text_string_to_metric_families

        scraped = await loop.run_in_executor(None, lambda: urllib.request.urlopen(base + "/metrics", timeout=10).read().decode())
        families = {f.name: f for f in text_string_to_metric_families(scraped)}
        assert gw.metrics is not None and "yujing_polls" in families and "yujing_rule_level" in families, sorted(families)
        assert {s.labels["rule"]: s.value for s in families["yujing_rule_level"].samples}["gas.lel1"] == 4.0  # I red
        # garbage on the socket gets a 400 and the gateway polls on
        readings = gw.readings
        r, w = await asyncio.open_connection("127.0.0.1", gw.status_server.bound_port)
        w.write(b"GET / HTTP/1.1\r\nthis is not a header\r\n\r\n")
        assert (await r.read()).startswith(b"HTTP/1.1 400")
        for head in (b"X-A: " + b"a" * 20000 + b"\r\n", b"Cookie: " + b"c" * 3000 + b"\r\n", b"X-B: 1\r\n" * 100):
            r, w = await asyncio.open_connection("127.0.0.1", gw.status_server.bound_port)
            w.write(b"GET / HTTP/1.1\r\n" + head + b"\r\n")
            assert (await r.read()).startswith(b"HTTP/1.1 400"), head[:20]
        await until(lambda: gw.readings > readings + 2)


async def test_yujing_status_prints_the_overview_through_the_control_socket(detector, tmp_path: Path) -> None:
    server, cfg = detector
    conc, temp = cfg.devices[0].points
    await server.set_point(1, conc, 26.5)
    await server.set_point(1, temp, 19)
    async with running(Gateway(cfg)) as gw:
        await until(lambda: gw.desk is not None and gw.desk.engine.snapshot()["gas.lel1"].level == Level.III_YELLOW)
        loop = asyncio.get_running_loop()
        cmd = [sys.executable, "-m", "gateway.cli", "status", str(tmp_path / "site.toml")]
        text = await loop.run_in_executor(None, lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=30))
        as_json = await loop.run_in_executor(None, lambda: subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=30))
    assert text.returncode == 0, text.stderr
    assert "gas.lel1" in text.stdout and "III_YELLOW" in text.stdout and "26.5" in text.stdout, text.stdout
    overview = json.loads(as_json.stdout)
    [device] = overview["devices"]
    assert device["state"] == "online"
    assert {p["name"]: p["value"] for p in device["points"]} == {"conc": "26.5", "temp": 19}
    assert overview["alarms"][0]["level_name"] == "III_YELLOW"
    assert overview["alarms"][0]["inputs"] == [{"point": "lel1.conc", "unit": "%LEL", "value": "26.5"}]
    assert overview["uplink"]["connected"] is True and overview["spool"]["known"] is True
    checked = subprocess.run([sys.executable, "-m", "gateway.cli", "check", str(tmp_path / "site.toml")], capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0 and "status page http://127.0.0.1:0/ (acknowledging on)" in checked.stdout, checked


def test_the_users_file_holds_hashes_only_is_private_and_checks_passwords(tmp_path: Path) -> None:
    path = tmp_path / "users"
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "status-user", str(path), "li", "--password-stdin"],
                          input="correct horse\n", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert "correct horse" not in path.read_text() and "correct horse" not in done.stdout
    known = users.load(path)
    assert users.verify(known, "li", "correct horse") and not users.verify(known, "li", "correct hors")
    assert not users.verify(known, "nobody", "correct horse")
    short = subprocess.run([sys.executable, "-m", "gateway.cli", "status-user", str(path), "wu", "--password-stdin"],
                           input="short\n", capture_output=True, text=True, timeout=30)
    assert short.returncode == 1 and "at least 8" in short.stderr
    path.chmod(0o644)
    with pytest.raises(users.UsersFileError, match="chmod 600"):
        users.load(path)
