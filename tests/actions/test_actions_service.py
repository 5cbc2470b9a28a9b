"""VehicleActions over real gRPC: committed before streamed, acknowledged, repeated and escalated, resumable, roles."""
from __future__ import annotations

import asyncio
import sqlite3

import grpc
import pytest
from prometheus_client import REGISTRY

from incar.v1 import actions_pb2, actions_pb2_grpc, events_pb2, events_pb2_grpc, vehicle_pb2
from service.config import load_config
from service.server import Application
from tests.conftest import base_overrides

ACTIONS = "incar.v1.VehicleActions"


class FakeClock:
    """The queue's clock: tests move time on instead of waiting (the escalator ticks on its own)."""

    def __init__(self, start: float = 1_800_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


async def start_app(tmp_path, clock: FakeClock, extra=()) -> Application:
    app = Application(load_config(env={}, overrides=base_overrides(tmp_path) + ["actions.ack_timeout_s=3",
                                                                                "actions.tick_s=0.02", *extra]))
    app.actions.clock = clock
    await app.start()
    return app


@pytest.fixture
async def served(tmp_path):
    clock = FakeClock()
    app = await start_app(tmp_path, clock)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield app, actions_pb2_grpc.VehicleActionsStub(channel), clock
    await channel.close()
    await app.stop(0.2)


async def next_delivery(stream) -> actions_pb2.VehicleAction:
    return await asyncio.wait_for(stream.read(), 30)


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_an_action_is_committed_before_it_is_streamed_and_acknowledged(served, tmp_path):
    app, stub, clock = served
    cause = app.events.append("safety.child_presence_alert", "safety", 3, "child alone")
    stream = stub.Stream(actions_pb2.StreamActionsRequest())
    action = app.actions.request("door_lock_hold", reason="cyclist approaching on the left", cause_event=cause,
                                 target="rear_left", expiry_s=20, requested_by="safety")
    # On disk before anyone is told: a second connection to the database file reads it.
    with sqlite3.connect(tmp_path / "data" / "incar.db") as other:
        assert other.execute("SELECT kind FROM actions WHERE id = ?", (action.id,)).fetchone() == ("door_lock_hold",)
    got = await next_delivery(stream)
    assert (got.id, got.kind, got.state, got.door) == (action.id, actions_pb2.ACTION_KIND_DOOR_LOCK_HOLD,
                                                       actions_pb2.ACTION_STATE_PENDING, vehicle_pb2.DOOR_ID_REAR_LEFT)
    assert (got.cause_event_cursor, got.cause_event_kind) == (cause.cursor, "safety.child_presence_alert")
    assert got.priority == actions_pb2.ACTION_PRIORITY_SAFETY and got.attempt == 1 and got.requested_by == "safety"
    assert got.expires.ToSeconds() == pytest.approx(clock.now + 20, abs=1)
    before = counter("incar_actions_acknowledged_total", kind="door_lock_hold", result="ACTION_RESULT_DONE")
    status = await stub.Acknowledge(actions_pb2.AcknowledgeActionRequest(id=action.id,
                                                                          result=actions_pb2.ACTION_RESULT_DONE))
    assert status.state == actions_pb2.ACTION_STATE_ACKNOWLEDGED and status.result == actions_pb2.ACTION_RESULT_DONE
    assert counter("incar_actions_acknowledged_total", kind="door_lock_hold",
                   result="ACTION_RESULT_DONE") == before + 1
    # A retried acknowledgement is fine; a different answer is not.
    await stub.Acknowledge(actions_pb2.AcknowledgeActionRequest(id=action.id, result=actions_pb2.ACTION_RESULT_DONE))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Acknowledge(actions_pb2.AcknowledgeActionRequest(id=action.id,
                                                                    result=actions_pb2.ACTION_RESULT_FAILED))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already acknowledged" in err.value.details()
    # Lifting the hold is a delivery too: the gateway is told to release the door.
    app.actions.cancel(action.id, "the cyclist has passed")
    lifted = await next_delivery(stream)
    assert (lifted.id, lifted.state) == (action.id, actions_pb2.ACTION_STATE_CANCELLED)
    assert lifted.cursor > got.cursor
    stream.cancel()


async def test_bad_acknowledgements_name_what_is_wrong(served):
    app, stub, _ = served
    action = app.actions.request("horn", reason="test")
    cases = [(actions_pb2.AcknowledgeActionRequest(id="", result=1), grpc.StatusCode.INVALID_ARGUMENT, "id"),
             (actions_pb2.AcknowledgeActionRequest(id="act-nope", result=1), grpc.StatusCode.NOT_FOUND, "act-nope"),
             (actions_pb2.AcknowledgeActionRequest(id=action.id), grpc.StatusCode.INVALID_ARGUMENT, "result"),
             (actions_pb2.AcknowledgeActionRequest(id=action.id, result=1, detail="x" * 600),
              grpc.StatusCode.INVALID_ARGUMENT, "detail")]
    for request, code, named in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Acknowledge(request)
        assert err.value.code() == code and named in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetAction(actions_pb2.GetActionRequest(id="act-nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_unacknowledged_safety_action_is_repeated_escalated_and_tells_the_owner(served):
    app, stub, clock = served
    events = events_pb2_grpc.EventsStub(grpc.aio.insecure_channel(f"127.0.0.1:{app.port}"))
    stream = stub.Stream(actions_pb2.StreamActionsRequest())
    repeated_before = counter("incar_actions_repeated_total", kind="horn")
    horn = app.actions.request("horn", reason="child left in the locked car", priority="safety")
    assert (await next_delivery(stream)).attempt == 1
    clock.now += 3.5                      # past the acknowledgement deadline: the escalator repeats it
    second = await next_delivery(stream)
    assert (second.id, second.attempt, second.escalation_level) == (horn.id, 2, 1)
    assert second.priority == actions_pb2.ACTION_PRIORITY_CRITICAL
    clock.now += 3.5
    third = await next_delivery(stream)
    assert (third.id, third.attempt, third.escalation_level) == (horn.id, 3, 2)
    # Level 2 raises an owner notification (it travels over MQTT, which does not need the silent gateway).
    notice = await next_delivery(stream)
    assert notice.kind == actions_pb2.ACTION_KIND_OWNER_NOTIFICATION and notice.parameters["action_id"] == horn.id
    assert counter("incar_actions_repeated_total", kind="horn") == repeated_before + 2
    assert counter("incar_actions_escalated_total", kind="horn", level="2") >= 1
    listed = await events.ListEvents(events_pb2.ListEventsRequest(kinds=["actions.unacknowledged"]))
    assert [e.severity for e in listed.events][-2:] == [2, 3]
    # Repeats back off: after the third delivery (t=7) the next waits 6 s, not another 3 s.
    clock.now += 3.5                      # t=10.5: only the notification (raised at t=7) is due
    assert (await next_delivery(stream)).id == notice.id
    clock.now += 2.4                      # t=12.9: nothing is due, whichever tick runs
    app.escalator.tick()
    assert (await stub.GetAction(actions_pb2.GetActionRequest(id=horn.id))).attempts == 3
    clock.now += 0.3                      # t=13.2: the horn again
    fourth = await next_delivery(stream)
    assert (fourth.id, fourth.attempt, fourth.escalation_level) == (horn.id, 4, 3)
    # Superseded repeats are dropped; the first delivery and the latest stay.
    rows = app.db.connect().execute("SELECT attempt FROM action_deliveries WHERE action_id = ? ORDER BY cursor",
                                    (horn.id,)).fetchall()
    assert [r["attempt"] for r in rows] == [1, 4]
    await stub.Acknowledge(actions_pb2.AcknowledgeActionRequest(id=horn.id, result=actions_pb2.ACTION_RESULT_DONE))
    await stub.Acknowledge(actions_pb2.AcknowledgeActionRequest(id=notice.id, result=actions_pb2.ACTION_RESULT_DONE))
    clock.now += 10                       # acknowledged: no more repeats
    assert app.escalator.tick() == []
    assert (await stub.GetAction(actions_pb2.GetActionRequest(id=horn.id))).attempts == 4
    stream.cancel()


async def test_routine_actions_are_not_repeated_and_expired_ones_are_not_streamed(served):
    app, stub, clock = served
    profile = app.actions.request("seat_mirror_profile", reason="driver recognised", target="driver",
                                  parameters={"profile_id": "p-1"}, expiry_s=30)
    assert profile.priority == actions_pb2.ACTION_PRIORITY_ROUTINE and profile.seat == vehicle_pb2.SEAT_ID_DRIVER
    clock.now += 10
    assert app.escalator.tick() == []
    clock.now += 25
    app.escalator.tick()
    status = await stub.GetAction(actions_pb2.GetActionRequest(id=profile.id))
    assert status.state == actions_pb2.ACTION_STATE_EXPIRED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Acknowledge(actions_pb2.AcknowledgeActionRequest(id=profile.id, result=1))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "expired" in err.value.details()
    live = app.actions.request("hazard_lights", reason="still to do")
    stream = stub.Stream(actions_pb2.StreamActionsRequest(after_cursor=0))
    assert (await next_delivery(stream)).id == live.id     # the expired one is skipped
    stream.cancel()


async def test_a_gateway_resumes_after_its_cursor_and_a_restart_keeps_the_schedule(tmp_path):
    clock = FakeClock()
    app = await start_app(tmp_path, clock)
    first = app.actions.request("window_vent", reason="cabin 41 C with a child inside", key="vent:1")
    second = app.actions.request("climate_on", reason="cabin 41 C with a child inside",
                                 parameters={"temperature_c": "22"})
    assert app.actions.request("window_vent", reason="asked again on the next tick", key="vent:1").id == first.id
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stream = actions_pb2_grpc.VehicleActionsStub(ch).Stream(actions_pb2.StreamActionsRequest())
        seen = await next_delivery(stream)
        assert seen.id == first.id and seen.door == 0     # no door: every window
        stream.cancel()
    await app.stop(0.2)

    app = await start_app(tmp_path, clock)                 # the same data directory
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = actions_pb2_grpc.VehicleActionsStub(ch)
            stream = stub.Stream(actions_pb2.StreamActionsRequest(after_cursor=seen.cursor))
            assert (await next_delivery(stream)).id == second.id
            clock.now += 3.5                                 # the schedule survived the restart
            repeat = await next_delivery(stream)
            assert repeat.attempt == 2 and repeat.id in (first.id, second.id)
            stream.cancel()
    finally:
        await app.stop(0.2)


async def test_only_the_vehicle_gateway_and_admin_may_take_actions(tmp_path):
    for role, allowed in (("vehicle", True), ("hmi", False), ("camera", False)):
        app = await start_app(tmp_path / role, FakeClock(), [f"security.loopback_role={role}"])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
                stub = actions_pb2_grpc.VehicleActionsStub(ch)
                if allowed:
                    app.actions.request("headlight_flash", reason="owner looking for the car")
                    stream = stub.Stream(actions_pb2.StreamActionsRequest())
                    assert (await next_delivery(stream)).kind == actions_pb2.ACTION_KIND_HEADLIGHT_FLASH
                    stream.cancel()
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.GetAction(actions_pb2.GetActionRequest(id="act-x"))
                    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and role in err.value.details()
        finally:
            await app.stop(0.2)


async def test_incar_sim_plays_the_gateway_and_acknowledges(served, capsys):
    from service.sim import vehicle_gateway
    app, stub, _ = served
    stop = asyncio.Event()
    gateway = asyncio.create_task(vehicle_gateway(f"127.0.0.1:{app.port}", stop))
    try:
        action = app.actions.request("child_lock", reason="child on the rear right seat", target="rear_right")
        for _ in range(600):
            status = await stub.GetAction(actions_pb2.GetActionRequest(id=action.id))
            if status.state == actions_pb2.ACTION_STATE_ACKNOWLEDGED:
                break
            await asyncio.sleep(0.05)
        assert status.result == actions_pb2.ACTION_RESULT_DONE and status.detail == "simulated gateway"
        assert "child_lock DOOR_ID_REAR_RIGHT attempt 1: child on the rear right seat" in capsys.readouterr().out
    finally:
        stop.set()
        gateway.cancel()
        await asyncio.gather(gateway, return_exceptions=True)
