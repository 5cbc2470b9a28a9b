"""The safety lane preempts slower work on a CPU host: the general lane's worker and the language model's
executor run below the process's priority (Linux nice per thread), the safety lane at the process's own and on
its own detector sessions; threads started from a lowered thread (ONNX Runtime's pools) inherit the lowering."""
from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest

from service.runtime.thread_priority import BACKGROUND_NICE, call_in_background_thread, nice_of
from tests.skills.test_safety_lane import ScriptedHub, frame
from tests.skills.scenes import photo

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's"),
              pytest.mark.skipif(sys.platform.startswith("linux") and (nice_of() or 0) >= 19,
                                 reason="already at the lowest priority: nothing can be lowered")]
BUNDLE = Path(__file__).resolve().parents[2] / "build" / "models" / "smollm2-135m-instruct"


def expected_background(base: int) -> int:
    return min(19, base + BACKGROUND_NICE)


class NiceRecordingCascade:
    """The real cascade; notes each lane's thread nice value and the object detector it was handed."""

    def __init__(self, cascade):
        self.cascade, self.seen = cascade, {}

    def __getattr__(self, name):
        return getattr(self.cascade, name)

    def analyze(self, bgr, meta, skip=(), job=None, models=None):
        self.seen[meta.camera_id] = (nice_of(), (models or self.cascade.model)("objects"))
        return self.cascade.analyze(bgr, meta, skip, job, models)


def test_threads_started_by_a_background_call_inherit_its_lower_priority():
    base = nice_of()
    inner: list[int] = []

    def open_something():
        worker = threading.Thread(target=lambda: inner.append(nice_of()))
        worker.start()
        worker.join()
        return nice_of()

    assert call_in_background_thread(open_something) == expected_background(base)
    assert inner == [expected_background(base)]
    assert nice_of() == base                      # the caller itself is untouched
    with pytest.raises(ZeroDivisionError):        # the callee's error reaches the caller
        call_in_background_thread(lambda: 1 / 0)


async def test_the_general_lane_runs_lowered_and_the_safety_lane_on_its_own_sessions():
    from service.perception.build import build
    from service.perception.cascade import Cascade, PerceptionConfig
    from service.pipeline import AnalysisPipeline
    build(quantize=False, progress=lambda line: None)
    cascade = NiceRecordingCascade(Cascade(PerceptionConfig()))
    hub = ScriptedHub()
    pipeline = AnalysisPipeline(hub, cascade, lane_of=lambda f: "safety" if f.camera_id == "ext-left" else "general")
    side = photo("dog.jpg")
    stream = pipeline.analyses()
    hub.queue.put_nowait(frame("ext-front", "exterior", "front", 10.0, side))
    hub.queue.put_nowait(frame("ext-left", "exterior", "left", 10.0, side))
    got = [await asyncio.wait_for(stream.__anext__(), 60) for _ in range(2)]
    await stream.aclose()
    assert {a.camera_id for a in got} == {"ext-front", "ext-left"}
    base = nice_of()
    general_nice, general_detector = cascade.seen["ext-front"]
    safety_nice, safety_detector = cascade.seen["ext-left"]
    assert safety_nice == base
    assert general_nice == expected_background(base)
    assert general_detector is cascade.cascade.model("objects")
    assert safety_detector is not general_detector     # its own session, opened on the safety lane's thread
    left = next(a for a in got if a.camera_id == "ext-left")
    assert any(d.label == "bicycle" for d in left.detections)


@pytest.mark.skipif(not (BUNDLE / "manifest.json").is_file(), reason="default language model bundle not built")
async def test_the_language_models_executor_runs_lowered_on_the_cpu():
    from service.runtime.config import RuntimeConfig
    from service.runtime.host import ModelHost
    host = ModelHost(RuntimeConfig(bundle=str(BUNDLE), fallback_backend=""))
    base = nice_of(host.scheduler.thread_id)

    async def status(serving: bool, note: str) -> None:
        pass
    loaded = await host.load(status)
    try:
        assert loaded.engine is not None, loaded.reason
        assert nice_of(host.scheduler.thread_id) == expected_background(base)
    finally:
        host.close()
