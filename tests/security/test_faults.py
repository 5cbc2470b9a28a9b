"""Faults: the data disk full or read-only, SIGKILL during a burst with a live subscriber that resumes by
cursor, and a consumer of the event stream that never reads (server memory must stay bounded)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from incar.v1 import events_pb2, events_pb2_grpc, vehicle_pb2, vehicle_pb2_grpc
from tests.conftest import ROOT
from tests.security.conftest import make_app

LOCK_KINDS = ["vehicle.locked", "vehicle.unlocked"]


def _lock_state(locked: bool) -> vehicle_pb2.VehicleState:
    return vehicle_pb2.VehicleState(locked=locked, gear=vehicle_pb2.GEAR_PARK, battery_percent=80)


# ----------------------------------------------------------------------------- disk full / read-only
@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs) for the data directory, so ENOSPC comes from the kernel."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()}); the read-only test still runs")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def _update(stub, locked: bool):
    try:
        await stub.UpdateState(_lock_state(locked), timeout=10)
        return grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()


async def _check_reads_and_integrity(app, ch, acked_state: vehicle_pb2.VehicleState, acked_events: int) -> None:
    state = await vehicle_pb2_grpc.VehicleStub(ch).GetState(vehicle_pb2.GetStateRequest())
    assert state.locked == acked_state.locked            # the refused update changed nothing
    listed = await events_pb2_grpc.EventsStub(ch).ListEvents(events_pb2.ListEventsRequest(kinds=LOCK_KINDS,
                                                                                           limit=1000))
    assert len(listed.events) == acked_events             # reads still served, every committed event there
    assert app.db.connect().execute("PRAGMA quick_check").fetchone()[0] == "ok"


async def test_full_disk_refuses_writes_with_unavailable_and_keeps_serving_reads(small_disk, tmp_path):
    app = make_app(tmp_path, [f"server.data_dir={small_disk / 'data'}"])
    await app.start()
    await app.ready()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = vehicle_pb2_grpc.VehicleStub(ch)
            acked, locked = 0, False
            for _ in range(4):
                locked = not locked
                assert (await _update(stub, locked))[0] == grpc.StatusCode.OK
                acked += 1
            filler = small_disk / "filler"
            with open(filler, "wb") as f:        # take every free block
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            refused = None
            for _ in range(200):                  # a page or two may still fit; keep writing until refused
                code, details = await _update(stub, not locked)
                if code != grpc.StatusCode.OK:
                    refused = (code, details)
                    break
                locked = not locked
                acked += 1
            assert refused is not None, "no write was ever refused on a full disk"
            assert refused[0] == grpc.StatusCode.UNAVAILABLE, refused
            assert "full" in refused[1], refused
            await _check_reads_and_integrity(app, ch, _lock_state(locked), acked)
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            filler.unlink()                       # space is back: writes work again without a restart
            assert (await _update(stub, not locked))[0] == grpc.StatusCode.OK
            await _check_reads_and_integrity(app, ch, _lock_state(not locked), acked + 1)
    finally:
        await app.stop(0.2)


async def test_read_only_store_refuses_writes_with_unavailable_and_keeps_serving_reads(tmp_path):
    """Read-only data store. A live filesystem cannot be remounted read-only under an open database (EBUSY), so
    SQLite itself is made to refuse every write on the server's connection (PRAGMA query_only): the same
    "attempt to write a readonly database" path a read-only disk produces."""
    app = make_app(tmp_path, [])
    await app.start()
    await app.ready()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = vehicle_pb2_grpc.VehicleStub(ch)
            assert (await _update(stub, True))[0] == grpc.StatusCode.OK
            app.db.pragma_everywhere("query_only=ON")   # every connection, the event writer's included
            code, details = await _update(stub, False)
            assert code == grpc.StatusCode.UNAVAILABLE and "read-only" in details, (code, details)
            await _check_reads_and_integrity(app, ch, _lock_state(True), 1)
            app.db.pragma_everywhere("query_only=OFF")
            assert (await _update(stub, False))[0] == grpc.StatusCode.OK
    finally:
        await app.stop(0.2)


# ----------------------------------------------------------------------------- SIGKILL + resume
def test_sigkill_during_a_burst_then_resume_by_cursor_loses_no_committed_event(server_process):
    server = server_process().start()
    acked: list[str] = []
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def burst():
        with grpc.insecure_channel(server.target) as ch:
            stub = vehicle_pb2_grpc.VehicleStub(ch)
            locked = False
            while not stop.is_set():
                locked = not locked
                try:
                    stub.UpdateState(_lock_state(locked), timeout=5)
                except grpc.RpcError:
                    return
                acked.append(LOCK_KINDS[0] if locked else LOCK_KINDS[1])

    def subscribe():
        with grpc.insecure_channel(server.target) as ch:
            try:
                for event in events_pb2_grpc.EventsStub(ch).Subscribe(
                        events_pb2.SubscribeRequest(kinds=LOCK_KINDS), timeout=60):
                    seen.append((event.cursor, event.kind))
            except grpc.RpcError:
                return

    threads = [threading.Thread(target=burst), threading.Thread(target=subscribe)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while (len(acked) < 60 or len(seen) < 20) and time.monotonic() < deadline:
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(10)
    assert seen, "the live subscriber received nothing before the kill"
    last_cursor = seen[-1][0]

    server.start()
    resumed: list[tuple[int, str]] = []
    with grpc.insecure_channel(server.target) as ch:
        stream = events_pb2_grpc.EventsStub(ch).Subscribe(
            events_pb2.SubscribeRequest(after_cursor=last_cursor, kinds=LOCK_KINDS), timeout=5)
        try:
            for event in stream:
                resumed.append((event.cursor, event.kind))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED   # backlog done; then we hang up
        everything = events_pb2_grpc.EventsStub(ch).ListEvents(
            events_pb2.ListEventsRequest(kinds=LOCK_KINDS, limit=1000)).events
    stored = [(e.cursor, e.kind) for e in everything]
    combined = seen + resumed
    assert combined == stored, "live + resumed stream must be exactly the stored log: no gap, no duplicate"
    assert [k for _, k in stored[:len(acked)]] == acked, "an acknowledged update's event was lost"


# ----------------------------------------------------------------------------- slow consumer
def _rss_anon_plus_swap(pid: int) -> int:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(fields["RssAnon"].split()[0]) + int(fields.get("VmSwap", "0 kB").split()[0])) * 1024


APPENDER = """
import sys
from service.store.db import Database
from service.store.events import EventLog
db = Database(sys.argv[1])
log = EventLog(db)
db.migrate()
db.connect().execute("PRAGMA synchronous=OFF")   # bulk-loading a backlog for the test; durability not the point
note = "x" * 2000
for i in range(int(sys.argv[2])):
    log.append("test.backlog", "system", 1, note, payload={"i": i})
