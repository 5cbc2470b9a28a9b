"""What `Application` wires: the outbox (always, so nothing committed while MQTT is off is owed twice), and when
`mqtt.enabled`, the bridge, its wake-ups, and in development a local Mosquitto child."""
from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from service.mqtt.bridge import MqttBridge, StateProvider
from service.mqtt.commands import Commands, SetArmed
from service.mqtt.config import MqttConfig
from service.mqtt.outbox import Outbox

log = structlog.get_logger(__name__)


class MqttLink:
    def __init__(self, config: MqttConfig, db, events, actions, *, data_dir: Path, tokens: dict | None = None,
                 state: StateProvider | None = None, set_sentinel_armed: SetArmed | None = None):
        self.config = config
        self.events = events
        self.data_dir = Path(data_dir)
        self.outbox = Outbox(db, events, actions, base_topic=config.base_topic, event_kinds=config.event_kinds)
        self.bridge = MqttBridge(config, self.outbox, actions=actions, state=state,
                                 commands=Commands(tokens or {}, set_sentinel_armed))
        actions.on_delivery(self.bridge.wake)
        self.broker = None

    def prepare(self) -> None:
        """After db.migrate(); starts the development broker when configured."""
        self.outbox.prepare()
        if self.config.enabled and self.config.local_broker:
            from service.mqtt.broker import LocalBroker, listening
            if listening(self.config.host, self.config.port):   # a broker is already there (a system one)
                log.info("mqtt.local_broker_present", host=self.config.host, port=self.config.port)
                return
            self.broker = LocalBroker(self.data_dir / "mosquitto", self.config.port, host=self.config.host).start()
            log.info("mqtt.local_broker", host=self.config.host, port=self.config.port)

    def tasks(self) -> list[asyncio.Task]:
        if not self.config.enabled:
            return []
        return [asyncio.create_task(self.bridge.run(), name="mqtt"),
                asyncio.create_task(self._watch_events(), name="mqtt-events")]

    async def _watch_events(self) -> None:
        # The event log wakes its followers on commit; following it is how the bridge hears of new events.
        async for _event in self.events.follow(self.events.latest_cursor()):
            self.bridge.wake()

    async def close(self) -> None:
        if self.config.enabled:
            await self.bridge.close()

    def stop_broker(self) -> None:
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
