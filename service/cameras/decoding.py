"""Inline images (Ask, Greeter enrolment) decoded off the event loop, bounded in cost and in time.

Cost: `check_image` refuses, from header bytes only and before any decoding, what would be expensive (the pixel
limit, a JPEG scan bomb). Time: the decode runs in a small shared pool, and the caller stops waiting at its
deadline (a decode that has started cannot be interrupted, but the cost bound above caps how long it holds
the thread). A full pool queues new work; a queue longer than MAX_QUEUED is refused as overload.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from incar.v1 import common_pb2
from service.cameras.frames import check_image, decode

DECODE_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))
MAX_QUEUED = 32

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_queued = 0


class DecodeOverloadError(RuntimeError):
    """Too many inline images are waiting to be decoded (RESOURCE_EXHAUSTED)."""


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="image-decode")
        return _pool


async def decode_off_loop(image: common_pb2.Image, max_pixels: int, deadline: float | None = None) -> np.ndarray:
    """BGR uint8 from an inline Image. Raises FrameError (bad input, naming the field), TimeoutError when the
    monotonic `deadline` passes first, DecodeOverloadError when the decode queue is full."""
    global _queued
    spec = check_image(image, max_pixels)        # cheap, on the loop: bad input is refused before queuing
    if _queued >= MAX_QUEUED:
        raise DecodeOverloadError(f"{_queued} images are waiting to be decoded (limit {MAX_QUEUED})")
    _queued += 1
    try:
        future = asyncio.get_running_loop().run_in_executor(_executor(), decode, spec, image.data)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        return await asyncio.wait_for(future, timeout)
    finally:
        _queued -= 1
