"""MQTT outbox throughput: owner notifications committed to the action queue (one durable commit each, fsync)
and published through the durable outbox (read, publish QoS 1, wait for every PUBACK, move the cursor,
acknowledge the batch) against bare aiomqtt QoS 1 publishes of the same payloads to the same Mosquitto in the
same run (no store at all: the ceiling). Then an outage: the broker is stopped, `--outage` notifications are
raised, it is started again, and the time from its return to the last delivery is reported (reconnect back-off
included). Rounds alternate the two so other load hits both. Last line: JSON.

    .venv/bin/python bench/mqtt_outbox.py [--messages 300] [--rounds 3] [--outage 200]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.actions.queue import ActionQueue  # noqa: E402
from service.mqtt.broker import LocalBroker  # noqa: E402
from service.mqtt.config import MqttConfig  # noqa: E402
from service.mqtt.link import MqttLink  # noqa: E402
from service.store.db import Database  # noqa: E402
from service.store.events import EventLog  # noqa: E402
from tests.conftest import free_port  # noqa: E402


class Counter:
    """Counts notifications arriving at a subscriber."""

    def __init__(self, port: int):
        self.port, self.ids, self.arrived = port, set(), asyncio.Event()

    async def run(self, ready: asyncio.Event) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier="bench-sub", clean_session=False) as c:
                    await c.subscribe("bench/bare", qos=1)
                    await c.subscribe("bench/car/notifications", qos=1)
                    ready.set()
                    async for m in c.messages:
                        self.ids.add(json.loads(m.payload)["id"])
                        self.arrived.set()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    async def until(self, expected: set[str]) -> None:
        while not expected <= self.ids:
            self.arrived.clear()
            await self.arrived.wait()


async def bare_round(port: int, counter: Counter, n: int, tag: str) -> float:
    payloads = [(f"{tag}-{i}", json.dumps({"id": f"{tag}-{i}", "body": f"Body {i}"}).encode()) for i in range(n)]
    started = time.perf_counter()
    async with aiomqtt.Client("127.0.0.1", port, identifier="bench-bare") as client:
        for start in range(0, n, 32):      # the same batch size the outbox uses
            await asyncio.gather(*(client.publish("bench/bare", p, qos=1) for _, p in payloads[start:start + 32]))
    await counter.until({i for i, _ in payloads})
    return n / (time.perf_counter() - started)


def raise_notifications(queue: ActionQueue, n: int) -> set[str]:
    return {queue.request("owner_notification", reason="bench", parameters={"body": f"Body {i}"}).id
            for i in range(n)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--outage", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="incar-bench-mqtt-"))
    broker = LocalBroker(work / "broker", free_port()).start()
    db = Database(work / "incar.db")
    events, queue = EventLog(db), ActionQueue(db)
    link = MqttLink(MqttConfig(enabled=True, port=broker.port, topic_prefix="bench", reconnect_min_s=0.05,
                               reconnect_max_s=0.2), db, events, queue, data_dir=work)
    db.migrate()
    link.prepare()
    counter = Counter(broker.port)
    ready = asyncio.Event()
    tasks = [asyncio.create_task(counter.run(ready)), *link.tasks()]
    await ready.wait()
    bare, outbox = [], []
    for r in range(args.rounds):
        bare.append(await bare_round(broker.port, counter, args.messages, f"r{r}"))
        started = time.perf_counter()
        await counter.until(raise_notifications(queue, args.messages))
        outbox.append(args.messages / (time.perf_counter() - started))
        print(f"round {r + 1}: bare aiomqtt {bare[-1]:7.0f} msg/s   outbox {outbox[-1]:7.0f} msg/s   "
              f"ratio {outbox[-1] / bare[-1]:.2f}", flush=True)
    broker.stop()
    owed = raise_notifications(queue, args.outage)
    await asyncio.sleep(0.5)
    back = time.perf_counter()
    broker.start()
    await counter.until(owed)
    recovery = time.perf_counter() - back
    lost = len(owed - counter.ids)
    print(f"outage: {args.outage} notifications raised while the broker was down, all delivered "
          f"{recovery:.2f} s after it returned (lost: {lost})")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    broker.stop()
    db.close()
    ratios = [o / b for o, b in zip(outbox, bare)]
    print(json.dumps({"bench": "mqtt_outbox", "messages": args.messages, "rounds": args.rounds,
                      "bare_msgs_per_s": round(statistics.median(bare), 1),
                      "outbox_msgs_per_s": round(statistics.median(outbox), 1),
                      "outbox_vs_bare_ratio": round(statistics.median(ratios), 3),
                      "outage_messages": args.outage, "outage_recovery_s": round(recovery, 3),
                      "outage_drain_msgs_per_s": round(args.outage / recovery, 1),
                      "outage_lost": lost}))


if __name__ == "__main__":
    asyncio.run(main())
