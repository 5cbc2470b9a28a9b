"""One camera's decode lane: frames waiting for decode, decoded in order in the hub's thread pool.

The pool thread takes the next waiting frame itself when it finishes one (no trip through the event loop
between two decodes, which made ingest wait on a busy loop), and hands each result to the loop with one
call_soon_threadsafe. For fairness a lane decodes one frame per pool task and queues itself again behind the
other cameras' lanes. Latest-wins: beyond max_pending frames the oldest waiting one is replaced (OVERLOAD).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.cameras.frames import FrameError, ImageSpec, decode_and_resize, resize_for_model


@dataclass
class PendingFrame:
    capture_time: float
    received_time: float
    sequence: int
    future: asyncio.Future
    spec: ImageSpec | None = None
    data: bytes = b""
    decoded: np.ndarray | None = None   # from OpenCV sources: already BGR


# on_done(item, (original, image) or None, FrameError or None, decode seconds), called on the event loop
Done = Callable[[PendingFrame, tuple[np.ndarray, np.ndarray] | None, FrameError | None, float], None]


class DecodeLane:
    def __init__(self, max_pending: int, model_size: int):
        self.max_pending = max_pending
        self.model_size = model_size
        self._pending: deque[PendingFrame] = deque()
        self._lock = threading.Lock()
        self._current: PendingFrame | None = None   # being decoded (claimed from the queue)

    def __len__(self) -> int:
        """Frames waiting (not counting the one being decoded)."""
        return len(self._pending)

    @property
    def idle(self) -> bool:
        return self._current is None and not self._pending

    def offer(self, item: PendingFrame, pool: Executor, loop: asyncio.AbstractEventLoop,
              on_done: Done) -> list[PendingFrame]:
        """Queue `item`; returns the waiting frames it replaced (to be answered OVERLOAD)."""
        replaced = []
        with self._lock:
            while len(self._pending) >= self.max_pending:
                replaced.append(self._pending.popleft())
            self._pending.append(item)
            first = None if self._current is not None else self._pending.popleft()
            self._current = self._current or first
        if first is not None:
            pool.submit(self._run, first, pool, loop, on_done)
        return replaced

    def drain(self) -> list[PendingFrame]:
        """Take every waiting frame and the one being decoded (stop, forget); a late result is ignored."""
        with self._lock:
            items = ([self._current] if self._current is not None else []) + list(self._pending)
            self._pending.clear()
            self._current = None
        return items

    def _run(self, item: PendingFrame, pool: Executor, loop: asyncio.AbstractEventLoop, on_done: Done) -> None:
        started = time.perf_counter()
        result, error = None, None
        try:
            if item.decoded is not None:
                result = item.decoded, resize_for_model(item.decoded, self.model_size)
            else:
                result = decode_and_resize(item.spec, item.data, self.model_size)
        except FrameError as exc:
            error = exc
        except Exception as exc:   # an OpenCV failure on hostile data is bad input, not a server fault
            error = FrameError("image.data", f"could not be decoded ({exc.__class__.__name__})")
        elapsed = time.perf_counter() - started
        with self._lock:   # claim the next frame before reporting, so a frame sent on this ack does not replace it
            following = self._pending.popleft() if self._pending and self._current is item else None
            if self._current is item:
                self._current = following
        try:
            loop.call_soon_threadsafe(on_done, item, result, error, elapsed)
            if following is not None:
                pool.submit(self._run, following, pool, loop, on_done)   # behind the other lanes' work
        except RuntimeError:   # the loop is closed or the pool shut down: the hub has stopped
            with self._lock:
                self._current = None
