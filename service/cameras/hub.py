"""CameraHub: every camera's frames in (gRPC stream or OpenCV source), decoded off the event loop, kept in a
ring per camera and handed to analysis consumers, latest-wins.

Admission, in order, on the event loop (cheap checks only):
  bad input (empty/unknown camera id, role, position, encoding, header dimensions, pixel limit, JPEG scan count,
  raw length, a capture time outside the window around the server clock)
      -> FrameError (the servicer answers INVALID_ARGUMENT naming the field and camera)
  a new camera registers only now, with a valid frame (max_cameras -> CameraLimitError); one whose frames all
  fail to decode is unregistered again, and one silent for forget_after_seconds is forgotten (rings released)
  capture time older than max_frame_age_seconds -> dropped STALE
  capture time not after the camera's latest admitted frame -> dropped OUT_OF_ORDER
  (the camera is alive from here on: the watchdog sees it)
  the governor's analysis rate for this camera -> dropped RATE_LIMITED (before decoding: that is the saving)
  queued for decode; when max_pending_frames are already waiting, the oldest waiting one is dropped OVERLOAD.
`submit` returns when its frame is decoded and stored (accepted) or dropped, so the ack tells the truth.
One decode per camera is in flight at a time (frames stay in order); cameras decode in parallel in the pool.
"""
from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import structlog

from incar.v1 import cameras_pb2, common_pb2
from service.cameras.admission import (POSITION_NAMES, POSITION_VALUES, ROLE_NAMES, ROLE_VALUES, CameraState,
                                       LatestFrames, capture_seconds)
from service.cameras.config import CAMERA_ID, CamerasConfig
from service.cameras.frames import FrameError, ImageSpec, check_image
from service.cameras.lane import DecodeLane, PendingFrame
from service.thread_priority import raise_current_thread
from service.cameras.metrics import (CAMERA_FPS, CAMERA_UP, DECODE_SECONDS, FRAME_AGE, FRAMES_ACCEPTED, FRAMES_DROPPED,
                                     FRAMES_INVALID, QUEUE_DEPTH, REASON_LABELS, RING_BYTES, forget_camera)
from service.cameras.ring import CameraFrame, FrameRing
from service.cameras.recorder import FrameRecorder, RecordedFrame

log = structlog.get_logger(__name__)

__all__ = ["CameraHub", "CameraFrame", "FrameError", "UnknownCameraError", "CameraLimitError"]


StateCallback = Callable[[str, bool, str], object]


class UnknownCameraError(FrameError):
    """A frame from a camera that is not declared while allow_unknown_cameras is off."""

    def __init__(self, camera_id: str):
        super().__init__("camera_id", f"unknown camera {camera_id!r} (not declared and allow_unknown_cameras is off)")


class CameraLimitError(RuntimeError):
    """max_cameras reached: a new camera cannot register (RESOURCE_EXHAUSTED)."""


