"""`incar sim`: the dev-board simulation without Docker — the same processes docker compose starts.

By default it plays the scripted day (service.sim_day): every skill exercised over the gRPC API with real photos
composited into the camera streams, each step checked, ending with `scenario: P/N steps passed`; the web HMI is
served on loopback meanwhile. `--free-run` (and the compose services' `--cameras-only|--hmi-only|--vehicle-only`)
runs the older endless loop instead:
- a camera simulator replaying image files over Cameras.StreamFrames (one stream per camera),
- a vehicle script (drive, park, switch off, lock, ...) over Vehicle.UpdateState,
- an HMI demo client printing events and streamed answers to questions.
`--with-server` starts `incar serve` as a child process first (its JSON logs to a file under the data directory
unless `--server-logs console`) and stops it at the end, or keeps it running after the day with `--keep-running`.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from incar.v1 import (actions_pb2, actions_pb2_grpc, assistant_pb2, assistant_pb2_grpc, cameras_pb2,
                      cameras_pb2_grpc, common_pb2, events_pb2, events_pb2_grpc, vehicle_pb2, vehicle_pb2_grpc)
from service.clients import (Connection, add_connection_args, check_health, connection_or_exit, format_event,
                             open_channel)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT / "deploy" / "sim" / "images"

# (camera id, role, mounting position, files it replays)
CAMERAS = [
    ("front", common_pb2.CAMERA_ROLE_EXTERIOR, common_pb2.MOUNT_POSITION_FRONT, ["dog.jpg", "person.jpg"]),
    ("rear_left", common_pb2.CAMERA_ROLE_EXTERIOR, common_pb2.MOUNT_POSITION_LEFT, ["dog.jpg"]),
    ("cabin", common_pb2.CAMERA_ROLE_CABIN, common_pb2.MOUNT_POSITION_CABIN_FRONT, ["faces1.jpg"]),
]

QUESTIONS = ["What do you see on the front camera?", "Where is my car?"]


def say(who: str, text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {who:<8} {text}", flush=True)


async def stream_camera(target: str, camera_id: str, role: int, position: int, files: list[Path], fps: float,
                        stop: asyncio.Event) -> None:
    images = [p.read_bytes() for p in files]
    accepted = dropped = 0
    while not stop.is_set():
        try:
            async with open_channel(target) as channel:
                stub = cameras_pb2_grpc.CamerasStub(channel)

                async def frames():
                    seq = 0
                    while not stop.is_set():
                        frame = cameras_pb2.Frame(camera_id=camera_id, role=role, position=position, sequence=seq,
                                                  image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG,
                                                                         data=images[seq % len(images)]))
                        frame.capture_time.GetCurrentTime()
                        yield frame
                        seq += 1
                        await asyncio.sleep(1.0 / fps)

                async for ack in stub.StreamFrames(frames()):
                    if ack.accepted:
                        accepted += 1
                    else:
                        dropped += 1
                    if (accepted + dropped) % max(1, int(fps * 10)) == 0:
                        say("camera", f"{camera_id}: {accepted} frames accepted, {dropped} dropped")
        except grpc.aio.AioRpcError as exc:
            if stop.is_set():
                return
            say("camera", f"{camera_id}: stream ended ({exc.code().name}: {exc.details()}); reconnecting")
            await asyncio.sleep(1.0)


VEHICLE_SCRIPT = [
    # (seconds into the cycle, description, state)
    (0, "driving at 40 km/h", dict(gear=vehicle_pb2.GEAR_DRIVE, speed_kmh=40, ignition=vehicle_pb2.IGNITION_ON)),
    (4, "parked, engine running", dict(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_ON)),
    (6, "ignition off", dict(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF)),
    (8, "driver door opened", dict(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF,
                                   doors=[vehicle_pb2.DoorState(door=vehicle_pb2.DOOR_ID_FRONT_LEFT, open=True)])),
    (10, "locked, everyone gone", dict(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF, locked=True)),
]
CYCLE_S = 30


async def drive_vehicle(target: str, stop: asyncio.Event) -> None:
    async with open_channel(target) as channel:
        stub = vehicle_pb2_grpc.VehicleStub(channel)
        start = time.monotonic()
        while not stop.is_set():
            for at, description, fields in VEHICLE_SCRIPT:
                delay = start + at - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                        return
                    except TimeoutError:
                        pass
                state = vehicle_pb2.VehicleState(battery_percent=78, gps_valid=True, key_fob_id="fob-1",
                                                 gps=common_pb2.GeoPoint(latitude_deg=48.1374, longitude_deg=11.5755),
                                                 **fields)
                try:
                    reply = await stub.UpdateState(state, timeout=5)
                    say("vehicle", f"{description} (mode: {reply.vehicle_mode})")
                except grpc.aio.AioRpcError as exc:
                    say("vehicle", f"update refused: {exc.code().name}: {exc.details()}")
            start += CYCLE_S


async def vehicle_gateway(target: str, stop: asyncio.Event, performed: list[str] | None = None) -> None:
    """Plays the vehicle gateway's half of VehicleActions: performs (logs) each action and acknowledges it;
    each performed action's kind (and door or seat) is appended to `performed` when given."""
    cursor = 0
    while not stop.is_set():
        try:
            async with open_channel(target) as channel:
                stub = actions_pb2_grpc.VehicleActionsStub(channel)
                async for action in stub.Stream(actions_pb2.StreamActionsRequest(after_cursor=cursor)):
                    cursor = action.cursor
                    kind = actions_pb2.ActionKind.Name(action.kind).removeprefix("ACTION_KIND_").lower()
                    where = (f" {vehicle_pb2.DoorId.Name(action.door)}" if action.door else
                             f" {vehicle_pb2.SeatId.Name(action.seat)}" if action.seat else "")
                    if action.state == actions_pb2.ACTION_STATE_CANCELLED:
                        say("gateway", f"lift {kind}{where} ({action.id})")
                        continue
                    say("gateway", f"{kind}{where} attempt {action.attempt}: {action.reason}")
                    if performed is not None:
                        performed.append(f"{kind}{where}")
                    await stub.Acknowledge(actions_pb2.AcknowledgeActionRequest(
                        id=action.id, result=actions_pb2.ACTION_RESULT_DONE, detail="simulated gateway"), timeout=5)
        except grpc.aio.AioRpcError as exc:
            if stop.is_set():
                return
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:   # expired while we were away: skip it
                say("gateway", f"acknowledge refused: {exc.details()}")
                continue
            await asyncio.sleep(1.0)


