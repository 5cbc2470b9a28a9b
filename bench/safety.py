"""Safety bench: safe-exit frame-to-decision latency with every camera streaming and the model answering (the
safety lane against one serial analysis loop, same load, same run; the serial loop's count of decided frames
says how many it managed at all), and the safe-exit scenario set (every real
approach warned, no warning from a parked car's 3 % box jitter). Prints figures, then one JSON line.

    nice -n -5 .venv/bin/python bench/safety.py [--seconds 15] [--no-model] [--fps 10] [--safety-threads 2]
        [--autogroup-nice -5] [--variant float] [--no-realtime]

Latency is measured on the real path: scripted cameras (five, 640x480 JPEG: cabin, front with a parking sign,
left with a bicycle approaching again and again, right, rear) -> CameraHub.submit, as the Cameras service calls
it (decode, ingest lanes) -> AnalysisPipeline -> the real cascade -> SkillHost with Safety; the left door's
handle is pulled. A decision is a frame of a camera that watches an armed door's path (left, rear) with the
object detector run on it: its arrival at the server (submit, before decoding) -> Safety done with it, split
into the wait until the lane's worker takes it (decode included), the analysis, and the hand-over to the
skills with Safety's decision;
for each safe-exit warning, arrival -> committed warning. The language model (the default bundle, loaded by the
server's ModelHost on the CPU, so with the server's thread priorities) answers back to back meanwhile.

The safety lane and the camera decode threads run real-time where permitted (service/thread_priority.py;
`--no-realtime`: the nice-raise fallback). The object detector is the x86 int8 graph that the deployment runs
(deploy/docker-compose.yml: INCAR_PERCEPTION__VARIANT=cpu-int8); `--variant float` measures the float one.

Linux with autogroups shares the CPU between sessions before nice values count, so `nice -n -5` ranks the bench
only among its own threads; `--autogroup-nice -5` gives its session that priority for the run (the JSON line
says which, and the load average before and after).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import structlog  # noqa: E402

from bench.safety_scenarios import run_scenarios  # noqa: E402
from service.pipeline import LANE_PAUSED, SAFETY_LANE_THREADS  # noqa: E402

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
PHOTOS = Path(__file__).resolve().parents[1] / "deploy" / "sim" / "images"
CAMERAS = (("cabin", "cabin", "cabin_front"), ("front", "exterior", "front"), ("left", "exterior", "left"),
           ("right", "exterior", "right"), ("rear", "exterior", "rear"))


def photo(name: str, size=(640, 480)) -> np.ndarray:
    return cv2.resize(cv2.imread(str(PHOTOS / name)), size, interpolation=cv2.INTER_AREA)


def scenes() -> dict[str, list[np.ndarray]]:
    """Per camera, the frames it loops over; the left camera shows a bicycle approaching (4 s at 10 fps: enough
    analysed frames for a rate even when a loaded CPU analyses only 2-3 per second)."""
    dog = cv2.imread(str(PHOTOS / "dog.jpg"))
    bike = dog[110:450, 110:580]
    rng = np.random.default_rng(0)
    approach = []
    for i in range(40):
        frame = np.clip(np.linspace(70, 150, 480)[:, None, None] + rng.normal(0, 3, (480, 640, 3)), 0, 255)
        frame = frame.astype(np.uint8)
        h = int(480 * (0.2 + 0.0175 * i))
        w = int(h * bike.shape[1] / bike.shape[0])
        x1 = max(0, 320 - w // 2)
        frame[470 - h:470, x1:x1 + min(w, 640 - x1)] = cv2.resize(bike, (w, h))[:, : min(w, 640 - x1)]
        approach.append(frame)
    sign = photo("dog.jpg")
    cv2.rectangle(sign, (360, 30), (630, 200), (40, 40, 40), -1)
    for i, line in enumerate(("LEVEL U1", "BAY 230")):
        cv2.putText(sign, line, (375, 95 + 70 * i), cv2.FONT_HERSHEY_DUPLEX, 1.4, (255, 255, 255), 3)
    return {"cabin": [photo("faces1.jpg")], "front": [sign], "left": approach, "right": [photo("horses.jpg")],
            "rear": [photo("person.jpg")]}


class IngestHub:
    """The server's CameraHub, fed as the Cameras service feeds it: every camera's JPEG frames at `fps`, sent
    without a camera clock, so a frame's timestamp is its arrival at the server; the decode, the ingest lanes and
    the hub's latest-wins hand-over are on the measured path. Ends after `seconds`."""

    def __init__(self, fps: float, seconds: float):
        self.fps, self.seconds = fps, seconds
        self.jpegs = {camera: [cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
                               for image in images] for camera, images in scenes().items()}

    async def _feed(self, hub) -> None:
        from incar.v1 import cameras_pb2, common_pb2
        from service.cameras.admission import POSITION_VALUES, ROLE_VALUES
        start, n, pending = time.monotonic(), 0, set()
        while time.monotonic() - start < self.seconds:
            for camera_id, role, position in CAMERAS:
                jpegs = self.jpegs[camera_id]
                frame = cameras_pb2.Frame(camera_id=camera_id, role=ROLE_VALUES[role],
                                          position=POSITION_VALUES[position], sequence=n,
                                          image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG,
                                                                 data=jpegs[n % len(jpegs)]))
                task = asyncio.ensure_future(hub.submit(frame))   # acknowledged once decoded: don't wait
                pending.add(task)
                task.add_done_callback(pending.discard)
            n += 1
            await asyncio.sleep(max(0.0, start + n / self.fps - time.monotonic()))

    async def frames(self):
        from service.cameras.hub import CameraHub
        hub = CameraHub()
        await hub.start()
        feeder = asyncio.create_task(self._feed(hub))
        stream = hub.frames()
        try:
            while not feeder.done():
                following = asyncio.ensure_future(stream.__anext__())
                done, _ = await asyncio.wait([following, feeder], return_when=asyncio.FIRST_COMPLETED)
                if following in done:
                    yield following.result()
                else:
                    following.cancel()
        finally:
            feeder.cancel()
            await stream.aclose()
            await hub.stop()


