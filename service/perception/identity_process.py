"""Face identity in a child process, for the service.

dlib's descriptor holds the GIL for its whole ~0.3 s, so run in a thread it still stalls the asyncio loop and
every other thread (measured: 0.6 s loop lag per enrolment). In a process it costs the service one pickled
frame per call and nothing else; the process loads dlib's models once, when first used.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
import time
from dataclasses import replace

import numpy as np

from service.perception.identity import FaceEmbedder, IdentityConfig
from service.perception.types import Box
from service.thread_priority import reset_inherited_priority

_embedder: FaceEmbedder | None = None


def _start(config: IdentityConfig | None, parent_pid: int) -> None:
    global _embedder
    reset_inherited_priority(parent_pid)   # spawned from whichever thread asked first, maybe the safety lane's
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="exit-with-parent", daemon=True).start()
    _embedder = FaceEmbedder(config)


def _exit_with_parent(parent_pid: int, period_s: float = 1.0) -> None:
    """A service killed outright (kill -9, a crash) never shuts its pool down: its worker would live on as an
    orphan holding dlib's models (~130 MB), one more after every restart. It ends when its parent is gone."""
    while os.getppid() == parent_pid:
        time.sleep(period_s)
    os._exit(0)


def _embed_all(bgr: np.ndarray, boxes: list[Box]) -> list[np.ndarray]:
    return [_embedder.embed(bgr, box) for box in boxes]


class ProcessFaceEmbedder:
    """`FaceEmbedder`'s interface (`embed`, `embed_faces`), computed in one worker process."""

    def __init__(self, config: IdentityConfig | None = None):
        self.config = config or IdentityConfig()
        self.config.validate()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _worker(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: the parent runs gRPC and ONNX Runtime threads that a fork would copy mid-state.
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
                    initargs=(self.config, os.getpid()))
            return self._pool

    def embed(self, bgr: np.ndarray, box: Box) -> np.ndarray:
        return self._worker().submit(_embed_all, bgr, [box]).result()[0]

    def embed_faces(self, bgr: np.ndarray, faces) -> list:
        faces = list(faces)
        if not faces:
            return []
        embeddings = self._worker().submit(_embed_all, bgr, [f.box for f in faces]).result()
        return [replace(f, embedding=e) for f, e in zip(faces, embeddings)]

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
