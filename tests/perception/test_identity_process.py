"""The identity worker process dies with the service: a service killed outright (kill -9, a crash) never shuts
its pool down, and an orphaned worker holding dlib's models would be left behind after every restart."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT

SERVICE = """
import os, sys, time
import numpy as np
from service.perception.identity_process import ProcessFaceEmbedder
embedder = ProcessFaceEmbedder()
face = np.zeros((120, 120, 3), np.uint8)
embedder.embed(face, (20.0, 20.0, 100.0, 100.0))          # starts the worker and loads dlib there
print(*embedder._pool._processes, flush=True)             # the worker's pid
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:                 # a zombie has exited; only its entry is left
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_the_worker_exits_when_the_service_is_killed():
    service = subprocess.Popen([sys.executable, "-c", SERVICE], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                               stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(service.stdout.readline())
        assert _alive(worker)
        service.send_signal(signal.SIGKILL)
        service.wait(10)
        deadline = time.monotonic() + 15
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), f"identity worker {worker} outlived its killed service"
    finally:
        service.kill()
        if worker is not None and _alive(worker):   # the failure's orphan: not left running after the test
            os.kill(worker, signal.SIGKILL)