def model_load(stop: threading.Event, counter: list[int]) -> str:
    """The default language model, loaded by the server's ModelHost (same threads, same priorities), answering
    back to back on its own thread and event loop; returns what ran."""
    from service.runtime.config import RuntimeConfig
    from service.runtime.engine import Done, GenerationRequest
    from service.runtime.host import ModelHost
    host, loop = ModelHost(RuntimeConfig(fallback_backend="")), asyncio.new_event_loop()

    async def status(serving: bool, note: str) -> None:
        pass
    loaded = loop.run_until_complete(host.load(status))
    if loaded.engine is None:   # no bundle built: say so, measure without
        return f"no model ({loaded.reason})"

    def run():
        async def answer():
            request = GenerationRequest(prompt="Describe a safe way to park a car.", system="", max_tokens=48)
            async for item in host.engine.stream(request):
                if isinstance(item, Done):
                    counter[0] += item.timings.generated_tokens
        while not stop.is_set():
            loop.run_until_complete(answer())
    threading.Thread(target=run, daemon=True).start()
    return f"{host.engine.name} on {loaded.backend}"


class TimedCascade:
    """The real cascade, with each frame's analysis start and end noted (wall clock) for the stage breakdown."""

    def __init__(self, cascade):
        self.cascade, self.spans = cascade, {}

    def __getattr__(self, name):
        return getattr(self.cascade, name)

    def analyze(self, bgr, meta, *args):
        started = time.time()
        analysis = self.cascade.analyze(bgr, meta, *args)
        self.spans[(meta.camera_id, meta.capture_time)] = (started, time.time())
        return analysis


