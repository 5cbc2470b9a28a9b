"""The one interface every skill implements, and what skills share.

A skill takes three inputs — perception results (`FrameAnalysis`), the vehicle state (protobuf) and a clock — and
produces two outputs: durable events (through an `EventLog`-like sink) and answers (through its gRPC service).
Wording is the model's job (`Narrator.complete`, which `GenerationEngine` satisfies); facts are the skill's.
"""
from __future__ import annotations

import asyncio
import re
import time
from abc import ABC
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog
from prometheus_client import Histogram

from incar.v1 import common_pb2, vehicle_pb2
from service.perception.types import Face, FrameAnalysis, TextLine
# The errors a skill raises for its caller (each carries its gRPC status; services abort with it).
from service.rpc_errors import InvalidRequestError, NotFoundError, PreconditionError  # noqa: F401
from service.store.db import Database
from service.vehicle import MOVING_KMH, is_moving  # noqa: F401  (skills import them from here)

log = structlog.get_logger(__name__)

SKILL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)
SKILL_LATENCY = Histogram("incar_skill_latency_seconds", "Time a skill takes to decide on one input",
                          ["skill"], buckets=SKILL_BUCKETS)


class Narrator(Protocol):
    """What skills need from the language model; `service.runtime.engine.GenerationEngine` satisfies it."""

    async def complete(self, prompt: str, *, priority: str, max_tokens: int = 64, json_schema: str | None = None,
                       images: Sequence[np.ndarray] = (), system: str | None = None) -> str: ...


class EventSink(Protocol):
    """`service.store.events.EventLog` satisfies it: committed before it returns, then streamed."""

    def append(self, kind: str, skill: str, severity: int, message: str, payload: dict | None = None,
               camera_id: str = "", attachment_ids: Sequence[str] = ()) -> common_pb2.Event: ...


class ActionSink(Protocol):
    """`service.actions.queue.ActionQueue` satisfies it: the action is committed before it returns, then streamed to
    the vehicle gateway (docs/actions.md). Kinds: horn, hazard_lights, headlight_flash, door_lock_hold, child_lock,
    window_vent, climate_on, emergency_call, owner_notification, seat_mirror_profile."""

    def request(self, kind: str, *, reason: str, cause_event: common_pb2.Event | int | None = None,
                priority: str | None = None, expiry_s: float | None = None, target: str | None = None,
                parameters: dict | None = None, key: str = "", requested_by: str = "") -> Any: ...

    def cancel(self, action_id: str, reason: str = "") -> Any: ...


class FrameSource(Protocol):
    """The camera ring buffers (`service.cameras.hub.CameraHub` satisfies it). Frames carry `camera_id`,
    `capture_time` (epoch s) and `original` (BGR as received)."""

    def latest(self, camera_id: str) -> Any | None: ...

    def history(self, camera_id: str, seconds: float) -> list[Any]: ...

    def camera_ids(self) -> list[str]: ...


FaceEmbedder = Callable[[np.ndarray], list[Face]]     # BGR image -> faces with `embedding` set
SignReader = Callable[[np.ndarray], list[TextLine]]   # BGR image -> OCR lines


MESSAGE_MARK = "Message:"
_PROMPT_ECHO = ("Message:", "Facts:", "Rewrite the message")


def narration_request(task: str, draft: str) -> tuple[str, str]:
    """(system, prompt) for having the model word a message. The skill writes the draft with every fact in it; the
    model only rewords it. Small models keep facts far better this way than when asked to compose from a fact
    list (measured with SmolLM2-135M: the fact-list form dropped the bay or echoed the prompt)."""
    system = (f"{task} Rewrite the message below for the driver as one short, friendly sentence. "
              "Keep every name, number and code exactly as written; add nothing.")
    return system, f"{MESSAGE_MARK} {draft}"


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def accept_words(words: str, draft: str, must_keep: Sequence[str] = ()) -> str:
    """The model's words when they are a usable sentence that keeps `must_keep` and exactly the draft's numbers
    (a distance, a bay, a time: none dropped, none invented); otherwise the draft."""
    text = words.strip().split("\n\n")[0].strip()
    if (not text or any(mark in text for mark in _PROMPT_ECHO) or len(text) > 3 * len(draft) + 80
            or any(k.lower() not in text.lower() for k in must_keep if k)
            or set(_NUMBER.findall(text)) != set(_NUMBER.findall(draft))):
        return draft
    return text


