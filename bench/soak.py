"""Load and soak: N cameras streaming frames at M fps, K HMI clients asking, listing and subscribing, and the
vehicle gateway updating state, against `incar serve` on loopback for T minutes.

Reports the server's resident memory (RssAnon + swap, from /proc) at start (after warm-up) and end, p50/p99
client-side latency per RPC, error counts, frame drops, and whether the safety latency budget held (from the
metrics endpoint: `incar_skill_budget_violations_total{skill="safety"}` and the safe-exit warning histogram;
"n/a" when the running build exports neither). Services this build does not mount are skipped and listed.
Last line: JSON.

    .venv/bin/python bench/soak.py                       # the issue's run: 4 cameras x 10 fps, 4 HMI, 30 min
    .venv/bin/python bench/soak.py --minutes 2           # a short run
    .venv/bin/python bench/soak.py --mtls                # same, over mutual TLS with dev-CA certificates
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import cv2
import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402

from incar.v1 import (assistant_pb2, assistant_pb2_grpc, cameras_pb2, cameras_pb2_grpc, common_pb2,  # noqa: E402
                      events_pb2, events_pb2_grpc, system_pb2, system_pb2_grpc, vehicle_pb2, vehicle_pb2_grpc)

IMAGES = [ROOT / "tests" / "perception" / "data"]
CAMERAS = [("front", common_pb2.MOUNT_POSITION_FRONT, common_pb2.CAMERA_ROLE_EXTERIOR),
           ("rear", common_pb2.MOUNT_POSITION_REAR, common_pb2.CAMERA_ROLE_EXTERIOR),
           ("left", common_pb2.MOUNT_POSITION_LEFT, common_pb2.CAMERA_ROLE_EXTERIOR),
           ("cabin", common_pb2.MOUNT_POSITION_CABIN_FRONT, common_pb2.CAMERA_ROLE_CABIN),
           ("right", common_pb2.MOUNT_POSITION_RIGHT, common_pb2.CAMERA_ROLE_EXTERIOR),
           ("cabin-rear", common_pb2.MOUNT_POSITION_CABIN_REAR, common_pb2.CAMERA_ROLE_CABIN)]
QUESTIONS = ["Is anyone in the back seat?", "What is in front of the car?", "Summarise the last events."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_anon_plus_swap(pid: int) -> int:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(fields["RssAnon"].split()[0]) + int(fields.get("VmSwap", "0 kB").split()[0])) * 1024


def jpegs() -> list[bytes]:
    paths = [p for folder in IMAGES if folder.is_dir() for p in sorted(folder.glob("*.jpg"))][:6]
    if not paths:
        raise SystemExit(f"no JPEGs in {' or '.join(map(str, IMAGES))}")
    out = []
    for path in paths:
        image = cv2.resize(cv2.imread(str(path)), (768, 768), interpolation=cv2.INTER_AREA)
        out.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
    return out


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class Stats:
    def __init__(self):
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.counts: dict[str, int] = defaultdict(int)
        self.error_samples: list[str] = []

    def ok(self, rpc: str, seconds: float) -> None:
        self.latency[rpc].append(seconds)

    def error(self, rpc: str, err: BaseException) -> None:
        code = err.code().name if isinstance(err, grpc.aio.AioRpcError) else type(err).__name__
        self.errors[rpc][code] += 1
        if len(self.error_samples) < 10:
            detail = err.details() if isinstance(err, grpc.aio.AioRpcError) else str(err)
            self.error_samples.append(f"{rpc}: {code}: {detail}")


class Server:
    def __init__(self, data_dir: Path, extra: list[str]):
        self.port, self.metrics_port = free_port(), free_port()
        self.log = data_dir.parent / "server.log"
        args = [sys.executable, "-m", "service.cli", "serve", "--listen", f"127.0.0.1:{self.port}",
                "--data-dir", str(data_dir), "--set", f"server.metrics_listen=127.0.0.1:{self.metrics_port}",
                "--set", "server.log_level=warning", *extra]
        self.proc = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def metric_sum(text: str, name: str, labels: str = "") -> float | None:
    """Sum of the samples of `name` whose label set contains `labels` (None when the metric is absent)."""
    total, found = 0.0, False
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([^\s]+)$", text, re.M):
        if labels and labels not in (m.group(1) or ""):
            continue
        total += float(m.group(2))
        found = True
    return total if found else None


def over_budget(text: str, name: str, budget: float) -> tuple[float, float] | None:
    """(observations, observations above `budget`) of a histogram, from its cumulative buckets."""
    count = metric_sum(text, f"{name}_count")
    if count is None:
        return None
    within = 0.0
    for m in re.finditer(rf'^{re.escape(name)}_bucket\{{[^}}]*le="([^"]+)"[^}}]*\}} ([^\s]+)$', text, re.M):
        le = float(m.group(1))
        if le <= budget + 1e-12:
            within = max(within, float(m.group(2)))
    return count, count - within


async def camera_client(channel, stop: asyncio.Event, stats: Stats, name, position, role, fps: float,
                        frames: list[bytes]) -> None:
    stub = cameras_pb2_grpc.CamerasStub(channel)
    sent_at: dict[int, float] = {}
    queue: asyncio.Queue = asyncio.Queue()

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
            except asyncio.TimeoutError:
                pass
    finally:
        sub.cancel()


async def vehicle_gateway(channel, stop: asyncio.Event, stats: Stats) -> None:
    """1 Hz state updates; the car is parked and locks/unlocks every 30 s (events for the subscribers)."""
    stub = vehicle_pb2_grpc.VehicleStub(channel)
    tick = 0
    while not stop.is_set():
        state = vehicle_pb2.VehicleState(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_ON,
                                         battery_percent=80, locked=(tick // 30) % 2 == 1)
        await timed(stats, "Vehicle/UpdateState", stub.UpdateState(state))
        tick += 1
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


async def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="incar-soak-"))
    extra = list(args.set)
    make_channel = lambda target, role: grpc.aio.insecure_channel(target)  # noqa: E731
    if args.mtls:
        from service.security.credentials import channel_credentials
        from service.security.devca import make_dev_pki
        pki = workdir / "pki"
        make_dev_pki(pki)
        extra += ["--set", "security.mode=mtls", "--set", f"security.cert_file={pki / 'server.pem'}",
                  "--set", f"security.key_file={pki / 'server.key'}", "--set", f"security.ca_file={pki / 'ca.pem'}"]

        def make_channel(target, role):
            creds = channel_credentials(pki / "ca.pem", pki / f"{role}.pem", pki / f"{role}.key")
            return grpc.aio.secure_channel(target.replace("127.0.0.1", "localhost"), creds)
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
    tasks.append(asyncio.create_task(vehicle_gateway(vehicle_channel, stop, stats)))

    total = args.minutes * 60
    warmup = min(args.warmup, total / 4)
    await asyncio.sleep(warmup)
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
    await asyncio.wait(tasks, timeout=15)
    for task in tasks:
        task.cancel()
    for ch in cam_channels + hmi_channels + [vehicle_channel, admin]:
        await ch.close()
    exit_code = server.stop()

    # Safety budget: no violations counted during the run, and no safe-exit warning slower than its budget.
    budget_s = args.safety_budget
    v0 = metric_sum(metrics_start, "incar_skill_budget_violations_total", 'skill="safety"')
    v1 = metric_sum(metrics_end, "incar_skill_budget_violations_total", 'skill="safety"')
    exit_warn = over_budget(metrics_end, "incar_safety_exit_warning_latency_seconds", budget_s)
    skill_lat = over_budget(metrics_end, "incar_skill_latency_seconds", 10.0) if metrics_end else None
    if v1 is None and exit_warn is None:
        safety = "n/a"
    else:
        safety = bool((v1 or 0) - (v0 or 0) == 0 and (exit_warn is None or exit_warn[1] == 0))

    latencies = {rpc: {"n": len(v), "p50_ms": round(percentile(v, 50) * 1e3, 2),
                       "p99_ms": round(percentile(v, 99) * 1e3, 2)} for rpc, v in sorted(stats.latency.items())}
    errors = {rpc: dict(codes) for rpc, codes in stats.errors.items()}
    growth = (rss_end - rss_start) / rss_start if rss_start else None
    result = {
        "bench": "soak", "minutes": args.minutes, "cameras": args.cameras if "incar.v1.Cameras" in mounted else 0,
        "fps": args.fps, "hmi_clients": args.clients, "mtls": args.mtls, "skipped_services": skipped,
        "rss_start_bytes": rss_start, "rss_end_bytes": rss_end, "rss_max_bytes": max(samples),
        "rss_growth_pct": round(growth * 100, 2) if growth is not None else None,
        "latency": latencies, "errors": errors, "error_count": sum(sum(c.values()) for c in errors.values()),
        "error_samples": stats.error_samples, "counts": dict(stats.counts),
        "safety_budget_s": budget_s, "safety_budget_held": safety,
        "safety_exit_warnings": int(exit_warn[0]) if exit_warn else None,
        "safety_skill_decisions": skill_lat and int(metric_sum(metrics_end, "incar_skill_latency_seconds_count",
                                                               'skill="safety"') or 0),
        "server_exit_code": exit_code,
    }
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
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="server config override, passed to incar serve")
    args = parser.parse_args(argv)
    if args.cameras < 0 or args.clients < 0 or args.fps <= 0 or args.minutes <= 0:
        parser.error("--cameras/--clients must be >= 0, --fps and --minutes > 0")
    args.set = [x for item in args.set for x in ("--set", item)]
    result = asyncio.run(run(args))
    for rpc, figures in result["latency"].items():
        print(f"{rpc:32s} n={figures['n']:7d}  p50={figures['p50_ms']:8.2f} ms  p99={figures['p99_ms']:8.2f} ms")
    print(f"server RssAnon+swap: start {result['rss_start_bytes'] / 2**20:.1f} MiB, end "
          f"{result['rss_end_bytes'] / 2**20:.1f} MiB ({result['rss_growth_pct']} %); errors {result['error_count']}; "
          f"safety budget held: {result['safety_budget_held']}; skipped (not mounted): {result['skipped_services']}")
    print(json.dumps(result))
    return 0 if result["error_count"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
