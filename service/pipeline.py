"""The one-way analysis path: camera frames in, through the perception cascade, to the skills.

Two lanes, each with its own worker thread: the safety lane analyses the frames Safety needs now (exterior
cameras while someone may get out, cabin cameras while an occupant may be left behind) and leaves out the slow
stages (dlib identity, OCR), so a safe-exit frame never waits behind them or behind the general lane's work;
the general lane analyses every other camera with all its stages. Which lane a camera is in is asked per frame
(`lane_of`, wired by the server to Safety), so it follows the vehicle state. In each lane the newest frame per
camera wins while the worker is busy (a safety decision on an old frame is worse than one on the newest), and
the camera that has waited longest goes next.

On the CPU backend the safety lane also runs above the process's priority where the OS allows it (real-time,
else nice-raised: service.thread_priority), on its own sessions of the small detectors (`Cascade.lane_models`, their
pool threads inheriting that priority), so the OS preempts the language model and the general lane for a
safety frame. Analysed safety frames are handed to the skills before waiting general ones.

Also the perception services other parts use on single images (enrolment, sign reading, the description a
text-only model gets of an image), so every part shares one set of loaded perception models.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import structlog
from prometheus_client import Counter as MetricCounter
from prometheus_client import Histogram

from service.cameras.hub import CameraHub
from service.cameras.ring import CameraFrame
from service.perception.cascade import SLOW_STAGES, Cascade
from service.perception.types import Face, FrameAnalysis, TextLine
from service.power.sources import record_busy
from service.runtime.frame_cache import FrameCache
from service.runtime.scheduler import JobClass
from service.thread_priority import raise_current_thread

log = structlog.get_logger(__name__)

LANES = ("safety", "general")
# Intra-op threads of the safety lane's own detector sessions: both cores for the one frame that matters now.
SAFETY_LANE_THREADS = 2
# The most of its wall time the (real-time) safety lane may spend analysing; the rest is for everything else.
SAFETY_LANE_DUTY_CAP = 0.5
LaneOf = Callable[[CameraFrame], str]
RequestedStages = Callable[[str], set[str]]   # camera id -> the stages skills asked for on it now
LANE_WAIT = Histogram("incar_pipeline_lane_wait_seconds", "Frame arrival to the start of its analysis, per lane",
                      ["lane"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
LANE_PAUSED = MetricCounter("incar_pipeline_safety_lane_paused_seconds_total",
                            "Seconds the safety lane paused to keep its busy share at SAFETY_LANE_DUTY_CAP")
LANE_ANALYSIS = Histogram("incar_pipeline_lane_analysis_seconds", "Cascade time per frame, per lane", ["lane"],
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


class DutyCycle:
    """The share of wall time a lane spends analysing, over the last `window` seconds, kept at or under `cap`.

    The safety lane runs real-time where permitted (service.thread_priority): nothing at normal priority runs
    while its threads do, the event loop that hands its frames on and streams the car's actions included. Its
    safe-exit work is light (bench/safety.py: two cameras at 10 fps, ~15 ms per detector frame, ~20 % of its
    time), but a cabin full of moving passengers at a high frame rate could keep it busy back to back. So the
    lane pauses before its next frame while its busy share is over the cap; latest-wins means a pause skips
    frames, never queues them."""

    def __init__(self, cap: float = 0.5, window: float = 1.0):
        if not 0 < cap <= 1 or window <= 0:
            raise ValueError("duty cycle: cap in (0, 1], window > 0")
        self.cap, self.window = cap, window
        self._spans: deque[tuple[float, float]] = deque()

    def record(self, started: float, ended: float) -> None:
        self._spans.append((started, ended))

    def pause(self, now: float) -> float:
        """Seconds to wait before the next analysis so that the busy share of the window is back at the cap."""
        start_of_window = now - self.window
        while self._spans and self._spans[0][1] <= start_of_window:
            self._spans.popleft()
        clipped = [(max(start, start_of_window), min(end, now)) for start, end in self._spans]
        excess = sum(end - start for start, end in clipped) - self.cap * self.window
        if excess <= 0:
            return 0.0
        # Nothing is analysed while paused: the window's start must move past `excess` seconds of busy time.
        for start, end in clipped:
            if end - start >= excess:
                return max(0.0, start + excess - start_of_window)
            excess -= end - start
        return 0.0


class _Mailbox:
    """The newest waiting frame per camera of one lane (latest wins), oldest-waiting camera first."""

    def __init__(self):
        self.frames: dict[str, tuple[CameraFrame, float]] = {}
        self.ready = asyncio.Event()

    def offer(self, frame: CameraFrame) -> None:
        since = self.frames.pop(frame.camera_id, (None, time.perf_counter()))[1]
        self.frames[frame.camera_id] = (frame, since)
        self.ready.set()

    def discard(self, camera_id: str) -> None:
        self.frames.pop(camera_id, None)

    async def get(self) -> tuple[CameraFrame, float]:
        while not self.frames:
            self.ready.clear()
            await self.ready.wait()
        oldest = min(self.frames, key=lambda cam: self.frames[cam][1])
        return self.frames.pop(oldest)


class AnalysisPipeline:
    def __init__(self, hub: CameraHub, cascade: Cascade, lane_of: LaneOf | None = None,
                 safety_threads: int = SAFETY_LANE_THREADS):
        self.hub = hub
        self.cascade = cascade
        self.lane_of: LaneOf = lane_of or (lambda frame: "general")
        self.requested_stages: RequestedStages = lambda camera_id: set()
        self.frame_cache = FrameCache()      # a frame asked about twice is described once
        self._executors = {
            "safety": ThreadPoolExecutor(1, thread_name_prefix="analysis-safety", initializer=raise_current_thread),
            "general": ThreadPoolExecutor(1, thread_name_prefix="analysis-general")}
        self._models = {"safety": cascade.lane_models(safety_threads), "general": cascade.model}
        self.safety_duty = DutyCycle(SAFETY_LANE_DUTY_CAP)

    def route(self, lane_of: LaneOf, requested_stages: RequestedStages) -> None:
        """The server's policies, once the skills exist: which lane a frame takes, and the stages skills asked
        for on a camera (the safety lane keeps those: a driver touching the handle must still be recognised)."""
        self.lane_of, self.requested_stages = lane_of, requested_stages

    def _lane(self, frame: CameraFrame) -> str:
        try:
            lane = self.lane_of(frame)
        except Exception:   # a broken policy must not stop analysis: treat the frame as Safety's
            log.exception("pipeline.lane_policy_failed", camera_id=frame.camera_id)
            return "safety"
        return lane if lane in LANES else "general"

    async def analyses(self) -> AsyncIterator[FrameAnalysis]:
        """Analysed frames from both lanes, as each is ready."""
        boxes = {lane: _Mailbox() for lane in LANES}
        # Ranked by lane, then by arrival: a safety frame analysed while general ones wait is handed over first.
        out: asyncio.PriorityQueue[tuple[int, int, FrameAnalysis]] = asyncio.PriorityQueue(maxsize=16)
        order = itertools.count()

        async def feed() -> None:
            async for frame in self.hub.frames():
                lane = self._lane(frame)
                for other in LANES:
                    if other != lane:
                        boxes[other].discard(frame.camera_id)   # a camera that changed lanes
                boxes[lane].offer(frame)

        async def work(lane: str) -> None:
            loop = asyncio.get_running_loop()
            while True:
                if lane == "safety" and (rest := self.safety_duty.pause(time.perf_counter())) > 0:
                    LANE_PAUSED.inc(rest)
                    await asyncio.sleep(rest)
                frame, since = await boxes[lane].get()
                skip = tuple(set(SLOW_STAGES) - self.requested_stages(frame.camera_id)) if lane == "safety" else ()
                started = time.perf_counter()
                LANE_WAIT.labels(lane).observe(started - since)
                try:
                    # On an NPU the lane is the job class its detector runs are ranked by.
                    job = JobClass.CRITICAL if lane == "safety" else JobClass.ALERT
                    analysis = await loop.run_in_executor(self._executors[lane], self.cascade.analyze,
                                                          frame.original, frame, skip, job, self._models[lane])
                except Exception:
                    log.exception("pipeline.analysis_failed", camera_id=frame.camera_id, lane=lane)
                    continue
                ended = time.perf_counter()
                spent = ended - started
                if lane == "safety":
                    self.safety_duty.record(started, ended)
                LANE_ANALYSIS.labels(lane).observe(spent)
                record_busy("cpu", spent)
                await out.put((LANES.index(lane), next(order), analysis))

        tasks = [asyncio.create_task(feed(), name="analysis-feed"),
                 *(asyncio.create_task(work(lane), name=f"analysis-{lane}") for lane in LANES)]
        try:
            while True:
                getter = asyncio.ensure_future(out.get())
                done, _ = await asyncio.wait([getter, tasks[0]], return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()[2]
                    continue
                getter.cancel()
                while not out.empty():       # the camera stream ended: hand over what was analysed
                    yield out.get_nowait()[2]
                return
        finally:
            for task in tasks:
                task.cancel()

    # --- single images --------------------------------------------------------------------------------------
    def embed_faces(self, bgr: np.ndarray) -> list[Face]:
        faces = self.cascade.model("faces").detect(bgr)
        return self.cascade.model("identity").embed_faces(bgr, faces) if faces else []

    def read_signs(self, bgr: np.ndarray) -> list[TextLine]:
        return self.cascade.model("text").read(bgr)

    def describe_images(self, images: Sequence[np.ndarray]) -> str:
        """What a text-only model is told about images: the facts perception can see, stated plainly."""
        return " ".join(f"Image {index}: {self.frame_cache.get_or_compute('description', bgr, self._facts)}."
                        for index, bgr in enumerate(images, start=1))

    def _facts(self, bgr: np.ndarray) -> str:
        facts = []
        try:
            objects = self.cascade.model("objects").detect(bgr)
        except KeyError:
            objects = []
        counts = Counter(d.label for d in objects)
        if counts:
            facts.append(", ".join(f"{n} {label}{'s' if n > 1 else ''}" for label, n in counts.most_common()))
        faces = self.cascade.model("faces").detect(bgr)
        if faces:
            facts.append(f"{len(faces)} face{'s' if len(faces) > 1 else ''}")
        texts = [t.text for t in self.read_signs(bgr) if t.text.strip()]
        if texts:
            facts.append("text reading " + "; ".join(f'"{t}"' for t in texts[:4]))
        return "; ".join(facts) if facts else "nothing the perception models recognise"
