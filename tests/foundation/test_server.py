"""The server core over real gRPC: health, reflection, vehicle state, durable events with resume cursors."""
from __future__ import annotations

import asyncio
import math
import signal
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from incar.v1 import (events_pb2, events_pb2_grpc, skills_pb2, skills_pb2_grpc, system_pb2, system_pb2_grpc,
                      vehicle_pb2, vehicle_pb2_grpc)
from service.config import load_config
from service.server import Application
from tests.conftest import base_overrides


async def wait_serving(application, service="", timeout=120.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while application.health.status.get(service, (False, ""))[0] is not True:
        assert loop.time() < deadline, f"not SERVING after {timeout}s: {application.health.status}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def app(tmp_path):
    application = Application(load_config(env={}, overrides=base_overrides(tmp_path)))
    await application.start()
    await wait_serving(application)
    yield application
    await application.stop(0.2)


async def test_assistant_is_not_serving_with_a_reason_until_the_model_is_loaded(tmp_path):
    application = Application(load_config(env={}, overrides=base_overrides(tmp_path)))
    await application.start()
    try:
        async with channel(application) as ch:
            first = await health_of(ch, "incar.v1.Assistant")
            status = await system_pb2_grpc.SystemStub(ch).GetStatus(system_pb2.GetSystemStatusRequest())
            reasons = {c.name: c.reason for c in status.components}
            assert first == health_pb2.HealthCheckResponse.NOT_SERVING
            assert "loading model" in reasons["incar.v1.Assistant"]
            assert await health_of(ch, "incar.v1.Events") == health_pb2.HealthCheckResponse.SERVING
            await wait_serving(application, "incar.v1.Assistant")
            assert await health_of(ch) == health_pb2.HealthCheckResponse.SERVING
            status = await system_pb2_grpc.SystemStub(ch).GetStatus(system_pb2.GetSystemStatusRequest())
            assert status.model and status.backend == "cpu"
    finally:
        await application.stop(0.2)


async def test_a_backend_that_fails_falls_back_and_says_why(tmp_path):
    overrides = base_overrides(tmp_path) + ["runtime.backend=qnn-htp", "runtime.fallback_backend=cpu"]
    application = Application(load_config(env={}, overrides=overrides))
    await application.start()
    try:
        await wait_serving(application, "incar.v1.Assistant")
        serving, reason = application.health.status["incar.v1.Assistant"]
        assert serving and "qnn-htp failed" in reason and "serving on cpu" in reason
        assert application.backend_name == "cpu"
    finally:
        await application.stop(0.2)


def channel(app) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")


async def health_of(ch, service=""):
    return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_health_goes_not_serving_with_reason_then_serving_then_down_on_shutdown(app):
    async with channel(app) as ch:
        assert await health_of(ch) == health_pb2.HealthCheckResponse.SERVING
        await app.health.set("incar.v1.Events", False, "store migrating")
        await app.health.refresh_overall()
        assert await health_of(ch, "incar.v1.Events") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await health_of(ch) == health_pb2.HealthCheckResponse.NOT_SERVING
        status = await system_pb2_grpc.SystemStub(ch).GetStatus(system_pb2.GetSystemStatusRequest())
        reasons = {c.name: c.reason for c in status.components}
        assert reasons["incar.v1.Events"] == "store migrating"
        await app.health.set("incar.v1.Events", True)
        await app.health.refresh_overall()
        assert await health_of(ch) == health_pb2.HealthCheckResponse.SERVING
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="incar.v1.Vehicle"))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        await app.health.shutdown()
        second = await asyncio.wait_for(watch.read(), 5)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()


async def test_unknown_health_service_is_not_found(app):
    async with channel(app) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_of(ch, "incar.v1.Nope")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_every_mounted_service(app):
    async with channel(app) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in stub.ServerReflectionInfo(requests())]
        names = {s.name for s in responses[0].list_services_response.service}
        expected = {name for name in app.health.status if name} | {"grpc.health.v1.Health"}
        assert expected <= names, expected - names
        assert {"incar.v1.Events", "incar.v1.Vehicle", "incar.v1.System"} <= names


def _state(**kw) -> vehicle_pb2.VehicleState:
    return vehicle_pb2.VehicleState(**kw)


@pytest.mark.parametrize("state, field", [
    (_state(speed_kmh=math.nan), "speed_kmh"),
    (_state(speed_kmh=-3), "speed_kmh"),
    (_state(battery_percent=math.inf), "battery_percent"),
    (_state(gear=42), "gear"),
    (_state(gps_valid=True, gps={"latitude_deg": 91.0}), "gps.latitude_deg"),
    (_state(doors=[{"door": vehicle_pb2.DOOR_ID_FRONT_LEFT}, {"door": vehicle_pb2.DOOR_ID_FRONT_LEFT}]), "doors[1]"),
])
async def test_bad_vehicle_state_is_invalid_argument_and_nothing_stored_is_lost(app, state, field):
    async with channel(app) as ch:
        stub = vehicle_pb2_grpc.VehicleStub(ch)
        good = _state(gear=vehicle_pb2.GEAR_PARK, battery_percent=80, locked=True)
        await stub.UpdateState(good)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UpdateState(state)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
        kept = await stub.GetState(vehicle_pb2.GetStateRequest())
        assert kept.locked and kept.battery_percent == 80


