"""The skills' gRPC services (one per skill, each with its own health name) and the host that feeds them.

`SkillHost` owns the four skills, passes them perception results and vehicle-state changes in arrival order
(one asyncio lock: a skill never sees a frame before the state change that preceded it), and runs their timers.
"""
from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import structlog

from incar.v1 import skills_pb2, skills_pb2_grpc, vehicle_pb2
from service.cameras.decoding import decode_for_call
from service.perception.types import FrameAnalysis
from service.rpc_errors import RequestError, abort_for
from skills.base import FaceEmbedder, InvalidRequestError, NotFoundError, PreconditionError, SignReader, SkillContext
from skills.car_finder import CarFinder
from skills.config import SkillsConfig
from skills.greeter import Greeter
from skills.router import SkillRouter
from skills.safety import Safety
from skills.sentinel import Sentinel

log = structlog.get_logger(__name__)

_SERVICES = skills_pb2.DESCRIPTOR.services_by_name
HEALTH_NAMES = {name: _SERVICES[svc].full_name for name, svc in
                (("sentinel", "Sentinel"), ("greeter", "Greeter"), ("car_finder", "CarFinder"), ("safety", "Safety"))}
CLIP_CHUNK_BYTES = 256 * 1024

def maps_skill_errors(method):
    """A skill's errors (and the store refusing writes) become the call's status, with their message."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except RequestError as exc:
            await abort_for(context, exc)
    return wrapper


class SkillHost:
    def __init__(self, ctx: SkillContext, config: SkillsConfig | None = None, *,
                 face_embedder: FaceEmbedder | None = None, read_signs: SignReader | None = None):
        config = config or SkillsConfig()
        self.ctx, self.config = ctx, config
        self.sentinel = Sentinel(ctx, config.sentinel)
        self.greeter = Greeter(ctx, config.greeter, face_embedder=face_embedder)
        self.car_finder = CarFinder(ctx, config.car_finder, read_signs=read_signs)
        self.safety = Safety(ctx, config.safety)
        self.skills = [self.safety, self.sentinel, self.greeter, self.car_finder]   # safety first: tightest budget
        self.router = SkillRouter(car_finder=self.car_finder, sentinel=self.sentinel, safety=self.safety,
                                  greeter=self.greeter)
        self._order = asyncio.Lock()
        self._ticker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[asyncio.Task] = set()

    async def start(self, initial_state: vehicle_pb2.VehicleState | None = None) -> None:
        """Call after `db.migrate()`: seeds the vehicle state (no transition events) and starts the timers."""
        self._loop = asyncio.get_running_loop()
        state = initial_state or vehicle_pb2.VehicleState()
        for skill in self.skills:
            skill.vehicle = state
        self.sentinel.restore()
        self._ticker = asyncio.create_task(self._tick_forever())

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        await self.drain()

    async def drain(self) -> None:
        """Wait until queued inputs and the skills' background work (clips, greetings, OCR) are done."""
        while self._pending or any(skill._background for skill in self.skills):
            await asyncio.gather(*list(self._pending), return_exceptions=True)
            for skill in self.skills:
                await skill.drain()

    # ------------------------------------------------------------------ inputs
    def vehicle_listener(self, previous: vehicle_pb2.VehicleState, current: vehicle_pb2.VehicleState) -> None:
        """For `VehicleStateStore.add_listener`: may be called from any thread."""
        if self._loop is None:
            raise RuntimeError("SkillHost.start() has not run")

        def schedule():
            task = asyncio.ensure_future(self.on_vehicle(previous, current))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        self._loop.call_soon_threadsafe(schedule)

    async def on_vehicle(self, previous: vehicle_pb2.VehicleState, current: vehicle_pb2.VehicleState) -> None:
        async with self._order:
            for skill in self.skills:
                skill.vehicle = current
            for skill in self.skills:
                await self._guard(skill, skill.on_vehicle(previous, current))
                await self._guard(skill, skill.tick())

    async def on_analysis(self, analysis: FrameAnalysis) -> None:
        async with self._order:
            for skill in self.skills:
                await self._guard(skill, skill.on_frame(analysis))

    async def consume(self, analyses: AsyncIterator[FrameAnalysis]) -> None:
        """Feed a perception stream until it ends (the service runs this as a task)."""
        async for analysis in analyses:
            await self.on_analysis(analysis)

    async def tick(self) -> None:
        async with self._order:
            for skill in self.skills:
                await self._guard(skill, skill.tick())

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_seconds)
            await self.tick()

    async def _guard(self, skill, coro) -> None:
        # One skill's bug must not starve the others (Safety in particular).
        try:
            await coro
        except RequestError as exc:
            log.info("skill.input_refused", skill=skill.name, reason=str(exc))
        except Exception:
            log.exception("skill.failed", skill=skill.name)

    # ------------------------------------------------------------------ gRPC
    def register(self, server: grpc.aio.Server) -> list[str]:
        """Adds the four services; returns their health names."""
        skills_pb2_grpc.add_SentinelServicer_to_server(SentinelServicer(self), server)
        skills_pb2_grpc.add_GreeterServicer_to_server(GreeterServicer(self), server)
        skills_pb2_grpc.add_CarFinderServicer_to_server(CarFinderServicer(self), server)
        skills_pb2_grpc.add_SafetyServicer_to_server(SafetyServicer(self), server)
        return list(HEALTH_NAMES.values())