async def measure(lanes: bool, seconds: float, fps: float, cascade, safety_threads: int) -> dict:
    from incar.v1 import vehicle_pb2
    from service.actions import ActionQueue
    from service.pipeline import AnalysisPipeline
    from service.store.db import Database
    from service.store.events import EventLog
    from skills.base import SkillContext, TemplateNarrator
    from skills.config import SkillsConfig
    from skills.services import SkillHost

    with tempfile.TemporaryDirectory() as tmp:
        db = Database(Path(tmp) / "incar.db")
        events = EventLog(db)
        ctx = SkillContext(db=db, events=events, narrator=TemplateNarrator(), data_dir=Path(tmp),
                           actions=ActionQueue(db))
        host = SkillHost(ctx, SkillsConfig())
        db.migrate()
        await host.start(vehicle_pb2.VehicleState())
        state = vehicle_pb2.VehicleState(gear=vehicle_pb2.GEAR_PARK)
        state.doors.add(door=vehicle_pb2.DOOR_ID_FRONT_LEFT, handle_pulled=True)
        await host.on_vehicle(vehicle_pb2.VehicleState(), state)
        safety = host.safety
        policy = (lambda f: "safety" if safety.needs_camera(f.role, f.position) else "general") if lanes else None
        timed = TimedCascade(cascade)
        pipeline = AnalysisPipeline(IngestHub(fps, seconds), timed, lane_of=policy,
                                    safety_threads=safety_threads)
        decisions, warnings, seen, stages = [], [], {}, {"wait": [], "analysis": [], "handover": []}
        async for analysis in pipeline.analyses():
            before = len(safety.exit.warnings)
            await host.on_analysis(analysis)
            done = time.time()
            seen[analysis.camera_id] = seen.get(analysis.camera_id, 0) + 1
            # A safe-exit decision: a frame of a camera watching an armed door's path, the detector run on it
            # (the right camera watches no armed door here: its frames are nobody's safe-exit decision).
            if safety.exit.needs(analysis.position) and "objects" in analysis.stages_run:
                decisions.append(done - analysis.timestamp)
                started, ended = timed.spans[(analysis.camera_id, analysis.timestamp)]
                stages["wait"].append(started - analysis.timestamp)
                stages["analysis"].append(ended - started)
                stages["handover"].append(done - ended)   # to the skills, and Safety's decision
                if len(safety.exit.warnings) > before:
                    warnings.append(done - analysis.timestamp)
        await host.stop()
        db.close()
    return {"decisions": decisions, "warnings": warnings, "frames": seen, "stages": stages}


AUTOGROUP = Path("/proc/self/autogroup")


def autogroup_nice() -> int | None:
    """The nice value of this session's autogroup (Linux shares the CPU fairly between sessions first, so a
    process's own nice ranks it only within its session); None without autogroups."""
    try:
        return int(AUTOGROUP.read_text().split("nice")[1])
    except (OSError, IndexError, ValueError):
        return None


@contextlib.contextmanager
def session_priority(nice: int | None):
    """`--autogroup-nice`: the session's autogroup at `nice` for the run (what `nice -n` means on a machine
    without autogroups), put back afterwards."""
    before = autogroup_nice()
    if nice is None or before is None:
        yield
        return
    AUTOGROUP.write_text(str(nice))
    try:
        yield
    finally:
        AUTOGROUP.write_text(str(before))


def realtime_lane() -> bool:
    """Whether the safety lane's threads ran real-time in this run (raise_current_thread permitted SCHED_FIFO)."""
    from service.thread_priority import RAISED
    return any(sample.value > 0 for metric in RAISED.collect() for sample in metric.samples
               if sample.labels.get("how") == "realtime")


def p95(values: list[float]) -> float | None:
    return float(np.percentile(values, 95)) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="per contender (serial loop, safety lane)")
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--safety-threads", type=int, default=SAFETY_LANE_THREADS,
                    help="intra-op threads of the safety lane's own detector sessions")
    ap.add_argument("--no-realtime", action="store_true",
                    help="raise the safety lane and decode threads by nice steps only (the fallback without "
                         "CAP_SYS_NICE / RLIMIT_RTPRIO), not SCHED_FIFO")
    ap.add_argument("--variant", default="cpu-int8", choices=("float", "cpu-int8"),
                    help="the perception graphs (PerceptionConfig.variant), as deployed on x86: cpu-int8")
    ap.add_argument("--autogroup-nice", type=int, default=None,
                    help="run with this session's autogroup at this nice value (e.g. -5 with nice -n -5), "
                         "restored after")
    args = ap.parse_args()
    with session_priority(args.autogroup_nice):
        return run(args)


