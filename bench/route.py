"""Routing: does the question reach the right tool? The model router (both choice modes) against the keyword
router, on the same questions (tests/data/routing.jsonl: paraphrases, odd word orders, near-miss distractors).

Prints per-router accuracy, routing latency p50/p95 and the misrouted questions, then one JSON line.
Target: model router accuracy >= 0.90, latency p95 <= 150 ms on the CPU default bundle.

    .venv/bin/python bench/route.py [--bundle DIR] [--modes greedy,likelihood] [--threads N]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.runtime.bundle import load_bundle  # noqa: E402
from service.runtime.generator import LanguageModel  # noqa: E402
from service.runtime.scheduler import NpuScheduler  # noqa: E402
from service.runtime.tool_choice import ToolChooser  # noqa: E402
from skills.router import route_tool  # noqa: E402
from skills.tools import EXAMPLES, SPECS  # noqa: E402

DATA = ROOT / "tests" / "data" / "routing.jsonl"


def load_cases(path: Path = DATA) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score(cases: list[dict], chosen: list[str]) -> tuple[float, list[str]]:
    wrong = [f"{c['question']!r}: expected {c['tool']}, got {got}" for c, got in zip(cases, chosen)
             if got != c["tool"]]
    return 1 - len(wrong) / len(cases), wrong


async def model_router(model, mode: str, cases: list[dict]) -> tuple[list[str], list[float], float, int]:
    scheduler = NpuScheduler()
    try:
        chooser = ToolChooser(model, scheduler, SPECS, EXAMPLES, mode=mode)
        t0 = time.perf_counter()
        await chooser.prepare()
        prepare_s = time.perf_counter() - t0
        chosen, seconds = [], []
        for case in cases:
            choice = await chooser.choose(case["question"])
            chosen.append(choice.call.name)
            seconds.append(choice.seconds)
        return chosen, seconds, prepare_s, chooser.prefix_tokens
    finally:
        scheduler.close()


def keyword_router(cases: list[dict]) -> tuple[list[str], list[float]]:
    chosen, seconds = [], []
    for case in cases:
        t0 = time.perf_counter()
        found = route_tool(case["question"])
        seconds.append(time.perf_counter() - t0)
        chosen.append(found[0] if found else "none")
    return chosen, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(ROOT / "build" / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--modes", default="nearest,greedy")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions (a quick look)")
    args = parser.parse_args()
    cases = load_cases()[: args.limit or None]
    model = LanguageModel(load_bundle(args.bundle), "cpu", threads=args.threads or None)
    out: dict[str, object] = {"bench": "route", "questions": len(cases), "bundle": Path(args.bundle).name,
                              "variant": model.variant}

    chosen, seconds = keyword_router(cases)
    acc, wrong = score(cases, chosen)
    print(f"keywords    accuracy {acc:.3f}  p95 {np.percentile(seconds, 95) * 1e3:.2f} ms")
    for w in wrong:
        print("   ", w)
    out.update(keyword_accuracy=round(acc, 4), keyword_p95_ms=round(float(np.percentile(seconds, 95)) * 1e3, 3))

    for mode in [m for m in args.modes.split(",") if m]:
        chosen, seconds, prepare_s, prefix = asyncio.run(model_router(model, mode, cases))
        acc, wrong = score(cases, chosen)
        p50, p95 = (float(np.percentile(seconds, q)) * 1e3 for q in (50, 95))
        print(f"model/{mode:<10} accuracy {acc:.3f}  p50 {p50:.0f} ms  p95 {p95:.0f} ms  "
              f"(prefix {prefix} tokens prefilled once in {prepare_s:.1f} s)")
        for w in wrong:
            print("   ", w)
        out.update({f"model_{mode}_accuracy": round(acc, 4), f"model_{mode}_p50_ms": round(p50, 1),
                    f"model_{mode}_p95_ms": round(p95, 1), f"model_{mode}_prepare_s": round(prepare_s, 2),
                    f"model_{mode}_prefix_tokens": prefix})
    accs = [v for k, v in out.items() if k.startswith("model_") and k.endswith("_accuracy")]
    if accs:
        out["model_vs_keyword_accuracy"] = round(max(accs) - out["keyword_accuracy"], 4)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
