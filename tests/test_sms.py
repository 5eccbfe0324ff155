"""SMS to the people responsible, through a simulated modem on a real pseudo-terminal: the AT dialogue is
checked by the modem, the PDUs are decoded by an independent implementation (python-gsmmodem-new)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from gsmmodem.pdu import decodeSmsPdu

from device_drivers import gsm
from gateway.app import Gateway
from gateway.sim.modem import SimModem

from .e2e import running
from .rig import gas_config, gas_rig, until

LONG = "【预警】KM-CHEM-01 储运装卸区 chem.lel.t101 橙色预警（II级）：lel1.conc=52.5%LEL，07:15。请立即到现场处置并回复。" * 2


def test_long_chinese_texts_split_into_parts_an_independent_decoder_puts_together() -> None:
    pdus = gsm.encode_submit("+8613800000001", LONG, reference=7)
    decoded = [decodeSmsPdu(p.hex) for p in pdus]
    assert len(pdus) == 3 and all(d["number"] == "+8613800000001" for d in decoded)
    assert "".join(d["text"] for d in decoded) == LONG
    assert [(d["udh"][0].reference, d["udh"][0].parts, d["udh"][0].number) for d in decoded] == [(7, 3, 1), (7, 3, 2), (7, 3, 3)]
    assert all(p.tpdu_length == len(p.hex) // 2 - 1 for p in pdus)
    short = gsm.encode_submit("13800000001", "水库水位超汛限")
    assert len(short) == 1 and decodeSmsPdu(short[0].hex)["text"] == "水库水位超汛限"


def test_a_split_never_cuts_a_surrogate_pair() -> None:
    text = "水" * 66 + "😀" + "库" * 10  # the emoji's two code units fall on the part boundary
    parts = gsm.split_units(text)
    assert all(len(p) // 2 <= gsm.PART_UNITS for p in parts)
    assert "".join(p.decode("utf-16-be") for p in parts) == text


def test_numbers_are_checked() -> None:
    with pytest.raises(ValueError, match="not a phone number"):
        gsm.encode_number("call me")
    assert gsm.encode_number("+8613800000001").hex() == "0d91683108000000f1"


def sms_uplink(port: str, **over: object) -> str:
    options = {"level": '"III_YELLOW"', "fold_s": 600, "max_per_hour": 6, "retries": 3, "retry_s": 0.5, "only_when_uplink_down_s": 0, **over}
    lines = "\n".join(f"{k} = {v}" for k, v in options.items())
    return f"""
