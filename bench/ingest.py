"""Camera ingest throughput: frames per second through Cameras.StreamFrames (gRPC, header check, decode in the
hub's pool, resize, ring buffer, ack) for 768x768 JPEGs, against bare OpenCV decode of the same bytes in the
same run. The server runs in a subprocess (as a camera process would talk to the service); the client keeps
`--window` frames in flight, sending the next as each ack arrives. Rounds alternate decode and ingest so
noise from other load hits both: each ingest round is compared with the bare decode measured just before and
after it, and the median of those ratios is reported. Target: ratio >= 0.8. Last line: JSON.

    .venv/bin/python bench/ingest.py [--frames 300] [--rounds 5] [--window 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGES = ROOT / "deploy" / "sim" / "images"   # the repository's photo set (sources in its README)
MAX_MESSAGE = 8 * 1024 * 1024


def model_sized_jpegs(quality: int = 90) -> list[bytes]:
    out = []
    for path in sorted(IMAGES.glob("*.jpg")):
        image = cv2.resize(cv2.imread(str(path)), (768, 768), interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        out.append(data.tobytes())
    if not out:
        raise SystemExit(f"no JPEGs in {IMAGES}")
    return out


def bare_decode_fps(jpegs: list[bytes], frames: int) -> float:
    from service.cameras.frames import IMREAD_FLAGS   # the same flags the hub decodes with
    buffers = [np.frombuffer(j, np.uint8) for j in jpegs]
    cv2.imdecode(buffers[0], IMREAD_FLAGS)   # warm-up
    start = time.perf_counter()
    for i in range(frames):
        image = cv2.imdecode(buffers[i % len(buffers)], IMREAD_FLAGS)
        assert image is not None
    return frames / (time.perf_counter() - start)


async def serve(port_file: Path) -> None:
    import grpc
    from service.cameras.config import CamerasConfig
    from service.cameras.hub import CameraHub
    from service.cameras.servicer import add_to_server
    hub = CameraHub(CamerasConfig(max_stream_fps=10_000))   # the pipeline's capacity, not the per-stream pace
    await hub.start()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
    add_to_server(hub, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


async def ingest_fps(target: str, jpegs: list[bytes], frames: int, window: int, camera_id: str) -> dict:
    import grpc
    from incar.v1 import cameras_pb2, cameras_pb2_grpc, common_pb2
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", MAX_MESSAGE)]) as channel:
        stub = cameras_pb2_grpc.CamerasStub(channel)
        credits = asyncio.Semaphore(window)
        sent_at: dict[int, float] = {}

        async def requests():
            for sequence in range(1, frames + 1):
                await credits.acquire()
                frame = cameras_pb2.Frame(
                    camera_id=camera_id, role=common_pb2.CAMERA_ROLE_CABIN,
                    position=common_pb2.MOUNT_POSITION_CABIN_FRONT, sequence=sequence,
                    image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG, width=768, height=768,
                                           data=jpegs[sequence % len(jpegs)]))
                now = time.time()
                frame.capture_time.FromNanoseconds(int(now * 1e9))
                sent_at[sequence] = time.perf_counter()
                yield frame

        accepted = dropped = 0
        latencies = []
        start = time.perf_counter()
        async for ack in stub.StreamFrames(requests()):
            latencies.append(time.perf_counter() - sent_at.pop(ack.sequence))
            if ack.accepted:
                accepted += 1
            else:
                dropped += 1
            credits.release()
        elapsed = time.perf_counter() - start
    return {"fps": accepted / elapsed, "accepted": accepted, "dropped": dropped,
            "ack_latency_ms_median": 1000 * statistics.median(latencies)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=int, default=2, help="frames in flight (1 decoding + 1 waiting by default)")
    parser.add_argument("--serve", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(Path(args.serve)))
        return 0

    jpegs = model_sized_jpegs()
    port_file = ROOT / "build" / f"bench-ingest-{os.getpid()}.port"
    port_file.parent.mkdir(exist_ok=True)
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)], cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench server did not start")
            time.sleep(0.1)
        target = f"127.0.0.1:{port_file.read_text()}"
        asyncio.run(ingest_fps(target, jpegs, 30, args.window, "warmup"))
        decode, ingest, ratios = [], [], []
        before = bare_decode_fps(jpegs, args.frames)
        for round_ in range(args.rounds):
            result = asyncio.run(ingest_fps(target, jpegs, args.frames, args.window, f"bench{round_}"))
            after = bare_decode_fps(jpegs, args.frames)
            # the baseline around each ingest round: load from elsewhere hits both sides of the ratio alike
            baseline = (before + after) / 2
            decode.append(baseline)
            ingest.append(result)
            ratios.append(result["fps"] / baseline)
            print(f"round {round_ + 1}: bare decode {baseline:7.1f} fps   gRPC ingest {result['fps']:7.1f} fps   "
                  f"ratio {ratios[-1]:.3f}   (dropped {result['dropped']}, ack latency median "
                  f"{result['ack_latency_ms_median']:.2f} ms)")
            before = after
    finally:
        server.terminate()
        server.wait(10)
        port_file.unlink(missing_ok=True)
    decode_fps = statistics.median(decode)
    ingest_fps_ = statistics.median(r["fps"] for r in ingest)
    ratio = statistics.median(ratios)
    print(f"768x768 JPEG, {len(jpegs)} images, {args.frames} frames x {args.rounds} rounds, window {args.window}")
    print(f"bare OpenCV decode: {decode_fps:.1f} fps")
    print(f"gRPC ingest:        {ingest_fps_:.1f} fps")
    print(f"ratio:              {ratio:.3f} (median of the per-round ratios; target >= 0.8)")
    print(f"load average:       {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(json.dumps({"bench": "ingest", "decode_fps": round(decode_fps, 1), "ingest_fps": round(ingest_fps_, 1),
                      "ratio": round(ratio, 3), "target_ratio": 0.8, "frames": args.frames, "rounds": args.rounds,
                      "window": args.window, "dropped": sum(r["dropped"] for r in ingest),
                      "ack_latency_ms_median": round(statistics.median(r["ack_latency_ms_median"] for r in ingest), 2),
                      "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
                      "cpu_count": os.cpu_count(),
                      "load_average_1m": round(os.getloadavg()[0], 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
