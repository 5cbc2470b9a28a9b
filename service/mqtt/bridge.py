"""The MQTT link (after Frigate's MQTT interface): events and owner notifications out through the durable outbox,
availability as a retained last will, the car's state retained, and Sentinel commands in.

Topics under `<topic_prefix>/<vehicle_id>`:
  availability             "online" / "offline", retained; "offline" is also the last will (a crash says so)
  state                    JSON, retained: vehicle mode, locked, Sentinel armed (published when it changes)
  events/<kind with / for .>   JSON per event, QoS 1 (e.g. events/sentinel/alert)
  notifications            JSON per owner notification, QoS 1
  sentinel/set             in (when mqtt.commands): {"armed": true|false, "token": "...", "request_id": "..."}
  sentinel/result          out: the answer to each command
"""
from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable

import aiomqtt
import structlog

from service.mqtt import metrics
from service.mqtt.commands import Commands
from service.mqtt.config import MqttConfig
from service.mqtt.outbox import Outbox

log = structlog.get_logger(__name__)

StateProvider = Callable[[], dict]


class MqttBridge:
    def __init__(self, config: MqttConfig, outbox: Outbox, *, actions=None, state: StateProvider | None = None,
                 commands: Commands | None = None):
        self.config = config
        self.outbox = outbox
        self.actions = actions              # the ActionQueue: notifications are acknowledged once published
        self.state = state
        self.commands = commands if config.commands else None
        self.base = config.base_topic
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_state: bytes | None = None
        self._client: aiomqtt.Client | None = None

    def wake(self, *_args) -> None:
        """Something was committed (thread-safe; ActionQueue.on_delivery and the event watcher call it)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Connect, drain the outbox, follow; on any broker trouble, back off and connect again. Forever."""
        self._loop = asyncio.get_running_loop()
        backoff = self.config.reconnect_min_s
        while True:
            try:
                async with self._connect() as client:
                    self._client = client
                    metrics.CONNECTS.labels("connected").inc()
                    metrics.CONNECTED.set(1)
                    log.info("mqtt.connected", host=self.config.host, port=self.config.port, base=self.base)
                    backoff = self.config.reconnect_min_s
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                metrics.CONNECTS.labels("failed").inc()
                log.warning("mqtt.disconnected", error=str(exc), retry_in_s=backoff)
            except Exception as exc:   # a bug or a store error must not end MQTT for the life of the process
                metrics.CONNECTS.labels("failed").inc()
                log.error("mqtt.session_failed", error=repr(exc), retry_in_s=backoff, exc_info=True)
            finally:
                self._client = None
                metrics.CONNECTED.set(0)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.reconnect_max_s)

    async def close(self) -> None:
        """Graceful stop: say "offline" (retained) before leaving, as the last will would after a crash."""
        client = self._client
        if client is not None:
            try:
                await client.publish(f"{self.base}/availability", b"offline", qos=self.config.qos, retain=True,
                                     timeout=2.0)
            except aiomqtt.MqttError:
                pass

    def _connect(self) -> aiomqtt.Client:
        cfg = self.config
        tls = None
        if cfg.tls:
            tls = ssl.create_default_context(cafile=cfg.ca_file or None)
            if cfg.cert_file:
                tls.load_cert_chain(cfg.cert_file, cfg.key_file)
        return aiomqtt.Client(
            cfg.host, cfg.port, username=cfg.username or None, password=cfg.secret(),
            identifier=cfg.client_id or f"incar-{cfg.vehicle_id}", keepalive=cfg.keepalive_s, tls_context=tls,
            timeout=cfg.publish_timeout_s, clean_session=True, max_inflight_messages=max(20, cfg.batch),
            will=aiomqtt.Will(f"{self.base}/availability", b"offline", qos=cfg.qos, retain=True))

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.publish(f"{self.base}/availability", b"online", qos=self.config.qos, retain=True)
        self._last_state = None
        tasks = [asyncio.create_task(self._drain(client), name="mqtt-outbox")]
        if self.commands is not None:
            await client.subscribe(f"{self.base}/sentinel/set", qos=self.config.qos)
            tasks.append(asyncio.create_task(self._listen(client), name="mqtt-commands"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()          # re-raises the MqttError that ended the session
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _drain(self, client: aiomqtt.Client) -> None:
        cfg = self.config
        while True:
            self._wake.clear()
            await self._publish_state(client)
            batch = await asyncio.to_thread(self.outbox.pending, cfg.batch)
            if batch:
                # In flight together; the cursor moves only when the broker acknowledged all of them.
                await asyncio.gather(*(client.publish(m.topic, m.payload, qos=cfg.qos) for m in batch))
                await asyncio.to_thread(self._published, batch)
                continue
            await asyncio.to_thread(self.outbox.skip_idle)
            for source, value in (await asyncio.to_thread(self.outbox.backlog)).items():
                metrics.BACKLOG.labels(source).set(value)
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)   # 1 s: the state topic also follows skills
            except TimeoutError:
                pass

    def _published(self, batch) -> None:
        """The broker has every message of `batch`: move the cursors, and count the notifications delivered."""
        self.outbox.advance(batch)
        for m in batch:
            metrics.PUBLISHED.labels(m.source).inc()
        delivered = [m.action_id for m in batch if m.action_id]
        if delivered and self.actions is not None and self.config.acknowledge_notifications:
            # Those acknowledged or expired meanwhile stay as they are: the publish happened all the same.
            self.actions.acknowledge_all(delivered, f"published to mqtt {self.config.host}:{self.config.port}")

    async def _publish_state(self, client: aiomqtt.Client) -> None:
        if self.state is None:
            return
        payload = json.dumps(self.state(), sort_keys=True, separators=(",", ":")).encode()
        if payload != self._last_state:
            await client.publish(f"{self.base}/state", payload, qos=self.config.qos, retain=True)
            self._last_state = payload

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            reply = await self.commands.sentinel(bytes(message.payload or b""), bool(message.retain))
            log.info("mqtt.command", command="sentinel", ok=reply["ok"], code=reply.get("code"))
            await client.publish(f"{self.base}/sentinel/result", json.dumps(reply, sort_keys=True).encode(),
                                 qos=self.config.qos)
            self.wake()