"""


def test_consumers_that_never_read_keep_server_memory_bounded(server_process):
    backlog = 40_000                                   # ~2 KB each: ~80 MB of events on disk
    server = server_process(["--set", "server.log_level=info"]).start()
    # The model's tool router learns its examples in the background after start (tens of MB, seconds to a
    # minute on a busy host): measure the subscribers' share once the server has settled.
    deadline = time.monotonic() + 240
    while "tool_choice.ready" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "tool_choice.ready" in server.log.read_text(), "the Assistant's tool router never became ready"
    subprocess.run([sys.executable, "-c", APPENDER, str(server.data_dir / "incar.db"), str(backlog)],
                   cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True, timeout=240)
    with grpc.insecure_channel(server.target) as ch:   # warm up the server's paths once
        events_pb2_grpc.EventsStub(ch).ListEvents(events_pb2.ListEventsRequest(limit=10))
    before = _rss_anon_plus_swap(server.proc.pid)
    channels = [grpc.insecure_channel(server.target) for _ in range(4)]
    streams = [events_pb2_grpc.EventsStub(c).Subscribe(events_pb2.SubscribeRequest(after_cursor=0)) for c in channels]
    first = [next(s) for s in streams]                 # each stream is live ... and then never read again
    assert all(e.cursor >= 1 for e in first)
    samples = []
    for _ in range(10):
        time.sleep(0.5)
        samples.append(_rss_anon_plus_swap(server.proc.pid))
    with grpc.insecure_channel(server.target) as ch:   # the server still answers while they stall
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    for s in streams:
        s.cancel()
    for c in channels:
        c.close()
    growth = max(samples) - before
    # Buffering the backlog for 4 stalled subscribers would be ~4 x 80 MB; the cursor design holds one page
    # (256 events) per subscriber plus the HTTP/2 window.
    assert growth < 48 * 1024 * 1024, f"server memory grew by {growth / 2**20:.1f} MiB with 4 stalled subscribers"
