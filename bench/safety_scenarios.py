"""Safe-exit scenario set for bench/safety.py: tracked boxes from a pinhole camera, fed to the real Safety skill.

Approaches: bicycles, motorcycles and cars closing from 30 m at 12-60 km/h in the door's path, seen by the side
camera of that door or by the rear camera, each box jittered by 3 % of its size per frame (a detector's wobble).
Parked: cars standing 2.5-15 m behind an opening door, same jitter, 30 s each. Also riders going away.
A warning must come for every approach while the time to collision is still above `min_warning_ttc_s`; none
may come for a parked car or a receding one.
"""
from __future__ import annotations

import asyncio
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FPS = 15.0
FOCAL_PX = 480 / (2 * math.tan(math.radians(60) / 2))   # 640x480 frames, 60 degree vertical field of view
HEIGHTS_M = {"bicycle": 1.7, "motorcycle": 1.4, "car": 1.5}
ASPECT = {"bicycle": 1.4, "motorcycle": 1.6, "car": 2.4}   # box width / height seen from behind-ish


@dataclass
class Scenario:
    name: str
    position: str          # camera: left | right | rear
    side: str              # the door side armed (handle pulled)
    label: str
    speed_kmh: float       # closing speed; 0 = parked; < 0 = going away
    start_m: float
    lane_x: float          # box centre, share of frame width
    seconds: float


def scenario_set() -> tuple[list[Scenario], list[Scenario]]:
    approaches, quiet = [], []
    for label, speeds in (("bicycle", (12, 20, 30)), ("motorcycle", (30, 50)), ("car", (20, 40, 60))):
        for speed in speeds:
            approaches.append(Scenario(f"{label}-{speed}-left", "left", "left", label, speed, 30, 0.5, 0))
            approaches.append(Scenario(f"{label}-{speed}-right", "right", "right", label, speed, 30, 0.5, 0))
            approaches.append(Scenario(f"{label}-{speed}-rear-right", "rear", "right", label, speed, 30, 0.22, 0))
    for distance in (2.5, 4.0, 7.0, 10.0, 15.0):
        for position, side, lane in (("left", "left", 0.5), ("right", "right", 0.5), ("rear", "left", 0.78)):
            quiet.append(Scenario(f"parked-{distance}m-{position}", position, side, "car", 0, distance, lane, 30))
    for label in ("bicycle", "car"):
        quiet.append(Scenario(f"{label}-going-away", "left", "left", label, -20, 3, 0.5, 6))
    return approaches, quiet


def boxes_of(s: Scenario, rng: np.random.Generator, jitter: float) -> list[tuple[float, tuple, float]]:
    """(t, box, true distance) per frame; approaches run until 1.2 m."""
    out, t = [], 0.0
    v = s.speed_kmh / 3.6
    while True:
        z = s.start_m - v * t
        if (v > 0 and z < 1.2) or (v <= 0 and t > s.seconds):
            return out
        h = min(470.0, FOCAL_PX * HEIGHTS_M[s.label] / max(z, 0.3))
        w = h * ASPECT[s.label]
        cx, bottom = s.lane_x * 640, 470.0
        box = [cx - w / 2, bottom - h, cx + w / 2, bottom]
        noise = rng.normal(0.0, jitter, 4) * np.array([w, h, w, h])
        out.append((t, tuple(float(c + n) for c, n in zip(box, noise)), z))
        t += 1 / FPS


def run_scenarios(min_warning_ttc_s: float = 0.8, jitter: float = 0.03, seed: int = 11, **safety) -> dict:
    """`safety`: SafetyConfig fields to override (tuning runs)."""
    return asyncio.run(_run(min_warning_ttc_s, jitter, seed, safety))


async def _run(min_warning_ttc_s: float, jitter: float, seed: int, safety: dict) -> dict:
    from incar.v1 import vehicle_pb2
    from service.actions import ActionQueue
    from service.perception.types import Detection, FrameAnalysis
    from service.store.db import Database
    from service.store.events import EventLog
    from skills.base import SkillContext, TemplateNarrator
    from skills.config import SkillsConfig
    from skills.services import SkillHost

    rng = np.random.default_rng(seed)
    approaches, quiet = scenario_set()
    blank = np.zeros((480, 640, 3), np.uint8)
    door = {"left": vehicle_pb2.DOOR_ID_FRONT_LEFT, "right": vehicle_pb2.DOOR_ID_FRONT_RIGHT}
    results = {"missed": [], "late": [], "false": [], "warn_ttc": []}
    clock = [1_790_000_000.0]
    with tempfile.TemporaryDirectory() as tmp:
        for s in approaches + quiet:
            db = Database(Path(tmp) / f"{s.name}.db")
            events = EventLog(db, clock=lambda: clock[0])
            actions = ActionQueue(db, clock=lambda: clock[0])
            ctx = SkillContext(db=db, events=events, narrator=TemplateNarrator(), data_dir=Path(tmp) / s.name,
                               clock=lambda: clock[0], actions=actions)
            config = SkillsConfig()
            config.tick_seconds = 3600.0
            for key, value in safety.items():
                setattr(config.safety, key, value)
            host = SkillHost(ctx, config)
            db.migrate()
            await host.start(vehicle_pb2.VehicleState())
            state = vehicle_pb2.VehicleState(gear=vehicle_pb2.GEAR_PARK)
            state.doors.add(door=door[s.side], handle_pulled=True)
            await host.on_vehicle(vehicle_pb2.VehicleState(), state)
            start, warned_at = clock[0], None
            for t, box, z in boxes_of(s, rng, jitter):
                clock[0] = start + t
                before = len(events.after(0, 10_000))
                await host.on_analysis(FrameAnalysis(f"ext-{s.position}", "exterior", s.position, clock[0], blank,
                                                     detections=(Detection(s.label, 0.8, box, track_id=1),),
                                                     stages_run=("motion", "objects")))
                new = [e for e in events.after(0, 10_000)[before:] if e.kind == "safety.safe_exit_warning"]
                if new and warned_at is None:
                    warned_at = (t, z)
            await host.stop()
            db.close()
            clock[0] += 3600
            if s.speed_kmh > 0:
                if warned_at is None:
                    results["missed"].append(s.name)
                else:
                    ttc = warned_at[1] / (s.speed_kmh / 3.6)
                    results["warn_ttc"].append(ttc)
                    if ttc < min_warning_ttc_s:
                        results["late"].append(s.name)
            elif warned_at is not None:
                results["false"].append(s.name)
    return {"approaches": len(approaches), "quiet_scenarios": len(quiet), **results}
