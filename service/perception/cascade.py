"""The per-camera perception cascade: motion gates the detectors; which stages run is set per camera and can be
changed at run time (the power governor lowers the depth). Skills consume the FrameAnalysis; nothing here
imports from skills.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import structlog
from prometheus_client import Counter, Histogram

from service.perception.models import CPU_INT8, model_path, models_dir, variant_for
from service.perception.motion import MotionConfig, MotionDetector
from service.perception.objects import IouTracker
from service.perception.scheduled import job_class, schedule_sessions
from service.perception.types import FrameAnalysis
from service.runtime.providers import QNN_BACKENDS
from service.runtime.scheduler import JobClass, NpuScheduler
from service.thread_priority import at_process_priority

log = structlog.get_logger(__name__)

# The cascade's order, cheapest first: depth N runs the first N enabled stages.
STAGES = ("motion", "faces", "objects", "identity", "text")
# Stages that ride with a base stage (run only when it may, and not counted in the depth): the age estimate
# of each face, and body pose with the person detector.
EXTRA_STAGES = {"age": "faces", "pose": "objects"}
ALL_STAGES = (*STAGES, *EXTRA_STAGES)
# The slow stages: a frame in the safety lane skips them (a safe-exit or child-presence decision must not wait
# behind dlib or OCR; nobody needs greeting in a locked car, and Car Finder reads signs itself).
SLOW_STAGES = ("identity", "text")
# The small detectors a lane may hold its own sessions of (identity is a worker process, OCR stays shared).
LANE_MODELS = ("faces", "objects", "pose", "age")
# Cabin: who is there (Greeter), who is left (Safety: faces, ages, bodies) and what was left behind (phones,
# bags); exterior: what approaches (Safety: tracks, time to collision) and where we parked (Car Finder: signs).
# On exterior cameras pose runs only on frames with a person detected (Sentinel: crouching, reaching).
DEFAULT_STAGES = {"cabin": ("motion", "faces", "age", "objects", "pose", "identity"),
                  "exterior": ("motion", "objects", "text")}

STAGE_SECONDS = Histogram("incar_perception_stage_seconds", "Time per perception stage per frame", ["stage"],
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
FRAMES = Counter("incar_perception_frames_total", "Frames analysed, by whether motion let the detectors run",
                 ["camera_id", "gated"])


ModelSource = Callable[[str], object]   # model name -> a loaded model (Cascade.model, or a lane's own)


class CameraMeta(Protocol):
    camera_id: str
    role: str
    position: str
    capture_time: float


@dataclass
class CameraCascadeConfig:
    stages: tuple[str, ...] | None = None  # None: DEFAULT_STAGES for the camera's role
    motion_threshold: float = 0.002        # moved share of the frame that wakes the detectors
    idle_refresh_seconds: float = 2.0      # run the detectors this often even when nothing moves (a still passenger)
    # dlib identity costs ~0.3 s per face on the CPU: re-embed only when the number of faces changes or this
    # much time has passed (who sits in the car rarely changes between frames).
    identity_refresh_seconds: float = 1.0
    motion: MotionConfig = field(default_factory=MotionConfig)

    def validate(self) -> None:
        if self.stages is not None:
            unknown = [s for s in self.stages if s not in ALL_STAGES]
            if unknown:
                raise ValueError(f"stages: unknown {unknown}; expected some of {list(ALL_STAGES)}")
            for needs, base in (("identity", "faces"), ("age", "faces"), ("pose", "objects")):
                if needs in self.stages and base not in self.stages:
                    raise ValueError(f"stages: '{needs}' needs '{base}'")
        if not 0 <= self.motion_threshold < 1:
            raise ValueError(f"motion_threshold: must be in [0, 1), got {self.motion_threshold}")
        if self.identity_refresh_seconds < 0:
            raise ValueError(f"identity_refresh_seconds: must be >= 0, got {self.identity_refresh_seconds}")
        if self.idle_refresh_seconds < 0:
            raise ValueError(f"idle_refresh_seconds: must be >= 0, got {self.idle_refresh_seconds}")
        self.motion.validate()


@dataclass
class PerceptionConfig:
    models_dir: str = ""                   # "" -> $INCAR_MODELS_DIR or build/models
    backend: str = "cpu"                   # "cpu" | "qnn-htp" | "qnn-emulator"
    variant: str = ""                      # "" -> "float" on cpu, "qdq" on the QNN backends; "cpu-int8": the
    #                                        x86 int8 graphs where built (build/cpu_int8.py), float otherwise
    face_range: str = "full"               # "full" finds faces to ~5 m (rear seats); "short" is cheaper, ~2 m
    threads: int | None = None
    depth: int = len(STAGES)               # the governor's knob: how many cascade stages may run
    cameras: dict[str, CameraCascadeConfig] = field(default_factory=dict)
    default_camera: CameraCascadeConfig = field(default_factory=CameraCascadeConfig)

    def validate(self) -> None:
        if self.backend not in ("cpu", "qnn-htp", "qnn-emulator"):
            raise ValueError(f"backend: expected cpu, qnn-htp or qnn-emulator, got {self.backend!r}")
        if self.variant not in ("", "float", "qdq", CPU_INT8):
            raise ValueError(f"variant: expected float, qdq or {CPU_INT8}, got {self.variant!r}")
        if self.backend != "cpu" and self.variant in ("float", CPU_INT8):
            raise ValueError("variant: the QNN backends run the quantized (qdq) graphs only")
        if self.face_range not in ("full", "short"):
            raise ValueError(f"face_range: expected full or short, got {self.face_range!r}")
        if not 0 <= self.depth <= len(STAGES):
            raise ValueError(f"depth: must be in [0, {len(STAGES)}], got {self.depth}")
        for name, cam in self.cameras.items():
            try:
                cam.validate()
            except ValueError as exc:
                raise ValueError(f"cameras.{name}.{exc}") from None
        self.default_camera.validate()

    @property
    def resolved_variant(self) -> str:
        return self.variant or ("float" if self.backend == "cpu" else "qdq")


@dataclass
class _CameraState:
    config: CameraCascadeConfig
    motion: MotionDetector
    stages: tuple[str, ...] | None
    tracker: IouTracker = field(default_factory=IouTracker)
    depth_limit: int | None = None    # the governor's per-camera cap on the camera's usual stages
    requested: tuple[str, ...] = ()   # stages skills ask for now, on top of the usual ones (never capped)
    last_detectors_run: float = -1e18
    last_identity_run: float = -1e18
    last_face_count: int = -1
    lock: threading.Lock = field(default_factory=threading.Lock)


class Cascade:
    """One per service. `analyze(bgr, meta)` is thread-safe across cameras (one frame at a time per camera)."""

    def __init__(self, config: PerceptionConfig | None = None):
        self.config = config or PerceptionConfig()
        self.config.validate()
        self._depth = self.config.depth
        self._cameras: dict[str, _CameraState] = {}
        self._lock = threading.Lock()
        self._models: dict[str, object] = {}
        self._model_lock = threading.Lock()
        self._scheduler: NpuScheduler | None = None

    # --- run-time control -------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self._depth

    def set_depth(self, depth: int) -> None:
        """The power governor's knob: 0 = nothing, 1 = motion only, 2 = + faces, 3 = + objects, ... (STAGES order)."""
        if not 0 <= depth <= len(STAGES):
            raise ValueError(f"depth: must be in [0, {len(STAGES)}], got {depth}")
        if depth != self._depth:
            log.info("perception_depth_changed", old=self._depth, new=depth)
        self._depth = depth

    def set_stages(self, camera_id: str, stages: tuple[str, ...] | None) -> None:
        """Enable exactly these stages on one camera (None: back to its configured/role default)."""
        CameraCascadeConfig(stages=stages).validate()
        state = self._camera(camera_id)
        state.stages = tuple(stages) if stages is not None else state.config.stages

    def set_requested(self, camera_id: str, stages: tuple[str, ...]) -> None:
        """Stages skills ask for on one camera now (Greeter's faces and identity while someone walks up), run on
        top of its usual stages. The governor's depth cap trims only the usual ones: a skill's wish is a purpose,
        and in a sentry-mode power rung the cap would otherwise leave motion + faces and cut identity (and the
        object detector Sentinel relies on) from the exterior camera the driver is walking towards."""
        stages = tuple(stages)
        if stages:
            CameraCascadeConfig(stages=stages).validate()
        self._camera(camera_id).requested = stages

    def set_camera_depth(self, camera_id: str, depth: int) -> None:
        """The power governor's per-camera knob: only the first `depth` of the stages this camera usually runs
        (by its configuration, run-time stages or role), in STAGES order; stages skills request come on top."""
        if not 0 <= depth <= len(STAGES):
            raise ValueError(f"depth: must be in [0, {len(STAGES)}], got {depth}")
        self._camera(camera_id).depth_limit = depth

    def stages_for(self, camera_id: str, role: str) -> tuple[str, ...]:
        state = self._camera(camera_id)
        configured = state.stages if state.stages is not None else DEFAULT_STAGES.get(role, ("motion",))
        usual = tuple(s for s in STAGES if s in configured)
        if state.depth_limit is not None:
            usual = usual[: state.depth_limit]
        wanted = set(usual) | set(state.requested)
        allowed = STAGES[: self._depth]
        base = tuple(s for s in STAGES if s in wanted and s in allowed)
        riders = set(configured) | set(state.requested)
        return base + tuple(s for s, rides_with in EXTRA_STAGES.items() if s in riders and rides_with in base)

    # --- models (opened on first use, shared by all cameras) -------------------------------------------------
    def use_scheduler(self, scheduler: NpuScheduler) -> None:
        """On a QNN backend, run every detector session as a step on the one NPU scheduler, ranked by the job
        class of the frame (see `service.perception.scheduled`); on the CPU backend this does nothing."""
        if self.config.backend not in QNN_BACKENDS:
            return
        with self._model_lock:
            self._scheduler = scheduler
            for name, model in self._models.items():
                schedule_sessions(model, scheduler, name)

    def model(self, name: str):
        """A loaded perception model ("faces", "objects", "identity", "text", "pose", "age"), opened on first use
        and shared with single-image callers (enrolment, sign reading, image descriptions)."""
        with self._model_lock:
            if name not in self._models:
                model = self._open(name)
                self._models[name] = schedule_sessions(model, self._scheduler, name) if self._scheduler else model
            return self._models[name]

    def lane_models(self, threads: int) -> ModelSource:
        """`model` for one analysis lane: on the CPU backend its own sessions of the small detectors (LANE_MODELS),
        opened on first use by the calling thread with `threads` intra-op threads, so their pool threads have
        that thread's priority and its runs never queue in another lane's pool; the rest, and everything on a
        QNN backend (ranked by the NPU scheduler), are the shared models."""
        if self.config.backend != "cpu":
            return self.model
        own: dict[str, object] = {}

        def model(name: str):
            if name not in LANE_MODELS:
                # A shared model opened from the lane's raised thread would start its pools raised too.
                with at_process_priority():
                    return self.model(name)
            if name not in own:
                own[name] = self._open(name, threads)
            return own[name]
        return model

    def _open(self, name: str, threads: int | None = None):
        cfg = self.config
        base = Path(cfg.models_dir) if cfg.models_dir else models_dir()
        variant = variant_for(name, cfg.resolved_variant)
        kw = dict(threads=threads or cfg.threads, disable_cpu_fallback=cfg.backend != "cpu")
        if name == "faces":
            from service.perception.faces import FaceDetector
            return FaceDetector(model_path(f"face_{cfg.face_range}", variant, base), cfg.face_range, cfg.backend, **kw)
        if name == "objects":
            from service.perception.objects import ObjectDetector
            return ObjectDetector(model_path("objects", variant, base), cfg.backend, **kw)
        if name == "identity":   # in a worker process: dlib holds the GIL for a whole descriptor
            from service.perception.identity_process import ProcessFaceEmbedder
            return ProcessFaceEmbedder()
        if name == "pose":
            from service.perception.pose import PoseEstimator
            return PoseEstimator(model_path("pose", variant, base), cfg.backend, **kw)
        if name == "age":
            from service.perception.age import AgeEstimator
            return AgeEstimator(model_path("age", variant, base), cfg.backend, **kw)
        if name == "text":
            from service.perception.text import TextReader
            return TextReader(model_path("ocr_det", variant, base), model_path("ocr_rec", variant, base), cfg.backend,
                              dictionary_path=model_path("ocr_rec", "float", base), **kw)
        raise KeyError(name)

    def _camera(self, camera_id: str) -> _CameraState:
        with self._lock:
            state = self._cameras.get(camera_id)
            if state is None:
                cam_cfg = self.config.cameras.get(camera_id, self.config.default_camera)
                state = _CameraState(cam_cfg, MotionDetector(cam_cfg.motion), cam_cfg.stages)
                self._cameras[camera_id] = state
            return state

    # --- the cascade ------------------------------------------------------------------------------------------
    def analyze(self, bgr: np.ndarray, meta: CameraMeta, skip: tuple[str, ...] = (),
                job: JobClass = JobClass.ALERT, models: ModelSource | None = None) -> FrameAnalysis:
        """Run this camera's stages on one frame (`skip`: stages to leave out this time, e.g. SLOW_STAGES for a
        frame in the safety lane; `job`: the job class of its NPU runs on a QNN backend; `models`: a lane's
        own (`lane_models`), default the shared ones)."""
        with job_class(job):
            return self._analyze(bgr, meta, skip, models or self.model)

    def _analyze(self, bgr: np.ndarray, meta: CameraMeta, skip: tuple[str, ...], model: ModelSource
                 ) -> FrameAnalysis:
        if not isinstance(bgr, np.ndarray) or bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
            raise ValueError(f"cascade: expected a uint8 BGR frame HxWx3, got "
                             f"{getattr(bgr, 'dtype', type(bgr))} {getattr(bgr, 'shape', '')}")
        state = self._camera(meta.camera_id)
        stages = tuple(s for s in self.stages_for(meta.camera_id, meta.role) if s not in skip)
        fields: dict = {}
        ran: list[str] = []

        def timed(stage: str, run):
            t0 = time.perf_counter()
            out = run()
            STAGE_SECONDS.labels(stage).observe(time.perf_counter() - t0)
            ran.append(stage)
            return out

        with state.lock:
            detectors_allowed = True
            if "motion" in stages:
                fields["motion"] = motion = timed("motion", lambda: state.motion.update(bgr))
                stale = meta.capture_time - state.last_detectors_run >= state.config.idle_refresh_seconds
                detectors_allowed = motion.fraction >= state.config.motion_threshold or stale
            detector_stages = [s for s in stages if s != "motion"]
            FRAMES.labels(meta.camera_id, str(not detectors_allowed and bool(detector_stages)).lower()).inc()
            if detectors_allowed and detector_stages:
                state.last_detectors_run = meta.capture_time
                if "faces" in stages:
                    fields["faces"] = self._faces(bgr, meta, state, stages, timed, model)
                if "objects" in stages:
                    found = timed("objects", lambda: model("objects").detect(bgr))
                    fields["detections"] = detections = tuple(state.tracker.update(found, meta.capture_time))
                    # Outside, bodies matter only when the detector saw a person (cheap gate for a 25 ms stage).
                    if "pose" in stages and (meta.role == "cabin" or any(d.label == "person" for d in detections)):
                        fields["poses"] = tuple(timed("pose", lambda: model("pose").estimate(bgr)))
                if "text" in stages:
                    fields["texts"] = tuple(timed("text", lambda: model("text").read(bgr)))
        return FrameAnalysis(camera_id=meta.camera_id, role=meta.role, position=meta.position,
                             timestamp=float(meta.capture_time), frame=bgr, stages_run=tuple(ran), **fields)

    def _faces(self, bgr, meta, state: _CameraState, stages, timed, model: ModelSource) -> tuple:
        faces = timed("faces", lambda: model("faces").detect(bgr))
        identity_due = (len(faces) != state.last_face_count
                        or meta.capture_time - state.last_identity_run >= state.config.identity_refresh_seconds)
        state.last_face_count = len(faces)
        if faces and "age" in stages:
            faces = timed("age", lambda: model("age").annotate(bgr, faces))
        if "identity" in stages and faces and identity_due:
            state.last_identity_run = meta.capture_time
            faces = timed("identity", lambda: model("identity").embed_faces(bgr, faces))
        return tuple(faces)
