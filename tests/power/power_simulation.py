"""A simulated car for governor tests: cameras on a simulated clock feeding a cascade on one shared NPU.

Stage costs are set at burst clock and stretch by 1 / clock of the HTP mode the governor picked, as on the
device. Busy time goes to the real energy model through `record_busy`; latencies to the real budget tracker.
Nothing here sleeps: 60 simulated seconds run in well under a second.
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from service.power.budgets import BudgetTracker
from service.power.config import PowerConfig
from service.power.governor import Governor
from service.power.sources import BusyLedger, EnergyModel

MOTION_CPU_S = 0.004        # background subtraction per frame (CPU)
DECODE_S = 0.003            # JPEG decode + resize per analysed frame (camera pipeline)
DETECT_NPU_S = 0.020        # person/vehicle detector at burst
IDENTIFY_NPU_S = 0.025      # faces / plates on the moving regions at burst
VERIFY_NPU_S = 0.120        # language-model verification of a detected person at burst
PRIORITY = {"safety": 0, "sentinel": 1}


class SimClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class SimCamera:
    camera_id: str
    purpose: str                      # "sentinel" or "safety": whose frames these are
    fps: float = 15.0
    next_frame: float = 0.0
    noise_motion: float = 0.3         # share of frames with motion from trees, rain, passing light
    person_between: tuple[float, float] | None = None   # simulated seconds a person is in view
    stages: int = 4
    frames: int = 0
    detector_runs_with_person: list[float] = field(default_factory=list)
    detector_runs: list[tuple[float, float, bool]] = field(default_factory=list)  # (capture, done, person), clock s


@dataclass(order=True)
class Job:
    priority: int
    submitted: float
    seq: int
    camera: SimCamera = field(compare=False)
    capture: float = field(compare=False)
    stages_left: list = field(compare=False)
    person: bool = field(compare=False)


class SimCar:
    def __init__(self, config: PowerConfig, cameras: list[SimCamera], *, mode: str, seed: int = 7,
                 backend: str = "qnn-htp", active_skills=("sentinel",)):
        self.config = config
        self.clock = SimClock()
        self.t0 = self.clock.now
        self.ledger = BusyLedger()
        self.source = EnergyModel.for_backend(config, backend, ledger=self.ledger, clock=self.clock)
        self.budgets = BudgetTracker(config.budgets, clock=self.clock)
        self.budgets.set_mode(mode)
        self.cameras = {c.camera_id: c for c in cameras}
        self.hook_calls: list[tuple] = []
        self.governor = Governor(config.governor, self.source, self.budgets, clock=self.clock,
                                 htp_modes=config.htp_modes,
                                 set_analysis_rate=self._set_rate, set_cascade_depth=self._set_depth,
                                 set_htp_performance_mode=lambda m: self.hook_calls.append(("htp", m)))
        for skill in ("safety", "sentinel"):
            self.governor.set_skill_active(skill, skill in active_skills)
        for cam in cameras:
            purposes = ("safety", "sentinel") if cam.purpose == "safety" else ("sentinel",)
            nominal = cam.fps
            self.governor.add_camera(cam.camera_id, nominal, max_stages=4, purposes=purposes)
        self.rng = random.Random(seed)
        self.queue: list[Job] = []
        self.npu_free_at = self.clock.now
        self.running: Job | None = None
        self.seq = 0
        self.latencies: dict[str, list[float]] = {"safety": [], "sentinel": []}
        self.energy_joules = 0.0
        self.dropped = 0
        self.levels: list[int] = []
        self.decisions_at_level_zero_watts = 0.0   # power measured before the governor's first step

    def _set_rate(self, camera_id: str, fps: float) -> None:
        self.hook_calls.append(("rate", camera_id, fps))
        self.cameras[camera_id].fps = fps

    def _set_depth(self, camera_id: str, stages: int) -> None:
        self.hook_calls.append(("depth", camera_id, stages))
        self.cameras[camera_id].stages = stages

    @property
    def elapsed(self) -> float:
        return self.clock.now - self.t0

    def _person_in_view(self, cam: SimCamera) -> bool:
        return cam.person_between is not None and cam.person_between[0] <= self.elapsed < cam.person_between[1]

    def _capture(self, cam: SimCamera) -> None:
        now = self.clock.now
        cam.frames += 1
        self.ledger.add("cameras", DECODE_S)
        self.ledger.add("cpu", MOTION_CPU_S)
        person = self._person_in_view(cam)
        # Safety watches every frame for cyclists (no motion gate); Sentinel gates on motion.
        if cam.purpose != "safety" and not person and self.rng.random() >= cam.noise_motion:
            return
        stages = [("detect", DETECT_NPU_S)]
        if cam.stages >= 3 and cam.purpose != "safety":
            stages.append(("identify", IDENTIFY_NPU_S))
        if cam.stages >= 4 and person:
            stages.append(("verify", VERIFY_NPU_S))
        if cam.stages < 2:
            return
        # Latest wins, as in the camera hub: a frame still waiting for the NPU is replaced by the newer one.
        stale = [j for j in self.queue if j.camera is cam and j.stages_left and j.stages_left[0][0] == "detect"]
        covers_since = now + MOTION_CPU_S
        if stale:
            # The dropped frame's moment is only judged when this one is: its wait counts in the latency.
            covers_since = min(j.capture for j in stale)
            self.dropped += len(stale)
            self.queue = [j for j in self.queue if j not in stale]
            heapq.heapify(self.queue)
        self.seq += 1
        heapq.heappush(self.queue, Job(PRIORITY[cam.purpose], now, self.seq, cam, covers_since, stages, person))

    def _serve_npu(self) -> None:
        """Run NPU stages (one at a time, highest priority first) up to the current time."""
        while True:
            if self.running is not None:
                if self.npu_free_at > self.clock.now:
                    return
                job, self.running = self.running, None
                name, _ = job.stages_left.pop(0)
                if name == "detect":
                    job.camera.detector_runs.append((job.submitted, self.npu_free_at, job.person))
                    if job.person:
                        job.camera.detector_runs_with_person.append(self.npu_free_at - self.t0)
                if job.stages_left:
                    heapq.heappush(self.queue, job)
                else:
                    self.latencies[job.camera.purpose].append(self.npu_free_at - job.capture)
                    if job.camera.purpose == "safety":
                        self.budgets.observe_latency("safety", self.npu_free_at - job.capture)
            if not self.queue:
                return
            job = heapq.heappop(self.queue)
            start = max(self.npu_free_at, job.submitted + MOTION_CPU_S)
            if start > self.clock.now:
                heapq.heappush(self.queue, job)
                return
            seconds = job.stages_left[0][1] / self.source.npu_clock
            self.ledger.add("npu", seconds)
            self.npu_free_at = start + seconds
            self.running = job

    def run(self, seconds: float, step: float = 0.002) -> None:
        end = self.clock.now + seconds
        next_tick = self.clock.now + self.config.governor.period_seconds
        for cam in self.cameras.values():
            cam.next_frame = self.clock.now
        while self.clock.now < end:
            self.clock.now = round(self.clock.now + step, 9)
            for cam in self.cameras.values():
                while cam.next_frame <= self.clock.now:
                    self._capture(cam)
                    cam.next_frame += 1.0 / cam.fps
            self._serve_npu()
            if self.clock.now >= next_tick:
                level = self.governor.level
                self.governor.tick()
                reading = self.source.last_reading
                if level == 0:
                    self.decisions_at_level_zero_watts = max(self.decisions_at_level_zero_watts, reading.total_watts)
                self.energy_joules += reading.total_watts * reading.interval
                self.levels.append(self.governor.level)
                next_tick += self.config.governor.period_seconds
