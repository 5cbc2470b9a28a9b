"""Thread priority for Safety's analysis on a CPU host: its worker runs above the process's other threads.

On the CPU backend the language model, the general analysis lane and Safety's lane compete for the same few
cores; at equal priority a safe-exit frame's detector run took several times its CPU time. Linux keeps a nice
value per thread (setpriority on the thread id), and a thread inherits the nice value of the thread that
creates it, so the ONNX Runtime sessions the safety lane opens on its own thread get intra-op pool threads as
favoured as the lane itself. The camera decode threads are raised the same way, since every lane waits for
its frame's decode.

Safety is raised rather than the rest lowered: lowered threads lose to every normal-priority thread of the
machine, not only to Safety (a simulator or an HMI in the same session starved the lowered general lane, and
the parking sign was never read).

Where permitted the raise is real-time: SCHED_FIFO at the lowest real-time priority (REALTIME_PRIORITY), above
every normal thread of the machine and below the kernel's own. A nice raise only weights a thread's share of
the CPU: with the language model's threads runnable, a 2-thread int8 detector run took ~23 ms for ~10 ms of
CPU, and decoding a frame ~9 ms for ~2.5 (bench/safety.py, load 5-10); under SCHED_FIFO both take their CPU
time. This is safe because the raised work is bounded by the cameras' frame rates (the lanes keep the newest
frame per camera; no thread spins: ONNX Runtime's pools block, `providers.session_options`), and the kernel's
real-time throttling (sched_rt_runtime_us, 95 % by default) leaves the rest of the machine a share even if it
were not. Threads a raised thread starts inherit its policy (ONNX Runtime's pool threads, wanted); a shared
model the lane opens is opened `at_process_priority()`, and a worker process spawned from a raised thread
resets itself (`reset_inherited_priority`), so neither OCR's pools nor dlib's worker run real-time.

Real-time needs CAP_SYS_NICE or an RLIMIT_RTPRIO allowance (systemd: LimitRTPRIO=, compose: ulimits rtprio);
without it the thread is raised SAFETY_BOOST nice steps instead (CAP_SYS_NICE or RLIMIT_NICE: systemd
LimitNICE=, compose ulimits nice), and without that it runs at the process's priority; each refusal is logged
once.
"""
from __future__ import annotations

import contextlib
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
REALTIME_PRIORITY = 1     # SCHED_FIFO's lowest: above every normal thread, below anything else real-time
RAISED = Gauge("incar_safety_threads_raised", "Threads running above the process's priority (the safety lane)",
               ["how"])
_refused_once = {"realtime": threading.Event(), "nice": threading.Event()}
_realtime = {"on": True}


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "setpriority")


def nice_of(native_id: int | None = None) -> int | None:
    """The nice value of a thread (default: the calling one); None where unsupported."""
    if not supported():
        return None
    return os.getpriority(os.PRIO_PROCESS, native_id or threading.get_native_id())


def use_realtime(on: bool) -> None:
    """Whether `raise_current_thread` tries SCHED_FIFO first (default) or only the nice raise."""
    _realtime["on"] = on


def realtime_of(native_id: int | None = None) -> bool:
    """Whether a thread (default: the calling one) runs under a real-time policy."""
    if not hasattr(os, "sched_getscheduler"):
        return False
    return os.sched_getscheduler(native_id or threading.get_native_id()) in (os.SCHED_FIFO, os.SCHED_RR)


def _refused(how: str, exc: OSError, hint: str) -> None:
    if not _refused_once[how].is_set():
        _refused_once[how].set()
        log.warning(f"thread_priority.{how}_refused", error=str(exc), hint=hint)


def raise_current_thread(by: int = SAFETY_BOOST) -> bool:
    """For a worker thread's initializer: this thread, and the threads it starts, run real-time (SCHED_FIFO at
    REALTIME_PRIORITY) or, where that is refused, `by` nice steps above the process (capped at -20); False
    where neither is permitted or supported (the thread keeps its priority)."""
    if not supported() or by <= 0:
        return False
    native_id = threading.get_native_id()
    if _realtime["on"] and hasattr(os, "sched_setscheduler"):
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))   # 0: this thread
            RAISED.labels("realtime").inc()
            return True
        except OSError as exc:   # EPERM without CAP_SYS_NICE / RLIMIT_RTPRIO: try the nice raise
            _refused("realtime", exc, "grant CAP_SYS_NICE or an RLIMIT_RTPRIO allowance for the safety lane")
    try:
        current = os.getpriority(os.PRIO_PROCESS, native_id)
        os.setpriority(os.PRIO_PROCESS, native_id, max(-20, current - by))
    except OSError as exc:   # EACCES/EPERM without CAP_SYS_NICE: run on at the process's priority
        _refused("nice", exc, "grant CAP_SYS_NICE or an RLIMIT_NICE allowance for the safety lane's priority")
        return False
    RAISED.labels("nice").inc()
    return True


def _set(native_id: int, policy: int, rt_priority: int, nice: int) -> None:
    os.sched_setscheduler(native_id, policy, os.sched_param(rt_priority))
    os.setpriority(os.PRIO_PROCESS, native_id, nice)


@contextlib.contextmanager
def at_process_priority():
    """Run a block on the calling thread at the process's own priority (normal policy, the main thread's nice),
    then put the thread's priority back: for opening a shared model from a raised thread, so that the model's
    pool threads are not raised with it. A no-op where unsupported or where the thread is not raised."""
    if not supported() or not hasattr(os, "sched_getscheduler"):
        yield
        return
    native_id = threading.get_native_id()
    policy, param = os.sched_getscheduler(native_id), os.sched_getparam(native_id)
    nice, base = os.getpriority(os.PRIO_PROCESS, native_id), os.getpriority(os.PRIO_PROCESS, os.getpid())
    if policy == os.SCHED_OTHER and nice == base:
        yield
        return
    _set(native_id, os.SCHED_OTHER, 0, base)   # lowering needs no privilege
    try:
        yield
    finally:
        try:
            _set(native_id, policy, param.sched_priority, nice)
        except OSError as exc:   # permitted a moment ago; if no longer, the thread stays at the process's
            _refused("realtime", exc, "the safety lane lost its priority")


def reset_inherited_priority(parent_pid: int) -> None:
    """For a worker process spawned from a raised thread (it inherits that thread's policy and nice value):
    run at the normal policy and its parent's main-thread nice, as if started by the parent's main thread."""
    if not supported() or not hasattr(os, "sched_setscheduler"):
        return
    try:
        base = os.getpriority(os.PRIO_PROCESS, parent_pid)
        _set(0, os.SCHED_OTHER, 0, max(base, os.getpriority(os.PRIO_PROCESS, 0)))
    except OSError as exc:   # the parent is gone: keep what was inherited, the worker exits with it
        log.info("thread_priority.reset_failed", error=str(exc))