class SentinelServicer(skills_pb2_grpc.SentinelServicer):
    def __init__(self, host: SkillHost):
        self.host, self.sentinel = host, host.sentinel

    @maps_skill_errors
    async def Arm(self, request, context):
        async with self.host._order:
            return self.sentinel.arm()

    @maps_skill_errors
    async def Disarm(self, request, context):
        async with self.host._order:
            return self.sentinel.disarm()

    @maps_skill_errors
    async def GetStatus(self, request, context):
        return self.sentinel.status()

    @maps_skill_errors
    async def ListClips(self, request, context):
        return skills_pb2.ListClipsResponse(clips=self.sentinel.list_clips(request.limit))

    async def GetClip(self, request, context):
        if not request.clip_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "clip_id: required")
        try:
            files = self.sentinel.clip_files(request.clip_id, request.camera_id)
        except (NotFoundError, PreconditionError) as exc:
            await abort_for(context, exc)
        for name, camera_id, path in files:
            async for chunk in _file_chunks(path):
                yield skills_pb2.ClipChunk(data=chunk, name=name, camera_id=camera_id)

    @maps_skill_errors
    async def LabelFalsePositive(self, request, context):
        if not request.clip_id:
            raise InvalidRequestError("clip_id: required")
        async with self.host._order:
            zone = self.sentinel.label_false_positive(request.clip_id, request.note)
        return skills_pb2.LabelFalsePositiveResponse(zone=zone)


class GreeterServicer(skills_pb2_grpc.GreeterServicer):
    def __init__(self, host: SkillHost):
        self.host, self.greeter = host, host.greeter

    @maps_skill_errors
    async def Enroll(self, request, context):
        image = None
        source = request.WhichOneof("face_source")
        if source == "camera_id":
            frames = self.host.ctx.frames
            frame = frames.latest(request.camera_id) if frames is not None else None
            if frame is None:
                raise PreconditionError(f"camera {request.camera_id!r} has no frame to enrol from")
            image = frame.original
        elif source == "image":
            image = await decode_for_call(request.image, self.host.config.greeter.max_image_pixels, context, "image")
        profile = await self.greeter.enroll(request.name, request.consent, image=image,
                                            key_fob_id=request.key_fob_id, preferences_json=request.preferences_json)
        del image   # never kept: only the template is stored
        return profile

    @maps_skill_errors
    async def ListProfiles(self, request, context):
        return skills_pb2.ListProfilesResponse(profiles=self.greeter.list_profiles())

    @maps_skill_errors
    async def DeleteProfile(self, request, context):
        if not request.profile_id:
            raise InvalidRequestError("profile_id: required")
        self.greeter.delete_profile(request.profile_id)
        return skills_pb2.DeleteProfileResponse()


class CarFinderServicer(skills_pb2_grpc.CarFinderServicer):
    def __init__(self, host: SkillHost):
        self.host, self.car_finder = host, host.car_finder

    @maps_skill_errors
    async def RecordParking(self, request, context):
        return await self.car_finder.record_parking()

    @maps_skill_errors
    async def WhereIsMyCar(self, request, context):
        answer, record = await self.car_finder.where_is_my_car(request.question)
        age = max(0.0, self.car_finder.now - record.time.ToNanoseconds() / 1e9)
        return skills_pb2.WhereIsMyCarResponse(answer=answer, record=record, age_seconds=age)

    @maps_skill_errors
    async def ListParkingHistory(self, request, context):
        return skills_pb2.ListParkingHistoryResponse(records=self.car_finder.history(request.limit))

    @maps_skill_errors
    async def GetParkingRecord(self, request, context):
        return self.car_finder.get_record(request.record_id)

    async def GetParkingSnapshot(self, request, context):
        try:
            path = self.car_finder.snapshot_path(request.record_id)
        except NotFoundError as exc:
            await abort_for(context, exc)
        async for chunk in _file_chunks(path):
            yield skills_pb2.SnapshotChunk(data=chunk, name=path.name)


class SafetyServicer(skills_pb2_grpc.SafetyServicer):
    def __init__(self, host: SkillHost):
        self.host, self.safety = host, host.safety

    @maps_skill_errors
    async def GetStatus(self, request, context):
        return self.safety.status()

    @maps_skill_errors
    async def Acknowledge(self, request, context):
        async with self.host._order:
            self.safety.acknowledge(request.event_cursor)
        return skills_pb2.AcknowledgeResponse()


async def _file_chunks(path: Path):
    data = await asyncio.to_thread(path.read_bytes)
    for offset in range(0, max(len(data), 1), CLIP_CHUNK_BYTES):
        yield data[offset:offset + CLIP_CHUNK_BYTES]


def skills_data_dir(config: SkillsConfig, server_data_dir: str | Path) -> Path:
    return Path(config.data_dir) if config.data_dir else Path(server_data_dir) / "skills"


__all__ = ["SkillHost", "HEALTH_NAMES", "skills_data_dir"]
