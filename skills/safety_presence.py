"""Who is in the cabin, per seat zone, judged over the frames the detectors actually analysed.

A cue is a COCO person, a face, a body (pose) or small motion in a seat zone; pets (COCO cat/dog) are kept
apart; a face's estimated age makes the occupant a child, an adult or "not sure". A zone is occupied when
`child_confirm_frames` of its camera's last `child_confirm_window` evidence frames had a cue there. Frames on
which the cascade gated the detectors (nothing moved) are no evidence either way: a still, sleeping child is
found on the frames the detectors did analyse, and the count does not reset on the frames in between.

Not verified: the child side of the age estimate. The repository's photos (deploy/sim/images) show adults
only, and no openly licensed photo of a child is in any package installed here; the tests check that the
adults in them are estimated adults (tests/skills/test_safety.py, tests/perception/test_perception_cascade.py),
and the child threshold (`child_age_years`) is checked on stated ages only.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from service.perception.types import FrameAnalysis
from skills.base import area, centre, inside, overlap, to_pixels
from skills.safety_config import SafetyConfig

DETECTOR_STAGES = {"faces", "objects", "pose"}


@dataclass
class ZoneCues:
    cues: set[str] = field(default_factory=set)      # person, face, pose, motion
    ages: list[float] = field(default_factory=list)  # estimated face ages in this zone
    pets: set[str] = field(default_factory=set)      # dog, cat
    items: set[str] = field(default_factory=set)     # bags, phones (items left behind)


def zone_of(box, zones: dict[str, tuple[float, float, float, float]]) -> str:
    """The seat zone holding the box's centre (the largest overlap when several do), else "cabin"."""
    c = centre(box)
    holding = [(overlap(box, z), seat) for seat, z in zones.items() if inside(c, z)]
    return max(holding)[1] if holding else "cabin"


def observe(analysis: FrameAnalysis, cfg: SafetyConfig) -> dict[str, ZoneCues] | None:
    """This frame's cues per zone, or None when the frame is no evidence (detectors gated, nothing moved)."""
    frame = analysis.frame
    zones = {seat: to_pixels(tuple(box), frame)
             for seat, box in cfg.seat_zones.get(analysis.position, {}).items()}
    if not zones:   # a cabin camera at a position without configured seats: the whole frame is one zone
        h, w = frame.shape[:2]
        zones = {"cabin": (0.0, 0.0, float(w), float(h))}
    out: dict[str, ZoneCues] = {}

    def at(box) -> ZoneCues:
        return out.setdefault(zone_of(box, zones), ZoneCues())

    detected = bool(DETECTOR_STAGES & set(analysis.stages_run))
    for d in analysis.detections:
        if d.label == "person" and d.score >= cfg.presence_min_score:
            at(d.box).cues.add("person")
        elif d.label in cfg.pet_labels and d.score >= cfg.presence_min_score:
            at(d.box).pets.add(d.label)
        elif d.label in cfg.item_labels and d.score >= cfg.item_min_score:
            at(d.box).items.add(d.label)
    for face in analysis.faces:
        if face.score >= cfg.presence_min_score:
            cues = at(face.box)
            cues.cues.add("face")
            if face.age is not None:
                cues.ages.append(face.age)
    for pose in analysis.poses:
        confident = [(x, y) for x, y, s in pose.keypoints if s >= cfg.presence_min_score]
        if pose.score >= cfg.presence_min_score and len(confident) >= cfg.pose_min_keypoints:
            at(pose.box).cues.add("pose")
    moved = False
    if analysis.motion is not None and analysis.motion.regions:
        for seat, z in zones.items():
            share = min(1.0, sum(overlap(r, z) for r in analysis.motion.regions) / max(area(z), 1.0))
            if share >= cfg.seat_motion_fraction:
                out.setdefault(seat, ZoneCues()).cues.add("motion")
                moved = True
    if not detected and not moved:
        return None
    return out


def estimate(ages: list[float], cfg: SafetyConfig) -> str:
    """child | adult | uncertain (an age between the thresholds) | unknown (no face seen)."""
    if not ages:
        return "unknown"
    youngest = min(ages)
    if youngest < cfg.child_age_years:
        return "child"
    return "adult" if youngest >= cfg.adult_age_years else "uncertain"


@dataclass
class Occupant:
    camera_id: str
    zone: str
    kind: str                   # person | pet
    estimate: str               # child | adult | uncertain | unknown (people); the animal (pets)
    cues: list[str]
    age: float | None = None

    def as_dict(self) -> dict:
        out = {"camera_id": self.camera_id, "seat": self.zone, "kind": self.kind, "estimate": self.estimate,
               "cues": self.cues}
        if self.age is not None:
            out["age"] = round(self.age, 1)
        return out


class PresenceTracker:
    """Rolling evidence per (camera, zone); `confirmed()` lists the occupants that passed confirmation."""

    def __init__(self, cfg: SafetyConfig):
        self.cfg = cfg
        self._frames: dict[str, deque[dict[str, ZoneCues]]] = {}

    def reset(self) -> None:
        self._frames.clear()

    def add(self, analysis: FrameAnalysis) -> bool:
        """Take one analysed cabin frame; False when it was no evidence."""
        cues = observe(analysis, self.cfg)
        if cues is None:
            return False
        window = self._frames.setdefault(analysis.camera_id, deque(maxlen=self.cfg.child_confirm_window))
        window.append(cues)
        return True

    def confirmed(self) -> list[Occupant]:
        need = self.cfg.child_confirm_frames
        found: list[Occupant] = []
        for camera_id, window in self._frames.items():
            zones = {z for frame in window for z in frame}
            for zone in sorted(zones):
                seen = [frame[zone] for frame in window if zone in frame]
                people = [c for c in seen if c.cues]
                if len(people) >= need:
                    ages = [a for c in people for a in c.ages]
                    cues = sorted({cue for c in people for cue in c.cues})
                    found.append(Occupant(camera_id, zone, "person", estimate(ages, self.cfg), cues,
                                          min(ages) if ages else None))
                pets = [c for c in seen if c.pets]
                if len(pets) >= need:
                    animal = sorted({p for c in pets for p in c.pets})
                    found.append(Occupant(camera_id, zone, "pet", "/".join(animal), ["object"]))
        return found

    def items(self) -> dict[tuple[str, str], str]:
        """(seat, item) -> camera id, for items seen on `item_confirm_frames` of a camera's evidence frames."""
        out: dict[tuple[str, str], str] = {}
        for camera_id, window in self._frames.items():
            counts: dict[tuple[str, str], int] = {}
            for frame in window:
                for zone, cues in frame.items():
                    for item in cues.items:
                        counts[(zone, item)] = counts.get((zone, item), 0) + 1
            for key, n in counts.items():
                if n >= self.cfg.item_confirm_frames:
                    out.setdefault(key, camera_id)
        return out
