"""Skills bench: scenario figures over composited real photos, through the real perception models.

Sentinel (the left camera at 5 fps through the cascade: NanoDet + tracker + MoveNet pose): two passers-by in a
row, a person lingering, a hand at the rear door handle, a glass-break signal. Greeter (BlazeFace + dlib + the
anti-spoof/liveness models): the enrolled driver walking up, and a printed photo of her held up. Car Finder
(PP-OCR): driving into a garage past a level and a row sign to a bay without a readable sign.
Counted: alerts, alarms, greetings, answers, false alarms (an event that should not have happened) and misses.
Sentinel's scenarios also run with the composited boxes handed to the skill (with MoveNet's poses of the same
frames): that separates the skill's own logic from the object detector's misses on composited people.
The baseline, on the same frames and detections: the rules before issue 17 (box height and one timer per camera,
a person box over a fixed handle rectangle, no intrusion inputs, no liveness check, signs read only at the bay).

    .venv/bin/python bench/skills.py [--fps 5]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from incar.v1 import vehicle_pb2  # noqa: E402
from service.cameras.ring import CameraFrame  # noqa: E402
from service.perception.cascade import Cascade, PerceptionConfig  # noqa: E402
from service.store.db import Database  # noqa: E402
from service.store.events import EventLog  # noqa: E402
from skills.base import SkillContext, TemplateNarrator, area, overlap, to_pixels  # noqa: E402
from skills.config import SkillsConfig  # noqa: E402
from skills.sentinel_watch import distance_m  # noqa: E402
from skills.services import SkillHost  # noqa: E402
from tests.skills.conftest import PROFILE_KEY, FakeClock, vehicle  # noqa: E402
from tests.skills.scenes import background  # noqa: E402
from tests.skills.sentinel_scenes import SIDE, frame_analysis, scene  # noqa: E402


@dataclass
class Tally:
    alerts: int = 0
    alarms: int = 0
    greetings: int = 0
    answers: int = 0
    false_alarms: int = 0
    missed: int = 0
    rows: list = field(default_factory=list)

    def score(self, scenario: str, expected: str, got: dict[str, int], baseline: dict[str, int]) -> None:
        for key in ("alerts", "alarms", "greetings", "answers"):
            setattr(self, key, getattr(self, key) + got.get(key, 0))
        hit = got.get(expected, 0) > 0 if expected else False
        false = sum(v for k, v in got.items() if k != expected) + (0 if expected else 0)
        self.false_alarms += false
        self.missed += int(bool(expected) and not hit)
        b_hit = baseline.get(expected, 0) > 0 if expected else False
        b_false = sum(v for k, v in baseline.items() if k != expected)
        self.rows.append((scenario, expected or "nothing", got, baseline, int(bool(expected) and not hit), false,
                          int(bool(expected) and not b_hit), b_false))


class Harness:
    def __init__(self, config: SkillsConfig, **host_kw):
        self.tmp = tempfile.TemporaryDirectory()
        self.clock = FakeClock()
        self.db = Database(Path(self.tmp.name) / "incar.db")
        self.events = EventLog(self.db, clock=self.clock)
        from service.actions import ActionQueue
        self.actions = ActionQueue(self.db, clock=self.clock)
        ctx = SkillContext(db=self.db, events=self.events, narrator=TemplateNarrator(),
                           data_dir=Path(self.tmp.name) / "skills", clock=self.clock, actions=self.actions)
        self.host = SkillHost(ctx, config, **host_kw)
        self.db.migrate()
        self.state = vehicle()

    async def start(self):
        await self.host.start(self.state)

    async def set_vehicle(self, state):
        previous, self.state = self.state, state
        await self.host.on_vehicle(previous, state)
        await self.host.drain()

    def count(self, prefix: str) -> int:
        return len([e for e in self.events.after(0, 100000) if e.kind.startswith(prefix)])

    async def close(self):
        await self.host.stop()
        self.db.close()
        self.tmp.cleanup()


class NaiveSentinel:
    """The rules before issue 17: near = box height >= 35 % of the frame, one dwell timer per camera (a frame
    without anyone near resets it), Alarm = a person box over >= 50 % of a handle rectangle on 3 frames."""

    def __init__(self, config):
        self.cfg, self.near_since, self.handle_frames = config, None, 0
        self.alerts = self.alarms = 0

    def frame(self, analysis) -> None:
        h = analysis.frame.shape[0]
        people = [d for d in analysis.detections if d.label == "person" and d.score >= self.cfg.person_min_score]
        near = any((d.box[3] - d.box[1]) / h >= 0.35 for d in people)
        zones = [to_pixels(z, analysis.frame) for z in self.cfg.door_handle_zones.get(analysis.position, [])]
        handle = any(overlap(d.box, z) >= 0.5 * area(z) for d in people for z in zones)
        self.near_since = (self.near_since or analysis.timestamp) if near else None
        self.handle_frames = self.handle_frames + 1 if handle else 0
        if self.handle_frames == 3:
            self.alarms += 1
        if self.near_since is not None and analysis.timestamp - self.near_since >= 5.0 and self.alerts == 0:
            self.alerts += 1


async def sentinel_scenarios(cascade: Cascade, fps: float, tally: Tally, errors: list[float],
                             boxes: str = "detector") -> int:
    """`boxes`: "detector" runs the cascade (NanoDet, tracker, pose); "scene" hands the skill the composited
    boxes with MoveNet's poses of the same frames (the skill's own logic, without the detector's misses)."""
    frames_run = 0
    handle_zone = SkillsConfig().sentinel.door_handle_zones["left"][1]
    handle_xy = ((handle_zone[0] + handle_zone[2]) / 2 * 640, (handle_zone[1] + handle_zone[3]) / 2 * 480)
    lateral = wrist_lateral(cascade, 1.6, handle_xy)
    n = lambda seconds: int(round(seconds * fps))   # noqa: E731
    scenarios = [
        ("passers-by", "", [[(3.0, -2.0 + 4.0 * i / n(4))] for i in range(n(4))] + [[]] * n(1)
         + [[(3.2, 2.0 - 4.0 * i / n(4))] for i in range(n(4))]),
        # People who stand still still shift their weight: a few centimetres of sway (the motion gate sees it).
        ("lingering", "alerts", [[(3.0, -0.3 + 0.08 * ((i % 4) - 1.5))] for i in range(n(8))]),
        ("hand at the door handle", "alarms", [[(1.6, lateral + 0.03 * ((i % 2) - 0.5))] for i in range(n(3))]),
    ]
    detector_frames, scores = {}, {}
    for name, expected, script in scenarios:
        config = SkillsConfig()
        h = Harness(config)
        await h.start()
        await h.set_vehicle(vehicle(locked=True))
        naive = NaiveSentinel(config.sentinel)
        camera = f"ext-left-{boxes}-{name.replace(' ', '-')}"
        cascade.set_stages(camera, ("motion", "objects", "pose"))
        for i, people in enumerate(script):
            t = h.clock.advance(1 / fps)
            frame, truth = scene(people, seed=i)
            if boxes == "detector":
                analysis = cascade.analyze(frame, CameraFrame(camera, "exterior", "left", t, t, frame, frame))
            else:
                poses = cascade.model("pose").estimate(frame) if truth else []
                analysis = frame_analysis(camera, "left", t, frame, truth, poses, stages=("motion", "objects", "pose"))
            frames_run += 1
            detector_frames[name] = detector_frames.get(name, 0) + int("objects" in analysis.stages_run)
            for det in analysis.detections:
                if det.label == "person":
                    scores.setdefault(name, []).append(round(det.score, 2))
                if det.label == "person" and truth:
                    d = distance_m(det.box, 480, SIDE, 1.7)
                    errors.append(abs(d - people[0][0]))
            await h.host.on_analysis(analysis)
            naive.frame(analysis)
        await h.host.drain()
        got = {"alerts": h.count("sentinel.alert"), "alarms": h.count("sentinel.alarm")}
        tally.score(f"{name} ({boxes} boxes)", expected, got, {"alerts": naive.alerts, "alarms": naive.alarms})
        await h.close()
    for name, count in detector_frames.items():
        print(f"  {name} ({boxes} boxes): detector ran on {count} frames; person scores {scores.get(name, [])[:12]}")
    if boxes != "detector":
        return frames_run
    h = Harness(SkillsConfig())
    await h.start()
    await h.set_vehicle(vehicle(locked=True))
    broken = vehicle(locked=True)
    broken.intrusion.glass_break = True
    await h.set_vehicle(broken)
    tally.score("glass-break signal", "alarms", {"alerts": h.count("sentinel.alert"),
                                                  "alarms": h.count("sentinel.alarm")}, {})
    await h.close()
    return frames_run


