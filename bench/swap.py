"""Hot swap cost: Ask latency (end to end, short answers, `--clients` asking without pause) while nothing happens,
against the same while `Models.SwapBundle` loads a second copy of the default bundle beside the running one, checks
it and switches, in the same run. Also the swap's own load time, failed requests and NOT_SERVING health answers
seen (both should be 0). Last line: JSON.

    .venv/bin/python bench/swap.py [--clients 2] [--steady 20]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from incar.v1 import assistant_pb2, assistant_pb2_grpc, models_pb2, models_pb2_grpc  # noqa: E402
from service.config import load_config  # noqa: E402
from service.server import Application  # noqa: E402
from tests.conftest import base_overrides  # noqa: E402
from tests.signing.bundles import bundle_copy  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--steady", type=int, default=20, help="answers measured before the swap")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="incar-bench-swap-"))
    second = bundle_copy(work / "second", name="second-bundle")
    app = Application(load_config(env={}, overrides=base_overrides(work)))
    await app.start()
    await app.ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    assistant, health = assistant_pb2_grpc.AssistantStub(channel), health_pb2_grpc.HealthStub(channel)
    phase = "steady"
    latencies: dict[str, list[float]] = {"steady": [], "swap": [], "after": []}
    failures, not_serving, stop = [], 0, asyncio.Event()

    async def ask(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            started, began_in = time.perf_counter(), phase
            try:
                async for _ in assistant.Ask(assistant_pb2.AskRequest(question=f"Say hello ({worker}.{n})",
                                                                      max_tokens=16), timeout=300):
                    pass
                # A request that overlapped the swap in any way counts as "during the swap".
                latencies["swap" if "swap" in (began_in, phase) else phase].append(time.perf_counter() - started)
            except grpc.aio.AioRpcError as exc:
                failures.append(exc.code().name)

    async def watch() -> None:
        nonlocal not_serving
        while not stop.is_set():
            reply = await health.Check(health_pb2.HealthCheckRequest(service="incar.v1.Assistant"))
            not_serving += reply.status != health_pb2.HealthCheckResponse.SERVING
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(ask(i)) for i in range(args.clients)] + [asyncio.create_task(watch())]
    while len(latencies["steady"]) < args.steady:
        await asyncio.sleep(0.05)
    phase = "swap"
    began = time.perf_counter()
    reply = await models_pb2_grpc.ModelsStub(channel).SwapBundle(models_pb2.SwapBundleRequest(bundle_path=str(second)))
    swap_s = time.perf_counter() - began
    phase = "after"
    while len(latencies["after"]) < args.clients * 2:
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()
    await app.stop(0.5)
    steady, during = latencies["steady"], latencies["swap"]
    print(f"steady: {len(steady)} answers, p50 {statistics.median(steady):.3f} s, p95 {percentile(steady, 0.95):.3f} s")
    print(f"during the swap ({swap_s:.1f} s, of which loading {reply.load_seconds:.1f} s): {len(during)} answers, "
          f"p50 {statistics.median(during):.3f} s, p95 {percentile(during, 0.95):.3f} s")
    print(f"failed requests {len(failures)}, NOT_SERVING health answers {not_serving}; now {reply.now.model}")
    print(json.dumps({"bench": "swap", "clients": args.clients, "swap_s": round(swap_s, 3),
                      "swap_load_s": round(reply.load_seconds, 3), "steady_p50_s": round(statistics.median(steady), 4),
                      "during_swap_p50_s": round(statistics.median(during), 4),
                      "during_vs_steady_p50_ratio": round(statistics.median(during) / statistics.median(steady), 3),
                      "steady_p95_s": round(percentile(steady, 0.95), 4),
                      "during_swap_p95_s": round(percentile(during, 0.95), 4),
                      "failed_requests": len(failures), "not_serving_seen": not_serving}))


if __name__ == "__main__":
    asyncio.run(main())
