"""The test broker itself: a `private_mosquitto` restart must keep persistent sessions and what they queued, or
every outage test that restarts it proves less than it claims (it did not, when run as root: see conftest)."""

from __future__ import annotations

import asyncio

import aiomqtt

from tests.conftest import Broker


async def test_a_restarted_private_broker_keeps_queued_messages_for_a_persistent_session(private_mosquitto: Broker) -> None:
    port = private_mosquitto.port
    async with aiomqtt.Client("127.0.0.1", port, identifier="platform", clean_session=False) as c:
        await c.subscribe("t/#", qos=1)
    async with aiomqtt.Client("127.0.0.1", port, identifier="pub") as p:
        await p.publish("t/a", b"before", qos=1)
    private_mosquitto.start()  # a restart while the platform is away
    async with aiomqtt.Client("127.0.0.1", port, identifier="pub") as p:
        await p.publish("t/a", b"after", qos=1)
    got: list[bytes] = []
    async with aiomqtt.Client("127.0.0.1", port, identifier="platform", clean_session=False) as c:
        async with asyncio.timeout(5):
            async for m in c.messages:
                got.append(bytes(m.payload))  # type: ignore[arg-type]
                if len(got) == 2:
                    break
    assert got == [b"before", b"after"]
