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

import grpc
import numpy as np

from incar.v1 import common_pb2
from service.cameras.frames import FrameError, check_image, decode

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


async def decode_for_call(image: common_pb2.Image, max_pixels: int, context, field: str,
                          max_bytes: int | None = None) -> np.ndarray:
    """An RPC's inline image (`field` names it: "image", "images[2]"), decoded off the loop within the call's
    deadline; a bad or oversized image, a passed deadline or a full decode queue aborts the call with
    INVALID_ARGUMENT, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED and a message naming the field."""
    if max_bytes is not None and len(image.data) > max_bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{field}: {len(image.data)} bytes, the limit is {max_bytes}")
    remaining = context.time_remaining()
    try:
        return await decode_off_loop(image, max_pixels, None if remaining is None else time.monotonic() + remaining)
    except FrameError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}.{exc}")
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{field}: deadline passed while decoding")
    except DecodeOverloadError as exc:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{field}: {exc}")