async def narrate(narrator: Narrator, *, task: str, draft: str, priority: str, must_keep: Sequence[str] = (),
                  images: Sequence[np.ndarray] = (), max_tokens: int = 48, timeout_s: float | None = None) -> str:
    """Word `draft` through the model at `priority`; falls back to the draft when the words are unusable, or
    when they take longer than `timeout_s` (the generation is cancelled: the words must not hold up an alert)."""
    system, prompt = narration_request(task, draft)
    try:
        words = await asyncio.wait_for(narrator.complete(prompt, priority=priority, max_tokens=max_tokens,
                                                         images=images, system=system), timeout_s)
    except TimeoutError:
        log.warning("narration.timeout", priority=priority, timeout_s=timeout_s)
        return draft
    return accept_words(words, draft, must_keep)


class TemplateNarrator:
    """The documented fallback while no model is loaded (or in tests without a bundle): says the draft verbatim.

    Deterministic, instant, and it cannot invent facts. The service swaps in the real engine once it is ready.
    """

    name = "template"

    async def complete(self, prompt: str, *, priority: str, max_tokens: int = 64, json_schema: str | None = None,
                       images: Sequence[np.ndarray] = (), system: str | None = None) -> str:
        for line in reversed(prompt.splitlines()):
            if line.startswith(MESSAGE_MARK):
                return line[len(MESSAGE_MARK):].strip()
        return prompt.strip().splitlines()[-1] if prompt.strip() else ""


class SwitchableNarrator:
    """Starts on the template narrator and switches to the model when the engine is ready (`use(engine)`)."""

    def __init__(self, fallback: Narrator | None = None):
        self._fallback = fallback or TemplateNarrator()
        self._model: Narrator | None = None

    def use(self, model: Narrator | None) -> None:
        self._model = model

    async def complete(self, prompt: str, *, priority: str, max_tokens: int = 64, json_schema: str | None = None,
                       images: Sequence[np.ndarray] = (), system: str | None = None) -> str:
        model = self._model
        if model is not None:
            try:
                text = await model.complete(prompt, priority=priority, max_tokens=max_tokens,
                                            json_schema=json_schema, images=images, system=system)
                if text.strip():
                    return text.strip()
            except Exception as exc:   # a model failure must not swallow an alarm: the facts still go out
                log.warning("narrator.model_failed", priority=priority, error=str(exc))
        return await self._fallback.complete(prompt, priority=priority, max_tokens=max_tokens,
                                             json_schema=json_schema, images=images, system=system)


# ------------------------------------------------------------------ vehicle helpers
def is_parked_off(state: vehicle_pb2.VehicleState) -> bool:
    return (state.gear == vehicle_pb2.GEAR_PARK and state.ignition == vehicle_pb2.IGNITION_OFF
            and state.speed_kmh < MOVING_KMH)


# ------------------------------------------------------------------ geometry shared by the skills
NormBox = tuple[float, float, float, float]   # x1, y1, x2, y2 as fractions of the frame


def to_pixels(box: NormBox, frame: np.ndarray) -> tuple[float, float, float, float]:
    h, w = frame.shape[:2]
    return box[0] * w, box[1] * h, box[2] * w, box[3] * h


