"""A real Mosquitto on a free port per test, and a subscriber that survives broker restarts (persistent session)."""
from __future__ import annotations

import asyncio
import json

import aiomqtt
import pytest

from service.mqtt.broker import LocalBroker
from tests.conftest import free_port


@pytest.fixture
def broker(tmp_path):
    made = []

    def make(**options) -> LocalBroker:
        b = LocalBroker(tmp_path / f"mosquitto{len(made)}", free_port(), **options)
        made.append(b)
        return b
    yield make
    for b in made:
        b.kill()


class Subscriber:
    """Collects every message under `topic`, reconnecting with the same client id and a persistent session, so
    what the broker queued for it while it was away (or restarting) still arrives."""

    def __init__(self, port: int, topic: str, client_id: str = "test-subscriber", **client_options):
        self.port, self.topic, self.client_id, self.options = port, topic, client_id, client_options
        self.messages: list[tuple[str, bytes, bool]] = []
        self.connected = asyncio.Event()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.connected.wait(), 30)
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier=self.client_id, clean_session=False,
                                          **self.options) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.connected.set()
                    async for message in client.messages:
                        self.messages.append((str(message.topic), bytes(message.payload), bool(message.retain)))
                        self._arrived.set()
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.2)

    def on(self, suffix: str) -> list[dict | str]:
        out = []
        for topic, payload, _ in self.messages:
            if topic.endswith(suffix):
                try:
                    out.append(json.loads(payload))
                except ValueError:
                    out.append(payload.decode())
        return out

    async def wait_for(self, predicate, timeout: float = 60.0, what: str = "") -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what or predicate}; got "
                                     f"{[(t, p[:120]) for t, p, _ in self.messages]}")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass
