"""Thread priority for Safety's analysis on a CPU host: its worker runs above the process's other threads.

On the CPU backend the language model, the general analysis lane and Safety's lane compete for the same few
cores; at equal priority a safe-exit frame's detector run took several times its CPU time. Linux keeps a nice
value per thread (setpriority on the thread id), and a thread inherits the nice value of the thread that
creates it, so the ONNX Runtime sessions the safety lane opens on its own thread get intra-op pool threads as
favoured as the lane itself. The camera decode threads are raised the same way, since every lane waits for
its frame's decode.

Safety is raised rather than the rest lowered: lowered threads lose to every normal-priority thread of the
machine, not only to Safety (a simulator or an HMI in the same session starved the lowered general lane, and
the parking sign was never read). Raising needs CAP_SYS_NICE or an RLIMIT_NICE allowance (systemd: LimitNICE=,
containers: cap_add SYS_NICE); without it the lane runs at the process's priority and says so once.
"""
from __future__ import annotations

import os
import sys
import threading

import structlog
from prometheus_client import Gauge

log = structlog.get_logger(__name__)

# Nice steps above the process: a CFS weight ~3x the process's own, so a runnable safety thread gets ~75 % of
# a core it shares with one normal thread. Not more: when the lane alone fills what the process gets (a shared
# host), a bigger boost leaves the model and the general lane almost nothing; 5 and 10 gave the same safe-exit
# p95 within this shared machine's noise (bench/safety.py, 0.09-0.15 s at load 11).
SAFETY_BOOST = 5
RAISED = Gauge("incar_safety_threads_raised", "Threads running above the process's priority (the safety lane)")
_refused_once = threading.Event()


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "setpriority")


def nice_of(native_id: int | None = None) -> int | None:
    """The nice value of a thread (default: the calling one); None where unsupported."""
    if not supported():
        return None
    return os.getpriority(os.PRIO_PROCESS, native_id or threading.get_native_id())


def raise_current_thread(by: int = SAFETY_BOOST) -> bool:
    """For a worker thread's initializer: this thread, and the threads it starts, run `by` nice steps above
    the process (capped at -20); False where not permitted or unsupported (the thread keeps its priority)."""
    if not supported() or by <= 0:
        return False
    native_id = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, native_id)
        os.setpriority(os.PRIO_PROCESS, native_id, max(-20, current - by))
    except OSError as exc:   # EACCES/EPERM without CAP_SYS_NICE: run on at the process's priority
        if not _refused_once.is_set():
            _refused_once.set()
            log.warning("thread_priority.not_raised", error=str(exc),
                        hint="grant CAP_SYS_NICE or an RLIMIT_NICE allowance for the safety lane's priority")
        return False
    RAISED.inc()
    return True