def area(box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def overlap(a, b) -> float:
    """Area of the intersection of two boxes."""
    return area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def inside(point: tuple[float, float], box) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def validate_norm_boxes(key: str, boxes) -> None:
    for i, box in enumerate(boxes):
        if len(box) != 4 or not all(0.0 <= v <= 1.0 for v in box) or box[0] >= box[2] or box[1] >= box[3]:
            raise ValueError(f"{key}[{i}]: expected x1<x2, y1<y2 as frame fractions in 0..1, got {box!r}")


# ------------------------------------------------------------------ the skill interface
@dataclass
class SkillContext:
    """What every skill gets at construction."""
    db: Database
    events: EventSink
    narrator: Narrator
    data_dir: Path
    clock: Callable[[], float] = time.time
    frames: FrameSource | None = None
    # Told every measured latency (skill, seconds); returns True when it was over the skill's budget. The budgets
    # (power.budgets.latency_seconds) and their one violation counter live with the power manager.
    latency_observer: Callable[[str, float], bool] | None = None
    # The skill's latency budget in seconds (the same table), for what a skill reports with its events.
    latency_budget: Callable[[str], float] | None = None
    # Vehicle actions out (horn, door-lock hold, owner notification, ...); None where nothing can act (tests).
    actions: ActionSink | None = None


class Skill(ABC):
    """One skill: reacts to perception results and vehicle-state changes, keeps its own timers, emits events.

    Subclasses set `name`, and override what they need of `on_frame`, `on_vehicle` and `tick`.
    The host calls these from one asyncio loop, so a skill's state needs no locks.
    """

    name: str = ""

    def __init__(self, ctx: SkillContext):
        self.ctx = ctx
        self.vehicle = vehicle_pb2.VehicleState()
        self._background: set[asyncio.Task] = set()

    def spawn(self, coro) -> asyncio.Task:
        """Run slow follow-up work (model wording, OCR, clip encoding) off the input path: the host feeds every
        skill in order, and a safe-exit warning must not wait behind a greeting being worded."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("skill.background_failed", skill=self.name, error=repr(exc),
                      exc_info=(type(exc), exc, exc.__traceback__))

    async def drain(self) -> None:
        """Wait for background work to finish (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    @property
    def now(self) -> float:
        return self.ctx.clock()

    async def on_frame(self, analysis: FrameAnalysis) -> None:
        """One analysed camera frame."""

    async def on_vehicle(self, previous: vehicle_pb2.VehicleState, current: vehicle_pb2.VehicleState) -> None:
        """A new vehicle-state snapshot (the host has already stored it in `self.vehicle`)."""

    async def tick(self) -> None:
        """Called periodically (and after every input) for timers: cool-downs, escalations."""

    def emit(self, kind: str, severity: int, message: str, payload: dict | None = None, camera_id: str = "",
             attachment_ids: Sequence[str] = ()) -> common_pb2.Event:
        event = self.ctx.events.append(f"{self.name}.{kind}", self.name, severity, message, payload,
                                       camera_id=camera_id, attachment_ids=attachment_ids)
        log.info("skill.event", skill=self.name, kind=event.kind, cursor=event.cursor, camera_id=camera_id or None)
        return event

    def act(self, kind: str, *, reason: str, **options):
        """Ask the car to do something (`ActionSink.request`, with this skill as the requester); returns the
        committed action, or None when this context has no action queue (logged: the event still tells the HMI)."""
        if self.ctx.actions is None:
            log.warning("skill.no_action_queue", skill=self.name, kind=kind, reason=reason)
            return None
        return self.ctx.actions.request(kind, reason=reason, requested_by=self.name, **options)

    @contextmanager
    def measure(self):
        """Record how long a decision took (it counts against the skill's latency budget)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.record_latency(time.perf_counter() - started)

    def record_latency(self, seconds: float) -> bool:
        """Report a latency to the budgets; returns True when within the skill's budget."""
        SKILL_LATENCY.labels(self.name).observe(seconds)
        if self.ctx.latency_observer is None:
            return True
        return not self.ctx.latency_observer(self.name, seconds)

    def latency_budget(self) -> float | None:
        """This skill's latency budget (power.budgets.latency_seconds), None where no budgets are wired."""
        return self.ctx.latency_budget(self.name) if self.ctx.latency_budget is not None else None


def words(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
