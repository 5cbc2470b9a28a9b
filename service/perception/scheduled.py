"""Perception on the one NPU: on a QNN backend the detectors' sessions run through the NPU scheduler.

The HTP is one resource. When perception runs on it beside the language model, each detector run is a step on
the scheduler's executor, ranked by the frame's job class: a Safety-lane frame (`JobClass.CRITICAL`) goes
before a chat answer's next decode step, and no two sessions interleave on the NPU. On the CPU backend the
detectors keep their own threads (the CPU EP has cores to share, and the scheduler's one executor would only
serialise them).

The job class of a run comes from the calling thread: `Cascade.analyze(..., job=...)` sets it for the
analysis it runs; single-image callers (enrolment, sign reading, image descriptions) get `INTERACTIVE`.
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager

import onnxruntime as ort

from service.runtime.scheduler import JobClass, NpuScheduler

_current = threading.local()


@contextmanager
def job_class(job: JobClass):
    """The job class of the perception runs this thread makes inside the block."""
    previous = getattr(_current, "job", None)
    _current.job = job
    try:
        yield
    finally:
        _current.job = previous


def current_job_class() -> JobClass:
    return getattr(_current, "job", None) or JobClass.INTERACTIVE


class ScheduledSession:
    """An ONNX Runtime session whose `run` is a scheduler step; everything else is the session's own."""

    def __init__(self, session: ort.InferenceSession, scheduler: NpuScheduler, name: str):
        self._session = session
        self._scheduler = scheduler
        self._kind = f"perception.{name}"

    def run(self, *args, **kwargs):
        return self._scheduler.run_blocking(current_job_class(), functools.partial(self._session.run, *args, **kwargs),
                                            kind=self._kind)

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def schedule_sessions(model, scheduler: NpuScheduler, name: str):
    """Route every ONNX Runtime session a detector holds (as an attribute) through `scheduler`."""
    for attr, value in list(vars(model).items()):
        if isinstance(value, ort.InferenceSession):
            setattr(model, attr, ScheduledSession(value, scheduler, name))
    return model
