"""The service killed (-9) between commit and publish owes the broker nothing it lost; the last will says it
went offline; Sentinel commands come in only with a token whose role may arm or disarm; TLS and passwords."""
from __future__ import annotations

import asyncio
import hashlib
import json
import ssl

import aiomqtt
import grpc
import pytest
from prometheus_client import REGISTRY

from incar.v1 import events_pb2, events_pb2_grpc, vehicle_pb2, vehicle_pb2_grpc
from service.mqtt.broker import mosquitto_binary, password_entry
from service.security.devca import make_dev_pki
from tests.mqtt.conftest import Subscriber
from tests.mqtt.test_mqtt_outbox import mqtt_overrides, start_app


def as_sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


async def committed_kinds(target: str) -> list[str]:
    async with grpc.aio.insecure_channel(target) as ch:
        listed = await events_pb2_grpc.EventsStub(ch).ListEvents(events_pb2.ListEventsRequest(kinds=["vehicle."]))
    return [e.kind for e in listed.events]


async def test_events_committed_before_a_kill_9_are_published_after_the_restart(tmp_path, broker, server_process):
    b = broker()                                     # not running yet: nothing can be published
    server = server_process(as_sets(mqtt_overrides(b.port))).start()
    async with grpc.aio.insecure_channel(server.target) as ch:
        vehicle = vehicle_pb2_grpc.VehicleStub(ch)
        await vehicle.UpdateState(vehicle_pb2.VehicleState(gear=vehicle_pb2.GEAR_DRIVE, speed_kmh=30,
                                                           ignition=vehicle_pb2.IGNITION_ON))
        await vehicle.UpdateState(vehicle_pb2.VehicleState(gear=vehicle_pb2.GEAR_PARK, locked=True,
                                                           ignition=vehicle_pb2.IGNITION_OFF))
    owed = await committed_kinds(server.target)
    assert len(owed) >= 2
    server.kill()                                    # SIGKILL: committed, never published
    b.start()
    async with Subscriber(b.port, "incar/test-car/#") as sub:
        server.start()
        await sub.wait_for(lambda: len([t for t, _, _ in sub.messages if "/events/vehicle/" in t]) >= len(owed),
                           what="the events owed from before the kill")
        published = [json.loads(p)["kind"] for t, p, _ in sub.messages if "/events/vehicle/" in t]
        assert published[:len(owed)] == owed
        await sub.wait_for(lambda: "online" in sub.on("/availability"), what="online")
        server.kill()                                # a crash while connected: the broker sends the last will
        await sub.wait_for(lambda: sub.on("/availability")[-1] == "offline", what="the last will")
    b.stop()


async def test_a_kill_right_after_the_commit_with_the_broker_up_is_made_good_on_restart(tmp_path, broker,
                                                                                        server_process, monkeypatch):
    b = broker().start()
    async with Subscriber(b.port, "incar/test-car/#") as sub:
        # The event log SIGKILLs the process right after committing the vehicle state's group: before any publish.
        monkeypatch.setenv("INCAR_FAULT_KILL_AFTER_COMMIT", "vehicle_state")
        server = server_process(as_sets(mqtt_overrides(b.port))).start()
        monkeypatch.delenv("INCAR_FAULT_KILL_AFTER_COMMIT")
        await sub.wait_for(lambda: "online" in sub.on("/availability"), what="online")
        async with grpc.aio.insecure_channel(server.target) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await vehicle_pb2_grpc.VehicleStub(ch).UpdateState(vehicle_pb2.VehicleState(
                    gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF, locked=True), timeout=30)
        server.proc.wait(30)
        await sub.wait_for(lambda: sub.on("/availability")[-1] == "offline", what="the last will")
        assert not any("/events/vehicle/" in t for t, _, _ in sub.messages)
        server.start()
        await sub.wait_for(lambda: any(t.endswith("/events/vehicle/locked") for t, _, _ in sub.messages),
                           what="the committed vehicle.locked event, published after the restart")
        server.kill()
    b.stop()


TOKENS = {"hmi": "hmi-secret-token", "camera": "camera-secret-token"}


