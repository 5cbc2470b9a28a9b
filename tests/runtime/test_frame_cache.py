"""One vision encode (and one perception description) per frame, however many questions ask about it."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.cameras.hub import CameraHub
from service.modelbuild.autoneural import tiny_autoneural_bundle
from service.perception.cascade import Cascade
from service.pipeline import AnalysisPipeline
from service.runtime.bundle import load_bundle
from service.runtime.engine import Done, EngineConfig, GenerationEngine, GenerationRequest
from service.runtime.frame_cache import FrameCache
from service.runtime.generator import LanguageModel
from service.runtime.scheduler import NpuScheduler
from service.runtime.vision import VisionEncoder
from tests.conftest import PHOTOS


def lookups(what: str, result: str) -> float:
    return REGISTRY.get_sample_value("incar_frame_cache_lookups_total", {"what": what, "result": result}) or 0.0


def test_cache_keys_by_content_and_stays_bounded():
    cache = FrameCache(max_entries=2)
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 1
    calls = []
    compute = lambda img: calls.append(img) or len(calls)   # noqa: E731
    assert cache.get_or_compute("x", a, compute) == 1
    assert cache.get_or_compute("x", a.copy(), compute) == 1        # same pixels, another array: reused
    assert cache.get_or_compute("x", b, compute) == 2               # one pixel differs: computed
    assert cache.get_or_compute("y", a, compute) == 3               # another kind of result: its own entry
    assert len(cache) == 2 and cache.get_or_compute("x", a, compute) == 4   # bounded: the oldest went
    assert cache.digest(a) != cache.digest(a.reshape(16, 4, 3))    # the shape is part of the key


async def test_two_questions_about_one_frame_encode_it_once(tmp_path):
    out = tmp_path / "tiny-autoneural"
    tiny_autoneural_bundle(out, seed=1, precisions=(), context_length=512)
    bundle = load_bundle(out)
    scheduler = NpuScheduler()
    engine = GenerationEngine(LanguageModel(bundle, "cpu", threads=2), VisionEncoder(bundle, "cpu"), scheduler,
                              config=EngineConfig(system_prompt=""))
    frame = cv2.imread(str(PHOTOS / "dog.jpg"))
    frame.flags.writeable = False                                 # as the camera hub shares its frames
    misses, hits = lookups("vision_encode", "miss"), lookups("vision_encode", "hit")
    try:
        dones = []
        for question in ("What animal?", "What colour is it?"):
            async for item in engine.stream(GenerationRequest(question, images=[frame], max_tokens=2)):
                if isinstance(item, Done):
                    dones.append(item)
    finally:
        scheduler.close()
    assert lookups("vision_encode", "miss") - misses == 1 and lookups("vision_encode", "hit") - hits == 1
    assert dones[0].timings.vision_encode_s > 0 and dones[1].timings.vision_encode_s == 0


@pytest.fixture(scope="module")
def cascade() -> Cascade:
    from service.perception.build import build
    build("build/models", progress=lambda line: None)
    return Cascade()


def test_a_frame_is_described_once(cascade):
    pipeline = AnalysisPipeline(CameraHub(), cascade)
    frame = cv2.imread(str(PHOTOS / "person.jpg"))
    detector = cascade.model("objects")
    runs = []
    original = detector.detect
    detector.detect = lambda bgr: runs.append(1) or original(bgr)
    try:
        first = pipeline.describe_images([frame])
        second = pipeline.describe_images([frame, frame])
    finally:
        detector.detect = original
    assert "person" in first and runs == [1]
    assert second == first + " " + first.replace("Image 1", "Image 2")