async def hmi(target: str, stop: asyncio.Event, ask_every: float) -> None:
    async def print_events():
        cursor, first = 0, True
        while not stop.is_set():
            try:
                async with open_channel(target) as channel:
                    # The first subscription starts now; a reconnect resumes after the last event seen.
                    stream = events_pb2_grpc.EventsStub(channel).Subscribe(
                        events_pb2.SubscribeRequest(after_cursor=cursor, only_new=first))
                    first = False
                    async for event in stream:
                        cursor = event.cursor
                        say("event", format_event(event))
            except grpc.aio.AioRpcError:
                await asyncio.sleep(1.0)

    async def ask_questions():
        i = 0
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), ask_every)
                return
            except TimeoutError:
                pass
            question = QUESTIONS[i % len(QUESTIONS)]
            i += 1
            request = assistant_pb2.AskRequest(question=question, route_to_skill=True, max_tokens=48)
            if "camera" in question:
                request.camera_ids.append("front")
            say("hmi", f"asks: {question}")
            try:
                async with open_channel(target) as channel:
                    async for item in assistant_pb2_grpc.AssistantStub(channel).Ask(request, timeout=120):
                        if item.HasField("done"):
                            t = item.done.timings
                            say("answer", f"{item.done.answer.strip()}  [{item.done.handled_by}; "
                                          f"TTFT {t.time_to_first_token_s * 1000:.0f} ms, "
                                          f"{t.tokens_per_second:.0f} tok/s]")
            except grpc.aio.AioRpcError as exc:
                say("hmi", f"ask failed: {exc.code().name}: {exc.details()}")

    await asyncio.gather(print_events(), ask_questions())