async def test_vehicle_mode_and_transition_events(app):
    async with channel(app) as ch:
        stub = vehicle_pb2_grpc.VehicleStub(ch)
        reply = await stub.UpdateState(_state(gear=vehicle_pb2.GEAR_DRIVE, speed_kmh=50,
                                              ignition=vehicle_pb2.IGNITION_ON))
        assert reply.vehicle_mode == "driving"
        reply = await stub.UpdateState(_state(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF,
                                              locked=True))
        assert reply.vehicle_mode == "off"
        # Arming Sentinel makes the parked, locked car "sentry" for the vehicle service, System and the power
        # budgets alike: one mode provider, composed by the server and injected into each.
        await stub.UpdateState(_state(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF, locked=True,
                                      battery_percent=80))
        await skills_pb2_grpc.SentinelStub(ch).Arm(skills_pb2.ArmRequest())
        reply = await stub.UpdateState(_state(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF,
                                              locked=True, battery_percent=80))
        assert reply.vehicle_mode == "sentry"
        status = await system_pb2_grpc.SystemStub(ch).GetStatus(system_pb2.GetSystemStatusRequest())
        assert status.vehicle_mode == "sentry" and app.power.mode_provider() == "sentry"
        listed = await events_pb2_grpc.EventsStub(ch).ListEvents(events_pb2.ListEventsRequest(kinds=["vehicle."]))
        kinds = [e.kind for e in listed.events]
        assert kinds == ["vehicle.ignition_on", "vehicle.locked", "vehicle.parked", "vehicle.ignition_off"]


async def test_hmi_reconnecting_with_cursor_gets_every_missed_event(app):
    for i in range(5):
        app.events.append("test.tick", "system", 1, f"tick {i}")
    async with channel(app) as ch:
        stream = events_pb2_grpc.EventsStub(ch).Subscribe(events_pb2.SubscribeRequest(after_cursor=0))
        got = [await stream.read() for _ in range(3)]
        stream.cancel()
    last = got[-1].cursor
    for i in range(5, 9):   # the HMI is away
        app.events.append("test.tick", "system", 1, f"tick {i}")
    async with channel(app) as ch:
        stream = events_pb2_grpc.EventsStub(ch).Subscribe(events_pb2.SubscribeRequest(after_cursor=last))
        rest = [await asyncio.wait_for(stream.read(), 5) for _ in range(6)]
        # and live events keep flowing on the same stream
        app.events.append("test.tick", "system", 1, "live")
        live = await asyncio.wait_for(stream.read(), 5)
        stream.cancel()
    messages = [e.message for e in got + rest]
    assert messages == [f"tick {i}" for i in range(9)]
    assert live.message == "live"
    cursors = [e.cursor for e in got + rest + [live]]
    assert cursors == sorted(set(cursors))


async def test_event_filters_and_bad_requests(app):
    app.events.append("sentinel.alert", "sentinel", 2, "person")
    app.events.append("safety.safe_exit_warning", "safety", 3, "cyclist")
    async with channel(app) as ch:
        stub = events_pb2_grpc.EventsStub(ch)
        listed = await stub.ListEvents(events_pb2.ListEventsRequest(kinds=["safety."]))
        assert [e.kind for e in listed.events] == ["safety.safe_exit_warning"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListEvents(events_pb2.ListEventsRequest(limit=5000))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListEvents(events_pb2.ListEventsRequest(kinds=[""]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_deadline_is_honoured_on_a_stream(app):
    async with channel(app) as ch:
        stream = events_pb2_grpc.EventsStub(ch).Subscribe(events_pb2.SubscribeRequest(only_new=True), timeout=0.5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream.read()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_sigkill_mid_burst_loses_no_committed_event(server_process):
    """Every vehicle update the server acknowledged produced a committed event; SIGKILL must not lose one."""
    server = server_process().start()
    acked: list[str] = []
    stop = threading.Event()

    def burst():
        with grpc.insecure_channel(server.target) as ch:
            stub = vehicle_pb2_grpc.VehicleStub(ch)
            locked = False
            while not stop.is_set():
                locked = not locked
                try:
                    stub.UpdateState(_state(locked=locked, gear=vehicle_pb2.GEAR_PARK), timeout=5)
                except grpc.RpcError:
                    return
                acked.append("vehicle.locked" if locked else "vehicle.unlocked")

    worker = threading.Thread(target=burst)
    worker.start()
    while len(acked) < 40:
        threading.Event().wait(0.01)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    stop.set()
    worker.join(10)

    server.start()
    with grpc.insecure_channel(server.target) as ch:
        events = events_pb2_grpc.EventsStub(ch).ListEvents(
            events_pb2.ListEventsRequest(kinds=["vehicle.locked", "vehicle.unlocked"], limit=1000)).events
    kinds = [e.kind for e in events]
    assert len(kinds) >= len(acked)
    assert kinds[:len(acked)] == acked


def test_sigterm_drains_and_exits_cleanly(server_process):
    server = server_process().start()
    assert server.terminate() == 0