def tokens_file(tmp_path) -> str:
    path = tmp_path / "tokens.yaml"
    path.write_text("".join(f"{hashlib.sha256(t.encode()).hexdigest()}: [{role}-client, {role}]\n"
                            for role, t in TOKENS.items()))
    return str(path)


async def test_sentinel_commands_need_a_token_whose_role_may_arm(tmp_path, broker):
    b = broker().start()
    app = await start_app(tmp_path, b.port, "mqtt.commands=true", f"security.tokens_file={tokens_file(tmp_path)}")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:     # parked: Sentinel may arm
            await vehicle_pb2_grpc.VehicleStub(ch).UpdateState(vehicle_pb2.VehicleState(
                gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF, battery_percent=80))
        async with Subscriber(b.port, "incar/test-car/sentinel/result") as sub, \
                aiomqtt.Client("127.0.0.1", b.port, identifier="owner-app") as owner:
            await sub.wait_for(lambda: app.mqtt.bridge._client is not None, what="the bridge connected")
            await asyncio.sleep(0.5)     # its subscription to sentinel/set is made right after connecting

            async def command(body: dict) -> dict:
                count = len(sub.messages)
                await owner.publish("incar/test-car/sentinel/set", json.dumps(body).encode(), qos=1)
                await sub.wait_for(lambda: len(sub.messages) > count, what=f"a reply to {body}")
                return json.loads(sub.messages[-1][1])

            refused = await command({"armed": True, "request_id": "r1"})
            assert (refused["ok"], refused["code"], refused["request_id"]) == (False, "UNAUTHENTICATED", "r1")
            refused = await command({"armed": True, "token": TOKENS["camera"]})
            assert refused["code"] == "PERMISSION_DENIED" and "camera" in refused["error"]
            assert not app.skills.sentinel.armed
            refused = await command({"armed": "yes", "token": TOKENS["hmi"]})
            assert refused["code"] == "INVALID_ARGUMENT" and refused["error"].startswith("armed")
            done = await command({"armed": True, "token": TOKENS["hmi"], "request_id": "r2"})
            assert done["ok"] and done["armed"] and done["by"] == "hmi-client" and app.skills.sentinel.armed
            done = await command({"armed": False, "token": TOKENS["hmi"]})
            assert done["ok"] and not done["armed"] and not app.skills.sentinel.armed
    finally:
        await app.stop(0.2)
        b.stop()


async def test_tls_and_credentials_when_configured(tmp_path, broker):
    pki = tmp_path / "pki"
    make_dev_pki(pki)
    folder = tmp_path / "broker-auth"
    folder.mkdir()
    b = broker(password_file=password_entry(mosquitto_binary(), folder, "incar", "s3cret"),
               tls=(pki / "ca.pem", pki / "server.pem", pki / "server.key")).start()
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    app = await start_app(tmp_path / "good", b.port, "mqtt.tls=true", f"mqtt.ca_file={pki / 'ca.pem'}",
                          "mqtt.username=incar", f"mqtt.password_file={secret}")
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    try:
        async with Subscriber(b.port, "incar/test-car/notifications", username="incar", password="s3cret",
                              tls_context=context) as sub:
            action = app.actions.request("owner_notification", reason="tls test", parameters={"body": "over TLS"})
            await sub.wait_for(lambda: sub.on("/notifications"), what="a notification over TLS")
            assert sub.on("/notifications")[0]["id"] == action.id
    finally:
        await app.stop(0.2)
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-it\n")
    app = await start_app(tmp_path / "bad", b.port, "mqtt.tls=true", f"mqtt.ca_file={pki / 'ca.pem'}",
                          "mqtt.username=incar", f"mqtt.password_file={wrong}", "mqtt.client_id=bad-client")
    try:
        before = REGISTRY.get_sample_value("incar_mqtt_connects_total", {"outcome": "failed"}) or 0
        for _ in range(200):
            if (REGISTRY.get_sample_value("incar_mqtt_connects_total", {"outcome": "failed"}) or 0) > before:
                break
            await asyncio.sleep(0.05)
        assert (REGISTRY.get_sample_value("incar_mqtt_connects_total", {"outcome": "failed"}) or 0) > before
        assert app.mqtt.bridge._client is None
    finally:
        await app.stop(0.2)
        b.stop()