[[uplinks]]
kind = "sms"
name = "duty"
port = "{port}"
site_name = "化工园区"
{lines}
recipients = [
  {{ name = "张三", role = "行政责任人", number = "+8613800000001" }},
  {{ name = "李四", role = "技术责任人", number = "+8613800000002" }},
]
"""


async def test_an_alarm_texts_every_recipient_in_chinese(mosquitto, tmp_path: Path) -> None:
    modem = SimModem(decode=decodeSmsPdu)
    modem.start()
    try:
        async with gas_rig() as rig:
            cfg = gas_config(mosquitto.port, tmp_path, rig.port, extra=sms_uplink(modem.path))
            await rig.gas(cfg, 5)
            async with running(Gateway(cfg)) as gw:
                await until(lambda: gw.readings > 2, what="polling")
                await rig.gas(cfg, 30)  # yellow
                await until(lambda: len(modem.messages) >= 2, timeout=15, what="two texts")
                await rig.gas(cfg, 55)  # orange
                await until(lambda: len(modem.messages) >= 4, timeout=15, what="four texts")
    finally:
        modem.close()
    assert modem.errors == []
    assert modem.commands[:6] == ["AT", "ATE0", "AT+CMEE=1", "AT+CPIN?", "AT+CREG?", "AT+CMGF=0"]
    texts = [(m["number"], m["text"]) for m in modem.messages]
    assert {n for n, _ in texts} == {"+8613800000001", "+8613800000002"}
    assert "化工园区" in texts[0][1] and "黄色(III级)预警" in texts[0][1] and "lel1.conc=30%LEL" in texts[0][1]
    assert "升级为橙色(II级)预警" in texts[2][1]


async def test_a_flapping_alarm_is_folded_and_each_recipient_is_rate_limited(mosquitto, tmp_path: Path) -> None:
    modem = SimModem(decode=decodeSmsPdu)
    modem.start()
    try:
        async with gas_rig() as rig:
            cfg = gas_config(mosquitto.port, tmp_path, rig.port, extra=sms_uplink(modem.path, max_per_hour=2, fold_s=4))
            cfg = cfg.__class__(**{**cfg.__dict__, "rules": tuple(r.__class__(**{**r.__dict__, "latch": False}) for r in cfg.rules)})
            await rig.gas(cfg, 5)
            async with running(Gateway(cfg)) as gw:
                await until(lambda: gw.readings > 2, what="polling")
                for _ in range(3):  # yellow, gone, yellow, gone … within fold_s: one text each
                    await rig.gas(cfg, 30)
                    await asyncio.sleep(0.6)
                    await rig.gas(cfg, 5)
                    await asyncio.sleep(0.6)
                await until(lambda: len(modem.messages) >= 2, timeout=15, what="texts")
                await rig.gas(cfg, 55)  # orange: a new level is a new text …
                await until(lambda: len(modem.messages) >= 4, timeout=15, what="orange texts")
                await rig.gas(cfg, 5)
                await asyncio.sleep(4.5)  # past fold_s: yellow again would be texted, but it is the third this hour
                await rig.gas(cfg, 30)
                uplink = gw.extra_uplinks[0]
                await until(lambda: uplink.rate_limited >= 2, timeout=10, what="rate limit")
    finally:
        modem.close()
    assert len(modem.messages) == 4 and uplink.folded >= 2 and uplink.rate_limited == 2


async def test_modem_faults_are_gateway_faults_and_texts_go_once_it_works(mosquitto, tmp_path: Path) -> None:
    modem = SimModem(decode=decodeSmsPdu)
    modem.mode = "no_sim"
    modem.start()
    try:
        async with gas_rig() as rig:
            cfg = gas_config(mosquitto.port, tmp_path, rig.port, extra=sms_uplink(modem.path))
            await rig.gas(cfg, 30)
            async with running(Gateway(cfg)) as gw:
                await until(lambda: gw.health is not None and "uplink.sms.duty" in gw.health.faults, timeout=15, what="modem fault")
                no_sim = gw.health.faults["uplink.sms.duty"]
                modem.mode = "no_credit"
                await until(lambda: "no credit" in gw.health.faults.get("uplink.sms.duty", ""), timeout=20, what="credit fault")
                credit = gw.health.faults["uplink.sms.duty"]
                modem.mode = "ok"
                await until(lambda: len(modem.messages) >= 2, timeout=20, what="texts after recovery")
                await until(lambda: "uplink.sms.duty" not in gw.health.faults, what="fault cleared")
    finally:
        modem.close()
    assert "SIM not" in no_sim and "+CMS ERROR: 21" in credit


async def test_only_when_the_platform_has_been_away_long_enough(private_mosquitto, tmp_path: Path) -> None:
    modem = SimModem(decode=decodeSmsPdu)
    modem.start()
    try:
        async with gas_rig() as rig:
            cfg = gas_config(private_mosquitto.port, tmp_path, rig.port, extra=sms_uplink(modem.path, only_when_uplink_down_s=1))
            await rig.gas(cfg, 5)
            async with running(Gateway(cfg)) as gw:
                await until(lambda: gw.uplink is not None and gw.uplink.connected, what="uplink")
                await rig.gas(cfg, 30)  # the platform is there: it tells people, the gateway does not text
                await asyncio.sleep(2.0)
                assert modem.messages == []
                private_mosquitto.stop()
                await until(lambda: not gw.uplink.connected, what="uplink down")
                await rig.gas(cfg, 55)  # the platform cannot hear of this one: text it once the link is away for 1 s
                await until(lambda: len(modem.messages) >= 2, timeout=15, what="texts")
    finally:
        modem.close()
    assert all("橙色" in m["text"] for m in modem.messages)
