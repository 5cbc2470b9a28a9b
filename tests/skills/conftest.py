"""Fixtures for the skills: a controllable clock, a real database and event log, the skills hosted on a real
grpc.aio server on a free port, and a restart that reopens the same database and data directory."""
from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from incar.v1 import skills_pb2_grpc, vehicle_pb2
from service.actions import ActionQueue
from service.store.db import Database
from service.store.events import EventLog
from skills.base import SkillContext, TemplateNarrator
from skills.config import SkillsConfig
from skills.services import SkillHost
from tests.skills.scenes import RingFrames

PROFILE_KEY = base64.urlsafe_b64encode(bytes(range(32))).decode()


class FakeClock:
    def __init__(self, start: float = 1_790_000_000.0):
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


def vehicle(*, gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF, locked=False, speed=0.0,
            battery=80.0, gps=None, doors=(), key_fob_id="", seats=()) -> vehicle_pb2.VehicleState:
    state = vehicle_pb2.VehicleState(gear=gear, ignition=ignition, locked=locked, speed_kmh=speed,
                                     battery_percent=battery, key_fob_id=key_fob_id)
    if gps is not None:
        state.gps_valid = True
        state.gps.latitude_deg, state.gps.longitude_deg = gps
    for door, open_, pulled in doors:
        state.doors.add(door=door, open=open_, handle_pulled=pulled)
    for seat, occupancy in seats:
        state.seats.add(seat=seat, occupancy=occupancy)
    return state


@dataclass
class Running:
    host: SkillHost
    events: EventLog
    db: Database
    server: grpc.aio.Server
    channel: grpc.aio.Channel
    frames: RingFrames
    state: vehicle_pb2.VehicleState
    actions: ActionQueue | None = None

    def stub(self, name: str):
        return getattr(skills_pb2_grpc, f"{name}Stub")(self.channel)

    async def set_vehicle(self, state: vehicle_pb2.VehicleState, drain: bool = True) -> None:
        previous, self.state = self.state, state
        await self.host.on_vehicle(previous, state)
        if drain:   # scripted scenarios: let background work (clips, wording, OCR) land before the next step
            await self.host.drain()

    async def frame(self, a, drain: bool = True) -> None:
        self.frames.add(a)
        await self.host.on_analysis(a)
        if drain:
            await self.host.drain()

    def events_of(self, prefix: str):
        return [e for e in self.events.after(0, 10_000) if e.kind.startswith(prefix)]


class SkillsHarness:
    """Starts (and restarts) the skills on one data directory."""

    def __init__(self, tmp_path: Path, clock: FakeClock):
        self.tmp_path, self.clock = tmp_path, clock
        self.config = SkillsConfig()
        self.config.greeter.profile_key = PROFILE_KEY
        self.config.tick_seconds = 3600.0   # timers run when the script calls host.tick(), after moving the clock
        self.narrator = TemplateNarrator()
        self.face_embedder = None
        self.read_signs = None
        self.frames = None          # a frame source other than the scripted RingFrames (e.g. a real CameraHub)
        self.restore_vehicle = False    # restart with the last vehicle state, as the service reloads it
        self._last_state: vehicle_pb2.VehicleState | None = None
        self.running: Running | None = None

    async def start(self) -> Running:
        db = Database(self.tmp_path / "incar.db")
        events = EventLog(db, clock=self.clock)
        frames = self.frames if self.frames is not None else RingFrames()
        actions = ActionQueue(db, clock=self.clock)
        ctx = SkillContext(db=db, events=events, narrator=self.narrator, data_dir=self.tmp_path / "skills",
                           clock=self.clock, frames=frames, actions=actions)
        host = SkillHost(ctx, self.config, face_embedder=self.face_embedder, read_signs=self.read_signs)
        db.migrate()
        state = self._last_state if (self.restore_vehicle and self._last_state is not None) else vehicle()
        await host.start(state)
        server = grpc.aio.server()
        host.register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.running = Running(host, events, db, server, channel, frames, state, actions)
        return self.running

    async def stop(self) -> None:
        r, self.running = self.running, None
        if r is None:
            return
        self._last_state = r.state
        await r.host.stop()
        await r.channel.close()
        await r.server.stop(0)
        r.db.close()

    async def restart(self) -> Running:
        await self.stop()
        return await self.start()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def harness(tmp_path, clock):
    h = SkillsHarness(tmp_path, clock)
    yield h
    await h.stop()
