"""Shared test helpers: free ports, an in-process server, an `incar serve` subprocess."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "deploy" / "sim" / "images"   # the repository's real photos, with sources in its README
DATA = ROOT / "tests" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_overrides(tmp_path: Path) -> list[str]:
    return [f"server.listen=127.0.0.1:{free_port()}", "server.metrics_listen=127.0.0.1:0",
            f"server.data_dir={tmp_path / 'data'}", "server.log_format=console", "server.log_level=warning"]


class ServerProcess:
    """`incar serve` in a subprocess, for tests that kill or restart the process."""

    def __init__(self, tmp_path: Path, extra: list[str] = ()):
        self.port = free_port()
        self.data_dir = tmp_path / "data"
        self.args = [sys.executable, "-m", "service.cli", "serve", "--listen", f"127.0.0.1:{self.port}",
                     "--data-dir", str(self.data_dir), "--set", "server.metrics_listen=127.0.0.1:0",
                     "--set", "server.log_level=warning", *extra]
        self.log = tmp_path / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        import grpc
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    return self
                except grpc.RpcError:
                    time.sleep(0.2)
        raise RuntimeError(f"server did not start in {timeout}s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout)


@pytest.fixture
def server_process(tmp_path):
    started: list[ServerProcess] = []

    def make(extra: list[str] = ()) -> ServerProcess:
        proc = ServerProcess(tmp_path, extra)
        started.append(proc)
        return proc
    yield make
    for proc in started:
        proc.kill()
