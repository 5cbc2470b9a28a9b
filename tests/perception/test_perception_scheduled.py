"""On a QNN backend the cascade's detectors run through the one NPU scheduler, ranked by the frame's job class;
on the CPU backend they keep their own threads."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.perception.build import build
from service.perception.calibration import load_photo
from service.perception.cascade import CameraCascadeConfig, Cascade, PerceptionConfig
from service.perception.scheduled import ScheduledSession
from service.runtime import qnn_context
from service.runtime.scheduler import JobClass, NpuScheduler


def _steps(job: str, kind: str) -> float:
    return REGISTRY.get_sample_value("incar_npu_steps_total", {"priority": job, "kind": kind}) or 0.0


@pytest.fixture(scope="module")
def face_models():
    """Only the face detectors (the whole catalog is not needed here)."""
    from service.perception.models import models_dir
    build(models_dir(), names=["face_full", "face_short"], progress=lambda line: None)
    return models_dir()


@pytest.fixture
def site(tmp_path):
    before = qnn_context.current()
    yield qnn_context.configure("", tmp_path / "qnn-cache")
    qnn_context.configure(before.target, before.cache_dir)


def test_qnn_detectors_are_scheduler_steps_ranked_by_the_frames_job_class(face_models, site):
    busy: list[float] = []
    scheduler = NpuScheduler(on_busy=busy.append)
    cascade = Cascade(PerceptionConfig(backend="qnn-emulator", models_dir=str(face_models),
                                       default_camera=CameraCascadeConfig(stages=("faces",))))
    try:
        cascade.use_scheduler(scheduler)
        detector = cascade.model("faces")
        assert isinstance(detector.session, ScheduledSession)
        before = _steps("critical", "perception.faces"), _steps("alert", "perception.faces")
        img = load_photo("faces1.jpg")
        meta = SimpleNamespace(camera_id="cab", role="cabin", position="cabin_front", capture_time=1.0)
        critical = cascade.analyze(img, meta, job=JobClass.CRITICAL)
        general = cascade.analyze(img, SimpleNamespace(camera_id="cab2", role="cabin", position="cabin_front",
                                                       capture_time=1.0))
    finally:
        scheduler.close()
    assert len(critical.faces) == len(general.faces) >= 2
    assert _steps("critical", "perception.faces") == before[0] + 1
    assert _steps("alert", "perception.faces") == before[1] + 1   # the cascade's default class
    assert busy and np.all(np.asarray(busy) > 0)


def test_cpu_detectors_keep_their_own_sessions(face_models):
    scheduler = NpuScheduler()
    try:
        cascade = Cascade(PerceptionConfig(models_dir=str(face_models)))
        cascade.use_scheduler(scheduler)
        assert not isinstance(cascade.model("faces").session, ScheduledSession)
    finally:
        scheduler.close()
