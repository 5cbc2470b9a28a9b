"""The scripted day of `incar sim`: one walk through every skill over the real service's gRPC API.

Cameras stream composited real photos (service.sim_scenes), the vehicle script sets the car's state, the vehicle
gateway acknowledges actions, and each step waits (bounded) for the event or answer that shows its skill did its
job. Each step prints what happened and which skill did it; a step whose skill did not respond in time is
reported FAILED with what was (not) seen. The day ends with `scenario: P/N steps passed`.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Awaitable, Callable

import cv2
import grpc

from incar.v1 import (assistant_pb2, assistant_pb2_grpc, cameras_pb2, cameras_pb2_grpc, common_pb2, events_pb2,
                      events_pb2_grpc, skills_pb2_grpc, vehicle_pb2, vehicle_pb2_grpc)
from service import sim_scenes as scenes
from service.clients import format_event, open_channel

# (camera id, role, mounting position): the four cameras of the day.
DAY_CAMERAS = [
    ("front", common_pb2.CAMERA_ROLE_EXTERIOR, common_pb2.MOUNT_POSITION_FRONT),
    ("left", common_pb2.CAMERA_ROLE_EXTERIOR, common_pb2.MOUNT_POSITION_LEFT),
    ("cabin", common_pb2.CAMERA_ROLE_CABIN, common_pb2.MOUNT_POSITION_CABIN_FRONT),
    ("cabin_rear", common_pb2.CAMERA_ROLE_CABIN, common_pb2.MOUNT_POSITION_CABIN_REAR),
]
FOB = "fob-1"
DRIVER = "Alex Driver"
LEVEL, BAY = "U1", "230"
GPS = common_pb2.GeoPoint(latitude_deg=48.1374, longitude_deg=11.5755)


def say(who: str, text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {who:<8} {text}", flush=True)


@dataclass
class Outcome:
    passed: bool
    detail: str


@dataclass
class Day:
    target: object
    images: Path
    fps: float
    step_timeout: float
    stop: asyncio.Event
    showing: dict[str, scenes.Scene] = field(default_factory=dict)
    shown_since: dict[str, float] = field(default_factory=dict)
    events: list[common_pb2.Event] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    new_event: asyncio.Event = field(default_factory=asyncio.Event)
    channel: grpc.aio.Channel | None = None

    # --- what the world shows -----------------------------------------------------------------------------
    def show(self, camera_id: str, scene: scenes.Scene) -> None:
        self.showing[camera_id], self.shown_since[camera_id] = scene, time.monotonic()

    async def feed_camera(self, camera_id: str, role: int, position: int) -> None:
        while not self.stop.is_set():
            try:
                async with open_channel(self.target) as channel:
                    async def frames():
                        seq = 0
                        while not self.stop.is_set():
                            scene = self.showing.get(camera_id) or scenes.empty(self.images)
                            image = scene(time.monotonic() - self.shown_since.get(camera_id, time.monotonic()))
                            ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
                            frame = cameras_pb2.Frame(camera_id=camera_id, role=role, position=position, sequence=seq,
                                                      image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG,
                                                                             data=jpeg.tobytes()))
                            frame.capture_time.GetCurrentTime()
                            yield frame
                            seq += 1
                            await asyncio.sleep(1.0 / self.fps)
                    async for _ack in cameras_pb2_grpc.CamerasStub(channel).StreamFrames(frames()):
                        pass
            except grpc.aio.AioRpcError as exc:
                if self.stop.is_set():
                    return
                say("camera", f"{camera_id}: stream ended ({exc.code().name}: {exc.details()}); reconnecting")
                await asyncio.sleep(1.0)

    async def vehicle(self, **fields) -> str:
        fields.setdefault("battery_percent", 78)
        state = vehicle_pb2.VehicleState(key_fob_id=fields.pop("fob", ""), gps=GPS, gps_valid=True, **fields)
        reply = await vehicle_pb2_grpc.VehicleStub(self.channel).UpdateState(state, timeout=5)
        return reply.vehicle_mode

    # --- what the service says ----------------------------------------------------------------------------
    async def follow_events(self) -> None:
        cursor, first = 0, True
        while not self.stop.is_set():
            try:
                async with open_channel(self.target) as channel:
                    stream = events_pb2_grpc.EventsStub(channel).Subscribe(
                        events_pb2.SubscribeRequest(after_cursor=cursor, only_new=first))
                    first = False
                    async for event in stream:
                        cursor = event.cursor
                        self.events.append(event)
                        if not event.kind.startswith("camera."):
                            say("event", format_event(event))
                        self.new_event.set()
            except grpc.aio.AioRpcError:
                await asyncio.sleep(1.0)

    def mark(self) -> int:
        return len(self.events)

    async def wait_event(self, kind: str, since: int, timeout: float | None = None,
                         where: Callable[[common_pb2.Event, dict], bool] = lambda e, p: True):
        """The first event of `kind` after index `since` that `where` accepts, or None after the timeout."""
        deadline = time.monotonic() + (timeout or self.step_timeout)
        seen = since
        while True:
            for event in self.events[seen:]:
                payload = json.loads(event.payload_json or "{}")
                if event.kind == kind and where(event, payload):
                    return event
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.new_event.clear()
            try:
                await asyncio.wait_for(self.new_event.wait(), left)
            except TimeoutError:
                return None

    def kinds_since(self, since: int) -> str:
        kinds = sorted({e.kind for e in self.events[since:] if not e.kind.startswith("camera.")})
        return ", ".join(kinds) or "no events"

    async def ask(self, question: str, cameras=(), route=True) -> assistant_pb2.AskDone | None:
        request = assistant_pb2.AskRequest(question=question, camera_ids=list(cameras), route_to_skill=route,
                                           max_tokens=48)
        async for item in assistant_pb2_grpc.AssistantStub(self.channel).Ask(request, timeout=120):
            if item.HasField("done"):
                return item.done
        return None

    def skills(self, name: str):
        return getattr(skills_pb2_grpc, f"{name}Stub")(self.channel)


Step = Callable[[Day], Awaitable[Outcome]]


async def run_day(day: Day, steps: list[tuple[str, str, str, Step]]) -> int:
    """Runs each (name, skill, description, step) in order; prints each outcome and the summary line."""
    passed = 0
    for i, (name, skill, description, step) in enumerate(steps, 1):
        if day.stop.is_set():
            break
        say("step", f"{i}/{len(steps)} {name} [{skill}]: {description}")
        started = time.monotonic()
        try:
            outcome = await step(day)
        except grpc.aio.AioRpcError as exc:
            outcome = Outcome(False, f"{exc.code().name}: {exc.details()}")
        mark = "PASS" if outcome.passed else "FAIL"
        say("step", f"{i}/{len(steps)} {name} {mark} ({time.monotonic() - started:.1f} s): {outcome.detail}")
        passed += outcome.passed
    print(f"scenario: {passed}/{len(steps)} steps passed", flush=True)
    return passed
