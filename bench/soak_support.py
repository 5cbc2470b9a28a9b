"""Helpers for bench/soak.py: the server subprocess, memory samples, latency stats, metrics parsing."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections import defaultdict
from pathlib import Path

import cv2
import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGES = [ROOT / "deploy" / "sim" / "images"]   # the repository's photo set (sources in its README)


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


def flat_key(text: str) -> str:
    """'Vehicle/GetState' -> 'vehicle_getstate' (the JSON line has flat keys)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
