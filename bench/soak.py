"""Load and soak: N cameras streaming frames at M fps, K HMI clients asking, listing and subscribing, and the
vehicle gateway updating state, against `incar serve` on loopback for T minutes.

Reports the server's resident memory (RssAnon + swap, from /proc) at start (after warm-up) and end, p50/p99
client-side latency per RPC, error counts, frame drops, and whether the safety latency budget held (from the
metrics endpoint: `incar_latency_budget_violations_total{skill="safety"}` and the safe-exit warning histogram;
"n/a" when the running build exports neither). Services this build does not mount are skipped and listed.
A plain client (GetState every 50 ms on its own connection) is measured throughout; with --hostile it is measured
first alone, then beside the hostile clients of bench/soak_hostile.py (unread acks, slow streams, a subscriber
flood) and the vehicle gateway toggles the lock every second, so every event fans out. Last line: JSON, flat keys.

    .venv/bin/python bench/soak.py                       # the issue's run: 4 cameras x 10 fps, 4 HMI, 30 min
    .venv/bin/python bench/soak.py --minutes 2           # a short run
    .venv/bin/python bench/soak.py --mtls                # same, over mutual TLS with dev-CA certificates
    .venv/bin/python bench/soak.py --minutes 3 --hostile # issue 13: RSS and the plain client's p99 under attack
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402

from bench.soak_hostile import HostileLoad, plain_client  # noqa: E402
from bench.soak_support import (Server, Stats, flat_key, jpegs, metric_sum, over_budget,  # noqa: E402
                                percentile, rss_anon_plus_swap)
from incar.v1 import (assistant_pb2, assistant_pb2_grpc, cameras_pb2, cameras_pb2_grpc, common_pb2,  # noqa: E402
                      events_pb2, events_pb2_grpc, system_pb2, system_pb2_grpc, vehicle_pb2, vehicle_pb2_grpc)

CAMERAS = [("front", common_pb2.MOUNT_POSITION_FRONT, common_pb2.CAMERA_ROLE_EXTERIOR),
           ("rear", common_pb2.MOUNT_POSITION_REAR, common_pb2.CAMERA_ROLE_EXTERIOR),
           ("left", common_pb2.MOUNT_POSITION_LEFT, common_pb2.CAMERA_ROLE_EXTERIOR),
           ("cabin", common_pb2.MOUNT_POSITION_CABIN_FRONT, common_pb2.CAMERA_ROLE_CABIN),
           ("right", common_pb2.MOUNT_POSITION_RIGHT, common_pb2.CAMERA_ROLE_EXTERIOR),
           ("cabin-rear", common_pb2.MOUNT_POSITION_CABIN_REAR, common_pb2.CAMERA_ROLE_CABIN)]
QUESTIONS = ["Is anyone in the back seat?", "What is in front of the car?", "Summarise the last events."]


async def camera_client(channel, stop: asyncio.Event, stats: Stats, name, position, role, fps: float,
                        frames: list[bytes]) -> None:
    stub = cameras_pb2_grpc.CamerasStub(channel)
    sent_at: dict[int, float] = {}

    async def produce():
        seq, period, next_t = 0, 1.0 / fps, time.perf_counter()
        while not stop.is_set():
            seq += 1
            frame = cameras_pb2.Frame(camera_id=name, role=role, position=position, sequence=seq,
                                      image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG,
                                                             data=frames[seq % len(frames)]))
            frame.capture_time.GetCurrentTime()
            sent_at[seq] = time.perf_counter()
            yield frame
            next_t += period
            await asyncio.sleep(max(0.0, next_t - time.perf_counter()))

    while not stop.is_set():
        try:
            async for ack in stub.StreamFrames(produce()):
                started = sent_at.pop(ack.sequence, None)
                if started is not None:
                    stats.ok("Cameras/StreamFrames(ack)", time.perf_counter() - started)
                stats.counts["frames_acked"] += 1
                if not ack.accepted:
                    stats.counts[f"frames_dropped_{cameras_pb2.DropReason.Name(ack.drop_reason).lower()}"] += 1
        except grpc.aio.AioRpcError as err:
            if stop.is_set() and err.code() == grpc.StatusCode.CANCELLED:
                return
            stats.error("Cameras/StreamFrames", err)
            await asyncio.sleep(1.0)
        if len(sent_at) > 10_000:   # frames the server never acked would show as a leak here
            stats.counts["frames_unacked"] += len(sent_at)
            sent_at.clear()


async def timed(stats: Stats, rpc: str, coro):
    started = time.perf_counter()
    try:
        result = await coro
    except grpc.aio.AioRpcError as err:
        stats.error(rpc, err)
        return None
    stats.ok(rpc, time.perf_counter() - started)
    return result


async def hmi_client(channel, stop: asyncio.Event, stats: Stats, index: int, mounted: set[str],
                     ask_interval: float) -> None:
    events = events_pb2_grpc.EventsStub(channel)
    system = system_pb2_grpc.SystemStub(channel)
    assistant = assistant_pb2_grpc.AssistantStub(channel)
    vehicle = vehicle_pb2_grpc.VehicleStub(channel)
    cursor = 0

    async def subscribe():
        nonlocal cursor
        while not stop.is_set():
            try:
                async for event in events.Subscribe(events_pb2.SubscribeRequest(after_cursor=cursor)):
                    if event.cursor <= cursor:
                        stats.error("Events/Subscribe", RuntimeError(f"cursor went back {cursor} -> {event.cursor}"))
                    cursor = event.cursor
                    stats.counts["events_received"] += 1
            except grpc.aio.AioRpcError as err:
                if stop.is_set():
                    return
                stats.error("Events/Subscribe", err)
                await asyncio.sleep(1.0)

    sub = asyncio.create_task(subscribe())
    next_ask = time.monotonic() + index * ask_interval / 4
    try:
        while not stop.is_set():
            await timed(stats, "Events/ListEvents", events.ListEvents(events_pb2.ListEventsRequest(limit=50)))
            await timed(stats, "System/GetStatus", system.GetStatus(system_pb2.GetSystemStatusRequest()))
            await timed(stats, "Vehicle/GetState", vehicle.GetState(vehicle_pb2.GetStateRequest()))
            if "incar.v1.Assistant" in mounted and time.monotonic() >= next_ask:
                next_ask = time.monotonic() + ask_interval
                started = time.perf_counter()
                try:
                    async for _ in assistant.Ask(assistant_pb2.AskRequest(
                            question=QUESTIONS[index % len(QUESTIONS)], max_tokens=16), timeout=120):
                        pass
                    stats.ok("Assistant/Ask", time.perf_counter() - started)
                except grpc.aio.AioRpcError as err:
                    stats.error("Assistant/Ask", err)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    finally:
        sub.cancel()


async def vehicle_gateway(channel, stop: asyncio.Event, stats: Stats, toggle_every: int = 30) -> None:
    """1 Hz state updates; the car is parked and locks/unlocks every `toggle_every` s (events to fan out)."""
    stub = vehicle_pb2_grpc.VehicleStub(channel)
    tick = 0
    while not stop.is_set():
        state = vehicle_pb2.VehicleState(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_ON,
                                         battery_percent=80, locked=(tick // toggle_every) % 2 == 1)
        await timed(stats, "Vehicle/UpdateState", stub.UpdateState(state))
        tick += 1
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


async def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="incar-soak-"))
    extra = list(args.set)
    # Each client its own connection, as separate processes in the car would be (grpc shares one otherwise).
    own = [("grpc.use_local_subchannel_pool", 1)]
    make_channel = lambda target, role: grpc.aio.insecure_channel(target, options=own)  # noqa: E731
    if args.mtls:
        from service.security.credentials import channel_credentials
        from service.security.devca import make_dev_pki
        pki = workdir / "pki"
        make_dev_pki(pki)
        extra += ["--set", "security.mode=mtls", "--set", f"security.cert_file={pki / 'server.pem'}",
                  "--set", f"security.key_file={pki / 'server.key'}", "--set", f"security.ca_file={pki / 'ca.pem'}"]

        def make_channel(target, role):
            creds = channel_credentials(pki / "ca.pem", pki / f"{role}.pem", pki / f"{role}.key")
            return grpc.aio.secure_channel(target.replace("127.0.0.1", "localhost"), creds, options=own)
    server = Server(workdir / "data", extra)
    target = f"127.0.0.1:{server.port}"
    stats = Stats()
    admin = make_channel(target, "admin")
    deadline = time.monotonic() + 180
    while True:
        if server.proc.poll() is not None:
            raise SystemExit(f"server exited with {server.proc.returncode}: {server.log.read_text()[-3000:]}")
        try:
            reply = await health_pb2_grpc.HealthStub(admin).Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("server did not become healthy in 180 s")
        await asyncio.sleep(0.5)
    stream = reflection_pb2_grpc.ServerReflectionStub(admin).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    mounted = {s.name async for r in stream for s in r.list_services_response.service}
    skipped = [s for s in ("incar.v1.Cameras", "incar.v1.Assistant") if s not in mounted]

    stop = asyncio.Event()
    frames = jpegs()
    cam_channels = [make_channel(target, "camera") for _ in range(args.cameras)]
    hmi_channels = [make_channel(target, "hmi") for _ in range(args.clients)]
    vehicle_channel = make_channel(target, "vehicle")
    tasks = []
    if "incar.v1.Cameras" in mounted:
        for i in range(args.cameras):
            name, position, role = CAMERAS[i % len(CAMERAS)]
            tasks.append(asyncio.create_task(camera_client(
                cam_channels[i], stop, stats, f"{name}-{i}" if i >= len(CAMERAS) else name, position, role,
                args.fps, frames)))
    tasks += [asyncio.create_task(hmi_client(hmi_channels[i], stop, stats, i, mounted, args.ask_interval))
              for i in range(args.clients)]
    tasks.append(asyncio.create_task(vehicle_gateway(vehicle_channel, stop, stats, 1 if args.hostile else 30)))
    plain_latency: dict[str, list[float]] = defaultdict(list)
    phase = ["quiet"]
    plain_channel = make_channel(target, "hmi")
    tasks.append(asyncio.create_task(plain_client(plain_channel, stop, plain_latency, phase)))
    hostile = HostileLoad(make_channel, target, frames, unread_ack_cameras=args.unread_ack_cameras,
                          slow_subscribers=args.slow_subscribers, idle_subscribers=args.idle_subscribers)

    total = args.minutes * 60
    warmup = min(args.warmup, total / 4)
    await asyncio.sleep(warmup)
    if args.hostile:   # the plain client's quiet baseline, then the hostile clients for the rest of the run
        await asyncio.sleep(min(args.hostile_baseline, total / 4))
        hostile.start()
        phase[0] = "hostile"
    rss_start = rss_anon_plus_swap(server.proc.pid)
    metrics_start = server.metrics()
    samples = [rss_start]
    t_end = time.monotonic() + total - warmup
    while time.monotonic() < t_end:
        await asyncio.sleep(min(10.0, max(0.0, t_end - time.monotonic())))
        samples.append(rss_anon_plus_swap(server.proc.pid))
        if server.proc.poll() is not None:
            stats.errors["server"]["EXITED"] += 1
            break
    rss_end = samples[-1]
    metrics_end = server.metrics() if server.proc.poll() is None else ""
    stop.set()
    await hostile.stop()
    await asyncio.wait(tasks, timeout=15)
    for task in tasks:
        task.cancel()
    for ch in cam_channels + hmi_channels + [vehicle_channel, plain_channel, admin]:
        await ch.close()
    exit_code = server.stop()

    # Safety budget: no violations counted during the run, and no safe-exit warning slower than its budget.
    budget_s = args.safety_budget
    v0 = metric_sum(metrics_start, "incar_latency_budget_violations_total", 'skill="safety"')
    v1 = metric_sum(metrics_end, "incar_latency_budget_violations_total", 'skill="safety"')
    exit_warn = over_budget(metrics_end, "incar_safety_exit_warning_latency_seconds", budget_s)
    skill_lat = over_budget(metrics_end, "incar_skill_latency_seconds", 10.0) if metrics_end else None
    if v1 is None and exit_warn is None:
        safety = "n/a"
    else:
        safety = bool((v1 or 0) - (v0 or 0) == 0 and (exit_warn is None or exit_warn[1] == 0))

    errors = {rpc: dict(codes) for rpc, codes in stats.errors.items()}
    growth = (rss_end - rss_start) / rss_start if rss_start else None
    result = {
        "bench": "soak", "minutes": args.minutes, "cameras": args.cameras if "incar.v1.Cameras" in mounted else 0,
        "fps": args.fps, "hmi_clients": args.clients, "mtls": args.mtls, "hostile": args.hostile,
        "skipped_services": ",".join(skipped),
        "rss_start_bytes": rss_start, "rss_end_bytes": rss_end, "rss_max_bytes": max(samples),
        "rss_growth_pct": round(growth * 100, 2) if growth is not None else None,
        "error_count": sum(sum(c.values()) for c in errors.values()),
        "safety_budget_s": budget_s, "safety_budget_held": safety,
        "safety_exit_warnings": int(exit_warn[0]) if exit_warn else None,
        "safety_skill_decisions": skill_lat and int(metric_sum(metrics_end, "incar_skill_latency_seconds_count",
                                                               'skill="safety"') or 0),
        "server_exit_code": exit_code,
    }
    for rpc, values in sorted(stats.latency.items()):   # flat keys: vehicle_getstate_p99_ms, ...
        key = flat_key(rpc)
        result.update({f"{key}_n": len(values), f"{key}_p50_ms": round(percentile(values, 50) * 1e3, 2),
                       f"{key}_p99_ms": round(percentile(values, 99) * 1e3, 2)})
    for name in ("quiet", "hostile"):
        values = plain_latency.get(name, [])
        result.update({f"plain_{name}_n": len(values),
                       f"plain_{name}_errors": len(plain_latency.get(f"{name}_errors", [])),
                       f"plain_{name}_p50_ms": values and round(percentile(values, 50) * 1e3, 2) or None,
                       f"plain_{name}_p99_ms": values and round(percentile(values, 99) * 1e3, 2) or None})
    for rpc, codes in sorted(errors.items()):
        result.update({f"errors_{flat_key(rpc)}_{code.lower()}": n for code, n in codes.items()})
    result.update({flat_key(k): v for k, v in sorted({**stats.counts, **hostile.counts}.items())})
    for sample in stats.error_samples:
        print("error:", sample)
    if args.keep:
        result["workdir"] = str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--fps", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4, help="HMI clients")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before the start memory sample")
    parser.add_argument("--ask-interval", type=float, default=20.0, help="seconds between questions per HMI client")
    parser.add_argument("--safety-budget", type=float, default=0.2, help="safe-exit warning budget, seconds")
    parser.add_argument("--mtls", action="store_true", help="run over mutual TLS with dev-CA certificates per role")
    parser.add_argument("--keep", action="store_true", help="keep the server's data directory and log")
    parser.add_argument("--hostile", action="store_true", help="add the hostile clients (bench/soak_hostile.py)")
    parser.add_argument("--hostile-baseline", type=float, default=20.0, help="seconds of plain-client baseline")
    parser.add_argument("--unread-ack-cameras", type=int, default=2)
    parser.add_argument("--slow-subscribers", type=int, default=4)
    parser.add_argument("--idle-subscribers", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="server config override, passed to incar serve")
    args = parser.parse_args(argv)
    if args.cameras < 0 or args.clients < 0 or args.fps <= 0 or args.minutes <= 0:
        parser.error("--cameras/--clients must be >= 0, --fps and --minutes > 0")
    args.set = [x for item in args.set for x in ("--set", item)]
    result = asyncio.run(run(args))
    for key in sorted(k for k in result if k.endswith("_p50_ms")):
        base = key[:-len("_p50_ms")]
        print(f"{base:32s} n={result.get(base + '_n') or 0:7d}  p50={result[key] or 0:8.2f} ms  "
              f"p99={result[base + '_p99_ms'] or 0:8.2f} ms")
    print(f"server RssAnon+swap: start {result['rss_start_bytes'] / 2**20:.1f} MiB, end "
          f"{result['rss_end_bytes'] / 2**20:.1f} MiB ({result['rss_growth_pct']} %); errors {result['error_count']}; "
          f"safety budget held: {result['safety_budget_held']}; skipped (not mounted): {result['skipped_services']}")
    print(json.dumps(result))
    return 0 if result["error_count"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