def wrist_lateral(cascade: Cascade, distance: float, target) -> float:
    """Where a person standing `distance` away must stand sideways so that MoveNet puts a wrist at `target`:
    the scene is built the way a person stands at the door with a hand on the handle."""
    best, best_err = 0.0, float("inf")
    for lateral in [x / 20 for x in range(-20, 21)]:
        frame, _ = scene([(distance, lateral)])
        for pose in cascade.model("pose").estimate(frame):
            for i in (9, 10):
                x, y, s = pose.keypoints[i]
                err = abs(x - target[0]) + abs(y - target[1])
                if s >= 0.3 and err < best_err:
                    best, best_err = lateral, err
    return best


async def greeter_scenarios(tally: Tally) -> None:
    from tests.skills.greeter_scenes import embed_faces, head_and_shoulders, live_scene, liveness, printed_photo_scene
    subject = head_and_shoulders()
    for name, expected, frames in (
            ("driver walks up", "greetings", [live_scene(subject, hgt) for hgt in (260, 330, 420)]),
            ("printed photo held up", "", [printed_photo_scene(subject, hgt, tilt_deg=t, seed=i)
                                           for i, (hgt, t) in enumerate(((300, 5.0), (340, -4.0), (380, 8.0)))])):
        greetings = {}
        for check in (liveness().check, None):        # with the liveness check, then the baseline without
            config = SkillsConfig()
            config.greeter.profile_key = PROFILE_KEY
            h = Harness(config, face_embedder=embed_faces)
            h.host.greeter.connect_perception(liveness=check)
            await h.start()
            from tests.skills.test_greeter import jpeg
            from skills.greeter import decode_image
            await h.host.greeter.enroll("Alice Example", True, image=decode_image(jpeg(subject), 1 << 26))
            await h.set_vehicle(vehicle(locked=True))
            for frame in frames:
                from tests.skills.scenes import analysis
                a = analysis("ext-left", "exterior", "left", h.clock.advance(0.2), frame, faces=embed_faces(frame),
                             stages=("faces", "identity"))
                await h.host.on_analysis(a)
            await h.host.drain()
            greetings[check is None] = h.count("greeter.greeting")
            await h.close()
        tally.score(name, expected, {"greetings": greetings[False]}, {"greetings": greetings[True]})


