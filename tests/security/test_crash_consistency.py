"""Hostile run, holes 1 and 9: a vehicle transition lost for good by a kill between the state's commit and its
events' commit; every event waking every subscriber. Plus the group commit that replaced a fsync per event."""
from __future__ import annotations

import asyncio
import signal

import grpc
from prometheus_client import REGISTRY

from incar.v1 import events_pb2, events_pb2_grpc, vehicle_pb2, vehicle_pb2_grpc
from service.store.events import FAULT_KILL_AFTER_COMMIT
from service.vehicle import COMMIT_TAG
from tests.security.conftest import make_app


def _locked_state() -> vehicle_pb2.VehicleState:
    return vehicle_pb2.VehicleState(locked=True, gear=vehicle_pb2.GEAR_PARK, battery_percent=80)


def _lock_events(ch) -> list[events_pb2.Event]:
    return list(events_pb2_grpc.EventsStub(ch).ListEvents(
        events_pb2.ListEventsRequest(kinds=["vehicle.locked"], limit=100)).events)


def test_kill_right_after_the_state_commit_keeps_the_state_and_its_event(server_process, monkeypatch):
    """The process SIGKILLs itself right after the vehicle state's transaction commits, before the update is
    acknowledged. The old code committed the state first and the events in a later transaction, so the state
    came back locked with no `vehicle.locked` event, and the gateway's retry produced none (state unchanged)."""
    monkeypatch.setenv(FAULT_KILL_AFTER_COMMIT, COMMIT_TAG)
    server = server_process().start()
    with grpc.insecure_channel(server.target) as ch:
        try:
            vehicle_pb2_grpc.VehicleStub(ch).UpdateState(_locked_state(), timeout=20)
            raise AssertionError("the fault hook did not kill the server")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert server.proc.wait(20) == -signal.SIGKILL
    monkeypatch.delenv(FAULT_KILL_AFTER_COMMIT)
    server.start()
    with grpc.insecure_channel(server.target) as ch:
        stub = vehicle_pb2_grpc.VehicleStub(ch)
        assert stub.GetState(vehicle_pb2.GetStateRequest()).locked, "the committed state was lost"
        assert len(_lock_events(ch)) == 1, "the state was stored without the event it caused"
        stub.UpdateState(_locked_state(), timeout=20)     # the gateway retries the unacknowledged update
        assert len(_lock_events(ch)) == 1, "a retried update must not repeat the transition"


async def test_a_commit_wakes_only_subscribers_whose_filter_it_matches(tmp_path):
    """200 subscribers follow a kind nothing emits; 30 lock toggles wake none of them, and the one subscriber that
    follows `vehicle.` reads each new event from memory, not the database."""
    app = make_app(tmp_path, [])
    await app.start()
    # own connections, 50 streams each: below the server's max_concurrent_streams (100 per connection)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(5)]
    try:
        started = _reads("database")
        idle = [events_pb2_grpc.EventsStub(channels[i // 50]).Subscribe(
            events_pb2.SubscribeRequest(kinds=["test.nothing."], only_new=True)) for i in range(200)]
        everything = events_pb2_grpc.EventsStub(channels[4]).Subscribe(
            events_pb2.SubscribeRequest(kinds=["vehicle."], only_new=True))
        stub = vehicle_pb2_grpc.VehicleStub(channels[4])
        # every stream's first page is read before counting (a first read always goes to the database)
        await _wait_until(lambda: _reads("database") >= started + 201)
        wakeups, tail_reads, db_reads = _wakeups(), _reads("tail"), _reads("database")
        locked = False
        for _ in range(30):
            locked = not locked
            await stub.UpdateState(vehicle_pb2.VehicleState(locked=locked, gear=vehicle_pb2.GEAR_PARK), timeout=30)
            await asyncio.wait_for(everything.read(), 30)
        assert _wakeups() - wakeups <= 30, "a commit woke subscribers whose filter it does not match"
        assert _reads("database") == db_reads, "a caught-up subscriber went to the database"
        assert _reads("tail") - tail_reads >= 30
        for call in idle + [everything]:
            call.cancel()
    finally:
        for channel in channels:
            await channel.close()
        await app.stop(0.2)


async def test_a_burst_of_events_is_committed_in_groups_and_streamed_only_once_committed(tmp_path):
    app = make_app(tmp_path, [])
    await app.start()
    try:
        count_before = REGISTRY.get_sample_value("incar_event_commit_group_size_count") or 0.0
        appended = [app.events.append("test.burst", "system", 1, f"n{i}") for i in range(300)]
        assert [e.cursor for e in appended] == list(range(appended[0].cursor, appended[0].cursor + 300))
        assert app.events.flush()
        stored = app.events.after(appended[0].cursor - 1, limit=1000, kinds=["test.burst"])
        assert [e.cursor for e in stored] == [e.cursor for e in appended]
        commits = (REGISTRY.get_sample_value("incar_event_commit_group_size_count") or 0.0) - count_before
        assert 1 <= commits < 300, f"{commits} commits for 300 events: no grouping"
        # durability: every streamed event is in the database of a fresh process reading the same file
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            call = events_pb2_grpc.EventsStub(ch).Subscribe(
                events_pb2.SubscribeRequest(after_cursor=appended[-1].cursor - 1, kinds=["test."]))
            live = app.events.append("test.live", "system", 1, "after the burst")
            seen = [(await call.read()).cursor, (await call.read()).cursor]
            call.cancel()
        assert seen == [appended[-1].cursor, live.cursor]
        row = app.db.connect().execute("SELECT kind FROM events WHERE cursor=?", (live.cursor,)).fetchone()
        assert row["kind"] == "test.live"
    finally:
        await app.stop(0.2)


def _reads(source: str) -> float:
    return REGISTRY.get_sample_value("incar_event_subscriber_reads_total", {"source": source}) or 0.0


def _wakeups() -> float:
    return REGISTRY.get_sample_value("incar_event_subscriber_wakeups_total") or 0.0


async def _wait_until(predicate, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)