def run(args) -> int:
    load_before = Path("/proc/loadavg").read_text().split()[0]

    from service import thread_priority
    from service.perception.build import build
    from service.perception.cascade import Cascade, PerceptionConfig
    thread_priority.use_realtime(not args.no_realtime)
    # The CPU runs the float graphs, or the int8 ones where built (--variant cpu-int8).
    build(quantize=False, cpu_int8=args.variant == "cpu-int8", progress=lambda line: None)
    cascade = Cascade(PerceptionConfig(variant=args.variant))
    for name in ("faces", "objects", "identity", "text", "pose", "age"):
        cascade.model(name)
    stop, tokens = threading.Event(), [0]
    model = "off (--no-model)" if args.no_model else model_load(stop, tokens)
    print(f"5 cameras at {args.fps:g} fps, {args.seconds:g} s per contender; model: {model}; perception "
          f"{cascade.config.resolved_variant}")
    results = {}
    for name, lanes in (("serial", False), ("lanes", True)):
        t0 = tokens[0]
        r = asyncio.run(measure(lanes, args.seconds, args.fps, cascade, args.safety_threads))
        r["tokens"] = tokens[0] - t0
        results[name] = r
        d = r["decisions"]
        median = 1000 * statistics.median(d) if d else float("nan")
        print(f"{name:7s} safe-exit frames decided {len(d):4d}  p50 {median:7.1f} ms"
              f"  p95 {1000 * (p95(d) or float('nan')):7.1f} ms  warnings {len(r['warnings'])}"
              f"  (p95 {1000 * (p95(r['warnings']) or float('nan')):.1f} ms)  frames/camera {r['frames']}"
              f"  model tokens {r['tokens']}")
        print("        " + "  ".join(f"{k} p50 {1000 * statistics.median(v):.1f} p95 {1000 * p95(v):.1f} ms"
                                      for k, v in r["stages"].items() if v))
    stop.set()
    scen = run_scenarios()
    print(f"scenarios: {scen['approaches']} approaches, missed {len(scen['missed'])} {scen['missed']}, "
          f"warned later than TTC 0.8 s {len(scen['late'])}; {scen['quiet_scenarios']} parked/receding, "
          f"false warnings {len(scen['false'])} {scen['false']}; TTC at warning median "
          f"{statistics.median(scen['warn_ttc']):.2f} s, min {min(scen['warn_ttc']):.2f} s")
    serial, lanes = p95(results["serial"]["decisions"]), p95(results["lanes"]["decisions"])
    out = {
        "safe_exit_p95_s": round(lanes, 4) if lanes is not None else None,
        "safe_exit_p50_s": round(statistics.median(results["lanes"]["decisions"]), 4) if lanes else None,
        "safe_exit_serial_p95_s": round(serial, 4) if serial is not None else None,
        "safe_exit_p95_vs_serial": round(lanes / serial, 3) if lanes and serial else None,
        "safe_exit_warning_p95_s": (round(p95(results["lanes"]["warnings"]), 4)
                                    if results["lanes"]["warnings"] else None),
        "safe_exit_warnings": len(results["lanes"]["warnings"]),
        "safe_exit_decisions": len(results["lanes"]["decisions"]),
        "safe_exit_serial_decisions": len(results["serial"]["decisions"]),
        "safe_exit_target_s": 0.05,
        "model_answering": not args.no_model and not model.startswith("no model"),
        "perception_variant": cascade.config.resolved_variant, "realtime_lane": realtime_lane(),
        "safety_lane_paused_s": round(LANE_PAUSED._value.get(), 3),   # the lane's duty-cycle cap at work
        "model_tokens_during_lanes": results["lanes"]["tokens"],
        **{f"safety_lane_{k}_p95_s": round(p95(v), 4) for k, v in results["lanes"]["stages"].items() if v},
        "safety_lane_analysis_p50_s": round(statistics.median(results["lanes"]["stages"]["analysis"]), 4)
        if results["lanes"]["stages"]["analysis"] else None,
        "loadavg_1m_before": float(load_before), "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
        "process_nice": os.getpriority(os.PRIO_PROCESS, 0), "autogroup_nice": autogroup_nice(),
        "approaches": scen["approaches"], "missed_approaches": len(scen["missed"]),
        "late_warnings": len(scen["late"]), "quiet_scenarios": scen["quiet_scenarios"],
        "false_warnings": len(scen["false"]), "box_jitter": 0.03,
        "warning_ttc_median_s": round(statistics.median(scen["warn_ttc"]), 3),
        "warning_ttc_min_s": round(min(scen["warn_ttc"]), 3),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