async def run_sim(target: str | Connection, images: Path, fps: float, duration: float, parts: set[str],
                  ask_every: float) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration:
        loop.call_later(duration, stop.set)
    tasks = []
    if "cameras" in parts:
        for camera_id, role, position, files in CAMERAS:
            paths = [images / f for f in files if (images / f).exists()] or sorted(images.glob("*.jpg"))
            if not paths:
                print(f"incar sim: no images in {images}", file=sys.stderr)
                return 2
            tasks.append(asyncio.create_task(stream_camera(target, camera_id, role, position, paths, fps, stop)))
    if "vehicle" in parts:
        tasks.append(asyncio.create_task(drive_vehicle(target, stop)))
        tasks.append(asyncio.create_task(vehicle_gateway(target, stop)))
    if "hmi" in parts:
        tasks.append(asyncio.create_task(hmi(target, stop, ask_every)))
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return 0


async def play_day(target: Connection, args: argparse.Namespace, server: subprocess.Popen | None) -> int:
    """The scripted day; the web HMI beside it. Returns the exit status (0: every step passed)."""
    from service.hmi_web.gateway import bound_port, serve
    from service.sim_day import DAY_CAMERAS, Day, run_day
    from service.sim_day_steps import chosen_steps

    steps = chosen_steps(args.steps)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    day = Day(target, args.images, args.fps, args.step_timeout, stop)
    runner = None
    if args.hmi_listen != "off":
        host, _, port = args.hmi_listen.rpartition(":")
        try:
            runner = await serve(target, host or "127.0.0.1", int(port))
            say("sim", f"web HMI: http://{host or '127.0.0.1'}:{bound_port(runner)}/")
        except OSError as exc:                  # a port in use must not cost the day: say so and play on
            say("sim", f"web HMI not started on {args.hmi_listen}: {exc.strerror} (--hmi-listen HOST:PORT)")
    tasks = [asyncio.create_task(day.feed_camera(*camera)) for camera in DAY_CAMERAS]
    tasks += [asyncio.create_task(day.follow_events()),
              asyncio.create_task(vehicle_gateway(target, stop, day.actions))]
    try:
        async with open_channel(target) as channel:
            day.channel = channel
            await asyncio.sleep(2.0)              # the cameras come up and the event stream is subscribed
            passed = await run_day(day, steps)
        if args.keep_running and not stop.is_set():
            say("sim", f"the service keeps running on {target.target} for your own clients (e.g. `incar events`, "
                       "`incar ask`); Ctrl-C stops it")
            await stop.wait()
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
    return 0 if passed == len(steps) else 3


def server_log_path(args: argparse.Namespace) -> Path:
    from service.config import load_config
    data_dir = Path(load_config(args.config, overrides=args.set).server.data_dir)
    return (data_dir if data_dir.is_absolute() else ROOT / data_dir) / "logs" / "incar-serve.log"


def simulation_profile_key(args: argparse.Namespace) -> dict[str, str]:
    """The environment for the started server: a development profile key (32 random bytes, kept in
    build/sim-profile.key, mode 0600, outside the data directory) when none is configured, so the day can enrol."""
    from service.config import load_config
    from skills.config import PROFILE_KEY_ENV
    if os.environ.get(PROFILE_KEY_ENV) or load_config(args.config, overrides=args.set).skills.greeter.profile_key:
        return {}
    path = ROOT / "build" / "sim-profile.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.urlsafe_b64encode(os.urandom(32)).decode())
    say("sim", f"driver profiles encrypted with the simulation's key {path} (set {PROFILE_KEY_ENV} to use yours)")
    return {PROFILE_KEY_ENV: path.read_text().strip()}