async def car_finder_scenario(tally: Tally) -> None:
    from service.perception.models import model_path
    from service.perception.text import TextReader
    from tests.skills.scenes import analysis
    from tests.skills.test_car_finder import sign_frame
    reader = TextReader(model_path("ocr_det"), model_path("ocr_rec"))
    h = Harness(SkillsConfig(), read_signs=reader.read)
    await h.start()
    await h.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_DRIVE, ignition=vehicle_pb2.IGNITION_ON, speed=9.0))
    for lines in (("LEVEL P2",), ("ROW B",)):
        frame = sign_frame(*lines)
        await h.host.on_analysis(analysis("ext-right", "exterior", "right", h.clock.advance(4.0), frame,
                                          texts=reader.read(frame), stages=("motion", "text")))
    await h.host.on_analysis(analysis("ext-right", "exterior", "right", h.clock.advance(3.0), background(seed=5),
                                      stages=("motion", "text")))
    await h.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF))
    h.clock.advance(600)
    answer, record = await h.host.car_finder.where_is_my_car()
    right = "P2" in answer and "row B" in answer and "10 min ago" in answer
    baseline_right = False   # before: only the bay's own (unreadable) signs -> no level
    print(f"  car finder answer: {answer!r}")
    tally.score("garage entry, unreadable bay", "answers", {"answers": int(right)}, {"answers": int(baseline_right)})
    await h.close()


def require_models() -> None:
    """The float graphs this bench runs (CPU); `incar perception build` makes them."""
    from service.perception.models import model_path
    missing = [n for n in ("face_full", "objects", "pose", "ocr_det", "ocr_rec", "antispoof", "liveness")
               if not model_path(n).is_file()]
    if missing:
        raise SystemExit(f"bench/skills.py: build the perception models first (incar perception build): {missing}")


async def main(fps: float) -> dict:
    require_models()
    cascade = Cascade(PerceptionConfig())
    tally, errors = Tally(), []
    started = time.perf_counter()
    frames = await sentinel_scenarios(cascade, fps, tally, errors)
    logic = Tally()
    await sentinel_scenarios(cascade, fps, logic, [], boxes="scene")
    await greeter_scenarios(tally)
    await car_finder_scenario(tally)
    seconds = time.perf_counter() - started
    print(f"{'scenario':44} {'expected':10} {'got':34} {'baseline':34} miss false | b.miss b.false")
    b_missed = b_false = 0
    for name, expected, got, base, miss, false, bmiss, bfalse in tally.rows:
        print(f"{name:44} {expected:10} {json.dumps(got):34} {json.dumps(base):34} {miss:4} {false:5} | "
              f"{bmiss:6} {bfalse:7}")
        b_missed, b_false = b_missed + bmiss, b_false + bfalse
    for name, expected, got, base, miss, false, bmiss, bfalse in logic.rows:
        print(f"{name:44} {expected:10} {json.dumps(got):34} {json.dumps(base):34} {miss:4} {false:5} | "
              f"{bmiss:6} {bfalse:7}")
    mae = sum(errors) / len(errors) if errors else float("nan")
    print(f"distance estimate from detector boxes: mean abs error {mae:.2f} m over {len(errors)} detections")
    return {"bench": "skills", "alerts": tally.alerts, "alarms": tally.alarms, "greetings": tally.greetings,
            "answers": tally.answers, "baseline_false_alarms": b_false, "baseline_missed": b_missed,
            "distance_mae_m": round(mae, 3), "scene_boxes_false_alarms": logic.false_alarms,
            "scene_boxes_missed": logic.missed,
            "scene_boxes_baseline_false_alarms": sum(r[7] for r in logic.rows),
            "scene_boxes_baseline_missed": sum(r[6] for r in logic.rows), "sentinel_frames": frames,
            "seconds": round(seconds, 1),
            "false_alarms": tally.false_alarms, "missed": tally.missed}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", type=float, default=5.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.fps))))
