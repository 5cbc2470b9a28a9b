"""Thread priorities on a CPU host, so a safety decision preempts the slower work sharing the cores.

On the CPU backend the language model, the general analysis lane and Safety's lane all compete for the same
few cores; with equal priorities a safe-exit frame's detector run took several times its CPU time. Linux keeps a
nice value per thread (setpriority on the thread id), and a thread inherits the nice value of the thread that
creates it, so ONNX Runtime's intra-op pool threads are as nice as the thread that opened the session, and a
spawned worker process is as nice as the thread that started it. An unprivileged process can raise its threads'
nice values but never lower them again, so the scheme lowers what is slower and leaves Safety at the process's
own priority: `lower_current_thread()` in a worker thread, `call_in_background_thread(open_session)` so a
session's pool threads start lowered. Elsewhere (no per-thread nice) these do nothing and say so.
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import structlog
from prometheus_client import Gauge

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Nice steps below the process's priority: CFS weights at +10 are about a tenth of the process's own, so a
# runnable safety thread gets ~90 % of a core it shares with one background thread.
BACKGROUND_NICE = 10
LOWERED = Gauge("incar_background_threads", "Threads running below the process's priority (model, general lane)")


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "setpriority")


def lower_thread(native_id: int, by: int = BACKGROUND_NICE) -> bool:
    """Raise one thread's nice value by `by` (capped at 19); False where the platform cannot."""
    if not supported() or by <= 0:
        return False
    try:
        current = os.getpriority(os.PRIO_PROCESS, native_id)
        os.setpriority(os.PRIO_PROCESS, native_id, min(19, current + by))
    except OSError as exc:       # the thread is gone, or a sandbox forbids it: run on at the same priority
        log.warning("thread_priority.not_lowered", native_id=native_id, error=str(exc))
        return False
    LOWERED.inc()
    return True


def lower_current_thread(by: int = BACKGROUND_NICE) -> bool:
    """For a worker thread's initializer: this thread, and the threads and processes it starts, run lowered."""
    return lower_thread(threading.get_native_id(), by)


def nice_of(native_id: int | None = None) -> int | None:
    """The nice value of a thread (default: the calling one); None where unsupported."""
    if not supported():
        return None
    return os.getpriority(os.PRIO_PROCESS, native_id or threading.get_native_id())


def call_in_background_thread(fn: Callable[[], T], by: int = BACKGROUND_NICE) -> T:
    """Run `fn` on a short-lived lowered thread and return its result (or raise its exception): the threads it
    creates, such as an ONNX Runtime session's intra-op pool, inherit the lowered priority."""
    result: list = []

    def run() -> None:
        lower_current_thread(by)
        try:
            result.append((True, fn()))
        except BaseException as exc:  # re-raised in the caller
            result.append((False, exc))

    worker = threading.Thread(target=run, name="background-open", daemon=True)
    worker.start()
    worker.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value
