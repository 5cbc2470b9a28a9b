"""Events and owner notifications out to a real Mosquitto through the durable outbox: topics, retained
availability and state, acknowledgement of notifications, and nothing lost while the broker is down."""
from __future__ import annotations

import asyncio

import grpc
from prometheus_client import REGISTRY

from incar.v1 import actions_pb2, vehicle_pb2, vehicle_pb2_grpc
from service.config import load_config
from service.server import Application
from tests.conftest import base_overrides
from tests.mqtt.conftest import Subscriber


def mqtt_overrides(port: int, *extra: str) -> list[str]:
    return ["mqtt.enabled=true", f"mqtt.port={port}", "mqtt.vehicle_id=test-car", "mqtt.reconnect_min_s=0.1",
            "mqtt.reconnect_max_s=0.5", "mqtt.publish_timeout_s=3", *extra]


async def start_app(tmp_path, port: int, *extra: str) -> Application:
    app = Application(load_config(env={}, overrides=base_overrides(tmp_path) + mqtt_overrides(port, *extra)))
    await app.start()
    return app


def notify(app: Application, n: int) -> actions_pb2.VehicleAction:
    return app.actions.request("owner_notification", reason=f"test notification {n}", priority="safety",
                               parameters={"title": f"Notice {n}", "body": f"Body {n}"})


async def test_events_notifications_availability_and_state_on_their_topics(tmp_path, broker):
    b = broker().start()
    async with Subscriber(b.port, "incar/test-car/#") as sub:
        app = await start_app(tmp_path, b.port)
        try:
            await sub.wait_for(lambda: "online" in sub.on("/availability"), what="availability online")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
                await vehicle_pb2_grpc.VehicleStub(ch).UpdateState(vehicle_pb2.VehicleState(
                    gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF, locked=True))
            action = notify(app, 1)
            await sub.wait_for(lambda: sub.on("/notifications"), what="the notification")
            [note] = sub.on("/notifications")
            assert (note["id"], note["title"], note["body"], note["priority"]) == (action.id, "Notice 1", "Body 1",
                                                                                  "safety")
            # Delivered to the broker counts as done: the gateway need not also answer for it.
            for _ in range(100):
                if app.actions.get(action.id).state == actions_pb2.ACTION_STATE_ACKNOWLEDGED:
                    break
                await asyncio.sleep(0.05)
            status = app.actions.get(action.id)
            assert status.state == actions_pb2.ACTION_STATE_ACKNOWLEDGED and "mqtt" in status.detail
            await sub.wait_for(lambda: any(t.startswith("incar/test-car/events/vehicle/") for t, _, _ in sub.messages),
                               what="a vehicle event")
            events = [t for t, _, _ in sub.messages if "/events/" in t]
            assert all(t.count(".") == 0 for t in events)        # kinds map to topic levels
            await sub.wait_for(lambda: any(s.get("locked") for s in sub.on("/state")), what="state locked")
        finally:
            await app.stop(0.2)
    # A new subscriber gets the retained ones: availability now "offline" (said on the way out) and the last state.
    async with Subscriber(b.port, "incar/test-car/+", client_id="late") as late:
        await late.wait_for(lambda: late.on("/availability") and late.on("/state"), what="retained topics")
        assert late.on("/availability")[-1] == "offline" and late.on("/state")[-1]["locked"] is True
        assert all(retain for _, _, retain in late.messages)
    b.stop()


async def test_notifications_raised_while_the_broker_is_down_are_delivered_when_it_returns(tmp_path, broker):
    b = broker().start()
    app = await start_app(tmp_path, b.port)
    sent = []
    try:
        async with Subscriber(b.port, "incar/test-car/notifications") as sub:
            for n in range(5):
                sent.append(notify(app, n).id)
            await sub.wait_for(lambda: len(sub.on("/notifications")) >= 5, what="the first five")
            b.stop()                                   # mid-stream: the broker goes away
            for n in range(5, 15):
                sent.append(notify(app, n).id)
                await asyncio.sleep(0.02)
            assert REGISTRY.get_sample_value("incar_mqtt_connected") == 0
            b.start()                                  # and comes back on the same port
            for n in range(15, 20):
                sent.append(notify(app, n).id)
            await sub.wait_for(lambda: set(sent) <= {m["id"] for m in sub.on("/notifications")},
                               what="every notification")
            got = [m["id"] for m in sub.on("/notifications")]
            first_seen = list(dict.fromkeys(got))
            assert first_seen == sent                  # none lost, in the order they were raised
    finally:
        await app.stop(0.2)
        b.stop()