class CameraHub:
    def __init__(self, config: CamerasConfig | None = None):
        self.config = config or CamerasConfig()
        self.config.validate()
        self._cameras: dict[str, CameraState] = {}
        self._consumers: set[LatestFrames] = set()
        self._callbacks: list[StateCallback] = []
        self._rates: dict[str, float | None] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._watchdog: asyncio.Task | None = None
        self._sources: list = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.recorder = FrameRecorder(self.config.record_seconds, self.config.ring_max_bytes)
        for declared in self.config.cameras:
            self._add_camera(declared.id, declared.role, declared.position,
                             declared.source if declared.pulled else "grpc", pulled=declared.pulled, declared=True)

    # lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the decode pool, the watchdog and the configured OpenCV sources."""
        from service.cameras.sources import OpenCVSource
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        # Every lane waits for its decode, Safety's too: decoding (cheap, rate-bounded) runs at the safety priority.
        self._pool = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="camera-decode",
                                        initializer=raise_current_thread)
        self._watchdog = asyncio.create_task(self._watch(), name="camera-watchdog")
        for declared in self.config.cameras:
            if declared.pulled:
                source = OpenCVSource(declared, self, self._loop, self.config)
                source.start()
                self._sources.append(source)
        log.info("camera_hub_started", cameras=sorted(self._cameras), sources=len(self._sources))

    async def stop(self) -> None:
        for source in self._sources:
            source.stop()
        await asyncio.gather(*(asyncio.to_thread(source.join, 5.0) for source in self._sources))
        self._sources.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        for camera in self._cameras.values():
            for item in camera.lane.drain():
                if not item.future.done():
                    item.future.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool, self._watchdog, self._loop = None, None, None

    async def __aenter__(self) -> CameraHub:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # ingest --------------------------------------------------------------------------------------------------
    async def submit(self, frame: cameras_pb2.Frame) -> cameras_pb2.FrameAck:
        """A frame from the gRPC stream. Raises FrameError (bad input) or CameraLimitError."""
        received = time.time()
        camera_id = frame.camera_id
        try:
            camera, role, position = self._camera_for(frame)
            if camera is not None and camera.pulled:
                raise FrameError("camera_id", f"camera {camera_id!r} is fed by its configured source "
                                              f"{camera.source!r}, not over gRPC")
            spec = check_image(frame.image, self.config.max_pixels)
            capture = capture_seconds(frame, received, self.config.max_clock_ahead_seconds,
                                       self.config.max_clock_behind_seconds)
        except FrameError as exc:
            FRAMES_INVALID.labels(exc.field).inc()
            log.info("camera_frame_invalid", camera=camera_id[:80], field=exc.field, error=str(exc))
            raise
        if camera is None:   # registered only with a frame that passed every check
            if len(self._cameras) >= self.config.max_cameras:
                raise CameraLimitError(f"camera {camera_id!r}: max_cameras ({self.config.max_cameras}) reached")
            camera = self._add_camera(camera_id, role, position, "grpc")
            log.info("camera_registered", camera=camera_id, role=role, position=position)
        return await self._admit(camera, capture, received, frame.sequence, spec=spec, data=frame.image.data)

    async def submit_decoded(self, camera_id: str, bgr: np.ndarray, capture_time: float,
                             sequence: int) -> cameras_pb2.FrameAck:
        """A frame an OpenCV source already decoded (BGR HxWx3 uint8) for a declared camera."""
        camera = self._cameras[camera_id]
        if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
            raise FrameError("image", f"expected BGR uint8 HxWx3, got {bgr.dtype} {bgr.shape}")
        if bgr.shape[0] * bgr.shape[1] > self.config.max_pixels:
            raise FrameError("image", f"{bgr.shape[1]}x{bgr.shape[0]} is over the limit of "
                                      f"{self.config.max_pixels} pixels")
        return await self._admit(camera, capture_time, time.time(), sequence, decoded=bgr)

    def _camera_for(self, frame: cameras_pb2.Frame) -> tuple[CameraState | None, str | None, str]:
        """(the registered camera or None for a new one, role, position); FrameError for bad identity fields."""
        camera_id = frame.camera_id
        if not camera_id:
            raise FrameError("camera_id", "empty")
        if not CAMERA_ID.match(camera_id):
            raise FrameError("camera_id", f"expected 1-64 characters [A-Za-z0-9._-], got {camera_id[:80]!r}")
        if frame.role != common_pb2.CAMERA_ROLE_UNSPECIFIED and frame.role not in ROLE_NAMES:
            raise FrameError("role", f"unknown value {frame.role}")
        if frame.position not in POSITION_NAMES:
            raise FrameError("position", f"unknown value {frame.position}")
        role = ROLE_NAMES.get(frame.role)
        position = POSITION_NAMES[frame.position]
        camera = self._cameras.get(camera_id)
        if camera is None:
            if not self.config.allow_unknown_cameras:
                raise UnknownCameraError(camera_id)
            if role is None:
                raise FrameError("role", "unspecified on the camera's first frame (CABIN or EXTERIOR)")
            return None, role, position
        if role is not None and role != camera.role:
            raise FrameError("role", f"camera is {camera.role}, frame says {role}")
        if position != "unspecified" and camera.position != "unspecified" and position != camera.position:
            raise FrameError("position", f"camera is mounted {camera.position}, frame says {position}")
        return camera, role, position

    def _add_camera(self, camera_id: str, role: str, position: str, source: str, pulled: bool = False,
                    declared: bool = False) -> CameraState:
        camera = CameraState(camera_id, role, position, source,
                         FrameRing(self.config.ring_seconds, self.config.ring_max_bytes),
                         DecodeLane(self.config.max_pending_frames, self.config.model_size), pulled=pulled,
                         declared=declared)
        self._cameras[camera_id] = camera
        CAMERA_UP.labels(camera_id).set(0)
        return camera

    def _forget(self, camera: CameraState, reason: str) -> None:
        """Unregister a self-registered camera: its ring, rate, metrics and undelivered frames go with it."""
        if self._cameras.get(camera.id) is not camera:
            return
        if camera.up:
            self._set_up(camera, False, reason)
        del self._cameras[camera.id]
        self._rates.pop(camera.id, None)
        camera.ring.clear()
        self.recorder.drop(camera.id)
        for item in camera.lane.drain():
            self._resolve(item, FrameError("camera_id", f"camera {camera.id!r} was unregistered ({reason})"))
        for consumer in self._consumers:
            consumer.latest.pop(camera.id, None)
        forget_camera(camera.id)
        log.info("camera_forgotten", camera=camera.id, reason=reason)

    async def _admit(self, camera: CameraState, capture_time: float, received: float, sequence: int, *,
                     spec: ImageSpec | None = None, data: bytes = b"",
                     decoded: np.ndarray | None = None) -> cameras_pb2.FrameAck:
        if self._loop is None:
            raise RuntimeError("CameraHub.start() has not been awaited")
        age = received - capture_time
        if age > self.config.max_frame_age_seconds:
            return self._dropped(camera, sequence, cameras_pb2.DROP_REASON_STALE,
                                 f"captured {age:.3f} s ago; max_frame_age_seconds is "
                                 f"{self.config.max_frame_age_seconds:g}")
        if capture_time <= camera.last_admitted_capture:
            return self._dropped(camera, sequence, cameras_pb2.DROP_REASON_OUT_OF_ORDER,
                                 f"capture time {capture_time:.6f} is not after the camera's latest "
                                 f"{camera.last_admitted_capture:.6f}")
        camera.last_admitted_capture = capture_time
        self._alive(camera)
        if camera.role == "exterior":   # event clips at the camera's own rate, whatever analysis may take
            self.recorder.add(RecordedFrame(camera.id, camera.position, capture_time, spec, data, decoded))
        rate = self._rates.get(camera.id)
        if rate is not None and (rate <= 0 or capture_time - camera.last_rate_capture < 1.0 / rate):
            return self._dropped(camera, sequence, cameras_pb2.DROP_REASON_RATE_LIMITED,
                                 f"analysis rate for this camera is {rate:g} fps")
        camera.last_rate_capture = capture_time
        item = PendingFrame(capture_time, received, sequence, self._loop.create_future(), spec, data, decoded)
        replaced = camera.lane.offer(item, self._pool, self._loop,
                                     lambda done, result, error, seconds: self._decoded(camera, done, result, error,
                                                                                      seconds))
        for old in replaced:
            self._resolve(old, self._dropped(camera, old.sequence, cameras_pb2.DROP_REASON_OVERLOAD,
                                             f"sequence {item.sequence} replaced it before decoding"))
        QUEUE_DEPTH.labels(camera.id).set(len(camera.lane))
        # The caller may go away (stream cancelled); the frame is still processed for everyone else.
        return await asyncio.shield(item.future)

    def _dropped(self, camera: CameraState, sequence: int, reason: int, detail: str) -> cameras_pb2.FrameAck:
        camera.dropped += 1
        FRAMES_DROPPED.labels(camera.id, REASON_LABELS[reason]).inc()
        return cameras_pb2.FrameAck(camera_id=camera.id, sequence=sequence, accepted=False, drop_reason=reason,
                                    detail=detail, queue_depth=len(camera.lane))

    @staticmethod
    def _resolve(item: PendingFrame, result: cameras_pb2.FrameAck | BaseException) -> None:
        if item.future.done():
            return
        if isinstance(result, BaseException):
            item.future.set_exception(result)
        else:
            item.future.set_result(result)

    def _decoded(self, camera: CameraState, item: PendingFrame, result, error: FrameError | None,
                 seconds: float) -> None:
        """A lane's result, on the event loop."""
        QUEUE_DEPTH.labels(camera.id).set(len(camera.lane))
        if error is not None:
            FRAMES_INVALID.labels(error.field).inc()
            log.info("camera_frame_invalid", camera=camera.id, field=error.field, error=str(error))
            self._resolve(item, error)
            self._never_valid(camera)
            return
        if self._cameras.get(camera.id) is not camera:   # forgotten meanwhile
            self._resolve(item, FrameError("camera_id", f"camera {camera.id!r} was unregistered"))
            return
        DECODE_SECONDS.labels(camera.id).observe(seconds)
        self._store(camera, item, *result)

    def _never_valid(self, camera: CameraState) -> bool:
        """A self-registered camera whose frames have all failed to decode does not keep its registry slot."""
        if camera.declared or camera.accepted or not camera.lane.idle:
            return False
        self._forget(camera, "no frame of it could be decoded")
        return True

    def _store(self, camera: CameraState, item: PendingFrame, original: np.ndarray, image: np.ndarray) -> None:
        original.flags.writeable = False
        image.flags.writeable = False
        frame = CameraFrame(camera.id, camera.role, camera.position, item.capture_time, item.received_time,
                            image, original, item.sequence)
        camera.ring.append(frame)
        camera.accepted += 1
        camera.last_frame_time = item.capture_time
        now = time.time()
        camera.last_frame_age = max(0.0, now - item.capture_time)
        camera.accepted_at.append(time.monotonic())
        FRAMES_ACCEPTED.labels(camera.id).inc()
        FRAME_AGE.labels(camera.id).observe(camera.last_frame_age)
        CAMERA_FPS.labels(camera.id).set(camera.fps(time.monotonic(), self.config.watchdog_timeout_seconds))
        RING_BYTES.labels(camera.id).set(camera.ring.nbytes)
        for consumer in self._consumers:
            consumer.offer(frame)
        self._resolve(item, cameras_pb2.FrameAck(camera_id=camera.id, sequence=item.sequence, accepted=True,
                                                 queue_depth=len(camera.lane)))

    # watchdog ------------------------------------------------------------------------------------------------
    def _alive(self, camera: CameraState) -> None:
        camera.last_alive = time.monotonic()
        if not camera.up:
            self._set_up(camera, True, "frames arriving")

    async def _watch(self) -> None:
        timeout = self.config.watchdog_timeout_seconds
        period = min(0.5, timeout / 4)
        started = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for camera in list(self._cameras.values()):
                CAMERA_FPS.labels(camera.id).set(camera.fps(now, timeout))
                if camera.up and now - camera.last_alive > timeout:
                    self._set_up(camera, False, f"no frame for {timeout:g} s")
                if not camera.up and len(camera.ring) > 1:
                    camera.ring.keep_latest()        # a gone camera holds one frame (snapshots), not its history
                    RING_BYTES.labels(camera.id).set(camera.ring.nbytes)
                if (not camera.declared and not camera.up and camera.lane.idle and camera.last_alive is not None
                        and now - camera.last_alive > self.config.forget_after_seconds):
                    self._forget(camera, f"no frame for {self.config.forget_after_seconds:g} s")
                elif camera.last_alive is None and camera.state_reason == "no frame yet" and now - started > timeout:
                    # a declared camera that never delivered: say so once (its state was already down)
                    self._set_up(camera, False, f"no frame within {timeout:g} s of start")

    def _set_up(self, camera: CameraState, up: bool, reason: str) -> None:
        camera.up, camera.state_reason = up, reason
        CAMERA_UP.labels(camera.id).set(1 if up else 0)
        (log.info if up else log.warning)("camera_state", camera=camera.id, up=up, reason=reason)
        for callback in self._callbacks:
            try:
                result = callback(camera.id, up, reason)
                if inspect.isawaitable(result):
                    asyncio.ensure_future(result)
            except Exception:
                log.exception("camera_state_callback_failed", camera=camera.id)

    def on_camera_state(self, callback: StateCallback) -> None:
        """callback(camera_id, up, reason) on every up/down transition (a coroutine function is scheduled)."""
        self._callbacks.append(callback)

    # readers -------------------------------------------------------------------------------------------------
    def latest(self, camera_id: str) -> CameraFrame | None:
        camera = self._cameras.get(camera_id)
        return camera.ring.latest() if camera else None

    def history(self, camera_id: str, seconds: float) -> list[CameraFrame]:
        """Frames of the last `seconds` before the camera's newest frame, oldest first."""
        camera = self._cameras.get(camera_id)
        newest = camera.ring.latest() if camera else None
        if newest is None:
            return []
        return camera.ring.since(newest.capture_time - seconds)

    def recording(self, camera_id: str, since: float, until: float = math.inf) -> list[RecordedFrame]:
        """Every admitted frame of an exterior camera in [since, until], still encoded (see recorder.py)."""
        return self.recorder.frames(camera_id, since, until)

    async def frames(self) -> AsyncIterator[CameraFrame]:
        """New decoded frames from every camera; a slow consumer gets the newest frame per camera."""
        consumer = LatestFrames()
        self._consumers.add(consumer)
        try:
            while True:
                yield await consumer.get()
        finally:
            self._consumers.discard(consumer)

    def set_analysis_rate(self, camera_id: str, fps: float | None) -> None:
        """The power governor's knob: at most `fps` frames per second are decoded for this camera (the rest are
        dropped RATE_LIMITED before decoding); 0 pauses the camera's analysis; None removes the limit."""
        if fps is not None and (math.isnan(fps) or fps < 0):
            raise ValueError(f"fps: must be >= 0 or None, got {fps}")
        self._rates[camera_id] = fps
        log.info("camera_analysis_rate", camera=camera_id, fps=fps)

    def camera_ids(self) -> list[str]:
        return sorted(self._cameras)

    def camera_status(self, camera_id: str) -> cameras_pb2.CameraStatus:
        """Raises KeyError for an unknown camera."""
        camera = self._cameras[camera_id]
        status = cameras_pb2.CameraStatus(
            camera_id=camera.id, role=ROLE_VALUES[camera.role], position=POSITION_VALUES[camera.position],
            source=camera.source, up=camera.up,
            frames_per_second=camera.fps(time.monotonic(), self.config.watchdog_timeout_seconds),
            frames_accepted=camera.accepted, frames_dropped=camera.dropped, buffered_frames=len(camera.ring),
            last_frame_age_s=camera.last_frame_age)
        if camera.last_frame_time is not None:
            status.last_frame_time.FromNanoseconds(int(camera.last_frame_time * 1e9))
        return status

    def status(self) -> list[cameras_pb2.CameraStatus]:
        return [self.camera_status(camera_id) for camera_id in sorted(self._cameras)]

    def queue_depth(self, camera_id: str) -> int:
        camera = self._cameras.get(camera_id)
        return len(camera.lane) if camera else 0
