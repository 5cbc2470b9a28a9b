"""Greeter, after Genesis Face Connect: recognise the driver walking up to the parked, locked car, greet them by
name and apply their seat and mirror profile (a vehicle action).

- Approach: while parked and locked, the side cameras (`approach_positions`) run the face stages when a person
  approaches there (box growing), stands at the door (box taller than `at_door_box_height`) or a key fob comes
  into range, until `approach_face_seconds` after the last such sign
  (the switch: `skills.stages.CameraStages`, wired by the service).
- Fusion: a recognised face and the same profile's key fob within `fusion_window_seconds`: greet and apply.
  A face alone greets, and applies only when `face_only_applies_profile`; a fob alone applies when
  `fob_only_applies_profile` (classic key memory).
- Liveness: a face must pass the anti-spoof / liveness check (`service.perception.liveness`); a photo held to the
  camera is refused, and that profile is refused for the rest of the approach (`attempt_window_seconds`).
- Passengers: in the cabin only the face in the driver seat's zone may apply a profile; a recognised passenger
  is greeted (`seat: passenger`), their profile is not applied.
Profiles, enrolment and its quality check: `skills/greeter_profiles.py`.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import numpy as np
import structlog

from incar.v1 import common_pb2, skills_pb2
from service.perception.types import Face, FrameAnalysis
from service.runtime.scheduler import JobClass
from skills.base import (FaceEmbedder, Skill, SkillContext, area, centre, inside, is_moving,
                         narrate, to_pixels)
from skills.config import GreeterConfig
from skills.greeter_profiles import ProfileStore, TemplateCipher  # noqa: F401  (TemplateCipher: public name)

log = structlog.get_logger(__name__)

LivenessCheck = Callable[[np.ndarray, tuple], object]   # (bgr, face box) -> .live, .reason, .antispoof, .liveness
FaceStages = Callable[[str, bool], None]                 # (camera_id, on) -> run the face stages there or not
APPROACH_LOOMING = 0.1    # relative box growth per second that counts as walking up


class Greeter(Skill):
    name = "greeter"

    def __init__(self, ctx: SkillContext, config: GreeterConfig | None = None,
                 face_embedder: FaceEmbedder | None = None, liveness: LivenessCheck | None = None,
                 face_stages: FaceStages | None = None):
        super().__init__(ctx)
        self.config = config or GreeterConfig()
        self.profiles = ProfileStore(ctx.db, self.config, ctx.clock, face_embedder)
        self.liveness, self.face_stages = liveness, face_stages
        self._last_greeted: dict[str, float] = {}
        self._applied: dict[str, float] = {}
        self._faces_seen: dict[str, float] = {}     # profile_id -> when its (live) face was last recognised
        self._refused: dict[str, float] = {}        # profile_id -> refused until (a spoof was shown)
        self._fob: tuple[str, float] | None = None  # the fob in range and since when
        self._side_cameras: set[str] = set()
        self._faces_until = 0.0
        self._faces_on: set[str] = set()
        self._attempts = 0
        self._window_start = 0.0
        self._gave_up = False

    def connect_perception(self, *, liveness: LivenessCheck | None = None, face_stages: FaceStages | None = None):
        """The service's perception: the liveness check, and the switch for the side cameras' face stages."""
        self.liveness, self.face_stages = liveness, face_stages

    @property
    def face_embedder(self) -> FaceEmbedder | None:
        return self.profiles.face_embedder

    # ------------------------------------------------------------------ profiles (public, for the service/tools)
    async def enroll(self, name: str, consent: bool, *, image: np.ndarray | None = None, key_fob_id: str = "",
                     preferences_json: str = "") -> skills_pb2.Profile:
        # Off the event loop (detection, dlib's ~0.3 s descriptor, the commit), so streams and Safety keep flowing;
        # the service's embedder runs dlib in its own process, as dlib holds the GIL.
        profile = await asyncio.to_thread(self.profiles.enroll, name, consent, image=image, key_fob_id=key_fob_id,
                                          preferences_json=preferences_json)
        self.emit("enrolled", common_pb2.SEVERITY_INFO, f"Profile enrolled for {profile.name}",
                  {"profile_id": profile.profile_id, "face": profile.face, "key_fob": bool(key_fob_id),
                   "enrol_yaw": round(profile.enrol_yaw, 3)})
        return profile

    def list_profiles(self) -> list[skills_pb2.Profile]:
        return self.profiles.list()

    def delete_profile(self, profile_id: str) -> None:
        self.profiles.delete(profile_id)
        for table in (self._last_greeted, self._applied, self._faces_seen, self._refused):
            table.pop(profile_id, None)

    def match(self, embedding: np.ndarray) -> tuple[str, str, float] | None:
        return self.profiles.match(embedding)

    # ------------------------------------------------------------------ approach: when the side cameras look
    def _parked_locked(self) -> bool:
        return self.vehicle.locked and not is_moving(self.vehicle)

    def _want_faces(self) -> None:
        """Keep the face stages on the side cameras for `approach_face_seconds` from now."""
        self._faces_until = self.now + self.config.approach_face_seconds
        self._update_stages()

    def _update_stages(self) -> None:
        want = self._side_cameras if self.now < self._faces_until and not is_moving(self.vehicle) else set()
        if self.face_stages is None:
            return
        for camera_id in sorted(want - self._faces_on):
            self.face_stages(camera_id, True)
            log.info("greeter.face_stages", camera_id=camera_id, on=True)
        for camera_id in sorted(self._faces_on - want):
            self.face_stages(camera_id, False)
            log.info("greeter.face_stages", camera_id=camera_id, on=False)
        self._faces_on = set(want)

    async def tick(self) -> None:
        if self._faces_on:
            self._update_stages()

    async def on_vehicle(self, previous, current) -> None:
        fob = current.key_fob_id
        if not fob:
            self._fob = None
        if is_moving(current):
            self._update_stages()
            return
        if fob and fob != previous.key_fob_id:
            self._fob = (fob, self.now)
            if current.locked:
                self._want_faces()      # the owner is near: look for their face on the side cameras
            row = self.profiles.by_fob(fob)
            if row is not None:
                face_recent = self.now - self._faces_seen.get(row["profile_id"], -1e18) \
                    <= self.config.fusion_window_seconds
                method = "face+key_fob" if face_recent else "key_fob"
                self._greet(row["profile_id"], row["name"], method, "", {},
                            apply=face_recent or self.config.fob_only_applies_profile)

    def _someone_coming(self, analysis: FrameAnalysis) -> bool:
        """A person walking up to this side (their box growing) or standing at the door (their box tall)."""
        height = analysis.frame.shape[0] if analysis.frame is not None else 0
        return any(d.label == "person" and (d.looming >= APPROACH_LOOMING or
                                            (height and (d.box[3] - d.box[1])
                                             >= self.config.at_door_box_height * height))
                   for d in analysis.detections)

    # ------------------------------------------------------------------ faces
    async def on_frame(self, analysis: FrameAnalysis) -> None:
        if is_moving(self.vehicle):
            return
        if analysis.role == "exterior" and analysis.position in self.config.approach_positions:
            self._side_cameras.add(analysis.camera_id)
            if self._parked_locked() and self._someone_coming(analysis):
                self._want_faces()
            elif self._faces_on != (self._side_cameras if self.now < self._faces_until else set()):
                self._update_stages()
        faces = [f for f in analysis.faces if f.embedding is not None]
        if not faces:
            return
        now = self.now
        if now - self._window_start > self.config.attempt_window_seconds:
            self._window_start, self._attempts, self._gave_up = now, 0, False
        if self._gave_up:
            return
        with self.measure():
            driver = self._driver_face(analysis, faces)
            found = [(f, m) for f, m in ((f, self.profiles.match(f.embedding)) for f in faces) if m is not None]
        if not found:
            self._attempts += 1
            if self._attempts >= self.config.max_attempts:
                self._gave_up = True
                self.emit("not_recognised", common_pb2.SEVERITY_INFO,
                          f"No enrolled face recognised after {self._attempts} attempts; key fob fallback remains",
                          {"attempts": self._attempts}, camera_id=analysis.camera_id)
            return
        for face, (profile_id, name, distance) in sorted(found, key=lambda fm: fm[1][2]):
            self._recognised(analysis, face, profile_id, name, distance, is_driver=driver is None or face is driver)

    def _driver_face(self, analysis: FrameAnalysis, faces: list[Face]) -> Face | None:
        """In a cabin frame, the face in the driver seat's zone (largest if several); None outside the cabin."""
        zone = self.config.driver_seat_zones.get(analysis.position)
        if analysis.role != "cabin" or zone is None:
            return None
        region = to_pixels(tuple(zone), analysis.frame)
        seated = [f for f in faces if inside(centre(f.box), region)]
        return max(seated, key=lambda f: area(f.box)) if seated else Face(box=(0, 0, 0, 0), score=0.0)

    def _recognised(self, analysis: FrameAnalysis, face: Face, profile_id: str, name: str, distance: float,
                    is_driver: bool) -> None:
        now = self.now
        if now < self._refused.get(profile_id, -1e18):
            return
        extra = {"distance": round(distance, 4), "camera_role": analysis.role}
        live = None
        if self.liveness is not None:
            result = self.liveness(analysis.frame, face.box)
            extra.update(antispoof=round(float(result.antispoof), 3), liveness=round(float(result.liveness), 3))
            if not result.live:
                self._refused[profile_id] = now + self.config.attempt_window_seconds
                self.emit("spoof_refused", common_pb2.SEVERITY_WARNING,
                          f"A face shown to the {analysis.position} camera was refused: {result.reason}",
                          {"profile_id": profile_id, "reason": result.reason, **extra}, camera_id=analysis.camera_id)
                return
            live = True
        elif self.config.require_liveness:
            extra["liveness"] = "unchecked"     # no liveness model loaded: greet, never apply on a face
        if not is_driver:   # greeted by name, but the seat and mirrors stay the driver's
            self._greet(profile_id, name, "face", analysis.camera_id, {**extra, "seat": "passenger"}, apply=False)
            return
        if live or not self.config.require_liveness:
            self._faces_seen[profile_id] = now
        fob_row = self.profiles.by_fob(self._fob[0]) if self._fob else None
        with_fob = fob_row is not None and fob_row["profile_id"] == profile_id
        verified = live or not self.config.require_liveness
        apply = verified and (with_fob or self.config.face_only_applies_profile)
        self._greet(profile_id, name, "face+key_fob" if with_fob else "face", analysis.camera_id, extra, apply=apply)

    def _greet(self, profile_id: str, name: str, method: str, camera_id: str, extra: dict, *, apply: bool) -> None:
        """Decide now (cool-down, attempts); word the greeting in the background. A later sign that allows the
        profile (the fob after the face) applies it without a second greeting."""
        now = self.now
        last = self._last_greeted.get(profile_id)
        greeted = last is not None and now - last < self.config.greet_cooldown_seconds
        applied = now - self._applied.get(profile_id, -1e18) < self.config.greet_cooldown_seconds
        if greeted and (applied or not apply):
            return
        if not greeted:
            self._last_greeted[profile_id] = now
        if apply:
            self._applied[profile_id] = now
        self._attempts, self._gave_up = 0, False
        self.spawn(self._say_welcome(profile_id, name, method, camera_id, extra, greet=not greeted, apply=apply))

    async def _say_welcome(self, profile_id: str, name: str, method: str, camera_id: str, extra: dict, *,
                           greet: bool, apply: bool) -> None:
        if greet:
            words = await narrate(self.ctx.narrator, task="You are the car, greeting its driver who walks up.",
                                  draft=f"Welcome back, {name}!", priority=JobClass.INTERACTIVE, must_keep=(name,),
                                  max_tokens=32)
            self.emit("greeting", common_pb2.SEVERITY_INFO, words,
                      {"profile_id": profile_id, "method": method, "applies_profile": apply, **extra},
                      camera_id=camera_id)
        if not apply:
            return
        preferences = self.profiles.preferences(profile_id)
        event = self.emit("profile_apply", common_pb2.SEVERITY_INFO, f"Applying {name}'s presets",
                          {"profile_id": profile_id, "preferences": preferences, "method": method},
                          camera_id=camera_id)
        self.act("seat_mirror_profile", reason=f"{name} recognised ({method})", cause_event=event, target="driver",
                 parameters={"profile_id": profile_id, "preferences_json": json.dumps(preferences)},
                 key=f"greeter:{profile_id}:{event.cursor}")


def cascade_liveness(models_dir=None, backend: str = "cpu") -> LivenessCheck | None:
    """The liveness check on the built anti-spoof and liveness models, or None when they are not built (then a
    face greets but never applies a profile while `require_liveness` is on)."""
    from service.perception.liveness import FaceLiveness
    from service.perception.models import model_path
    variant = "float" if backend == "cpu" else "qdq"
    paths = [model_path(name, variant, models_dir) for name in ("antispoof", "liveness")]
    if not all(p.is_file() for p in paths):
        log.warning("greeter.liveness_unavailable", missing=[str(p) for p in paths if not p.is_file()])
        return None
    return FaceLiveness(*paths, backend, disable_cpu_fallback=backend != "cpu").check


__all__ = ["Greeter", "TemplateCipher", "cascade_liveness"]