def start_server(args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--listen", args.target]
    if args.config:
        cmd += ["--config", args.config]
    for item in args.set:
        cmd += ["--set", item]
    say("sim", "starting incar serve: " + " ".join(cmd[3:]))
    output = None
    if args.server_logs == "file":
        path = server_log_path(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        output = path.open("a")
        say("sim", f"server logs (JSON lines): {path}   (--server-logs console to see them here)")
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT), **simulation_profile_key(args))
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=output,
                                stderr=subprocess.STDOUT if output else None)
    finally:
        if output is not None:
            output.close()                       # the child holds its own descriptor


async def wait_serving(target: str | Connection, server: subprocess.Popen | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            return False
        serving, text = await check_health(target, timeout=1.0)
        if serving:
            say("sim", "server is SERVING")
            return True
        if text != last and "UNAVAILABLE" not in text:
            say("sim", "waiting: " + text.replace("\n", " | "))
            last = text
        await asyncio.sleep(0.5)
    return False


def sim_main(argv: list[str]) -> int:
    from service.sim_day_steps import STEPS, chosen_steps
    parser = argparse.ArgumentParser(prog="incar sim", description=__doc__.splitlines()[0])
    add_connection_args(parser)                 # --target, and --ca/--cert/--key/--token for a TLS server
    parser.add_argument("--with-server", action="store_true", help="start `incar serve` first (what make run does)")
    parser.add_argument("--config", "-c", help="config file for the started server")
    parser.add_argument("--set", action="append", default=[], help="config override for the started server")
    parser.add_argument("--server-logs", choices=("file", "console"), default="file",
                        help="the started server's JSON logs: to <data_dir>/logs/incar-serve.log (default) or here")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEGs to replay")
    parser.add_argument("--fps", type=float, default=5.0, help="frames per second per camera")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"the scripted day's steps, in order (default all: {','.join(STEPS)})")
    parser.add_argument("--step-timeout", type=float, default=30.0, help="seconds a step waits for its skill")
    parser.add_argument("--keep-running", action="store_true",
                        help="after the day, keep the service (and web HMI) running for your own clients")
    parser.add_argument("--hmi-listen", default="127.0.0.1:8080", help="the web HMI's address, or 'off'")
    parser.add_argument("--free-run", action="store_true", help="the endless loop instead of the scripted day")
    parser.add_argument("--duration", type=float, default=0, help="free run: seconds to run (0: until Ctrl-C)")
    parser.add_argument("--ask-every", type=float, default=20.0, help="free run: seconds between HMI questions")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--cameras-only", action="store_true", help="only the camera simulator (a compose service)")
    only.add_argument("--hmi-only", action="store_true", help="only the HMI demo client (a compose service)")
    only.add_argument("--vehicle-only", action="store_true", help="only the vehicle script")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    connection = connection_or_exit(parser, args)
    parts = ({"cameras"} if args.cameras_only else {"hmi"} if args.hmi_only else {"vehicle"} if args.vehicle_only
             else {"cameras", "vehicle", "hmi"})
    free_run = args.free_run or parts != {"cameras", "vehicle", "hmi"}
    if not free_run:
        chosen_steps(args.steps)       # an unknown step is refused before starting
    if args.with_server:
        from service.config import ConfigError, load_config
        try:                           # the server's settings, checked before it starts: an error, not a traceback
            load_config(args.config, overrides=args.set)
        except ConfigError as exc:
            parser.error(f"configuration: {exc}")
    server = start_server(args) if args.with_server else None
    try:
        if not asyncio.run(wait_serving(connection, server, args.startup_timeout)):
            print(f"incar sim: server at {args.target} did not become SERVING", file=sys.stderr)
            return 1
        if free_run:
            return asyncio.run(run_sim(connection, args.images, args.fps, args.duration, parts, args.ask_every))
        return asyncio.run(play_day(connection, args, server))
    except KeyboardInterrupt:
        return 0
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
