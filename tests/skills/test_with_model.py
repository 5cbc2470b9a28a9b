"""The skills with the real language model (default bundle, CPU): words from the model, facts from the skill.

Runs when the default bundle is built (`make models`, build/models/...); without it the skills use the documented
template narrator, which the other scenario tests cover.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from incar.v1 import skills_pb2, vehicle_pb2
from service.perception.types import TextLine
from tests.skills.conftest import vehicle
from tests.skills.scenes import analysis, background

BUNDLE = Path(os.environ.get("INCAR_TEST_BUNDLE")
              or Path(__file__).resolve().parents[2] / "build" / "models" / "smollm2-135m-instruct")
pytestmark = pytest.mark.skipif(not (BUNDLE / "manifest.json").is_file(),
                                reason=f"default bundle not built at {BUNDLE} (make models)")


@pytest.fixture(scope="module")
def model():
    from service.runtime.bundle import load_bundle
    from service.runtime.generator import LanguageModel
    return LanguageModel(load_bundle(BUNDLE), backend="cpu")


async def test_car_finder_answer_worded_by_the_model_keeps_level_and_bay(harness, clock, model):
    from service.runtime.engine import GenerationEngine
    from service.runtime.scheduler import NpuScheduler
    scheduler = NpuScheduler()
    try:
        harness.narrator = GenerationEngine(model, None, scheduler)
        r = await harness.start()
        await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_DRIVE, ignition=vehicle_pb2.IGNITION_ON, speed=5.0))
        signs = (TextLine("LEVEL B3", 0.99, (0, 0, 10, 10)), TextLine("BAY 42", 0.98, (0, 20, 10, 30)))
        await r.frame(analysis("ext-front", "exterior", "front", clock.advance(0.1), background(), texts=signs,
                               stages=("text",)))
        await r.set_vehicle(vehicle(ignition=vehicle_pb2.IGNITION_OFF))
        reply = await r.stub("CarFinder").WhereIsMyCar(skills_pb2.WhereIsMyCarRequest(question="Where is my car?"))
        print("model answer:", reply.answer)
        assert reply.answer.strip() and "B3" in reply.answer and "42" in reply.answer
        # The greeting: the model's words, with the name in them (else the draft).
        await r.stub("Greeter").Enroll(skills_pb2.EnrollRequest(name="Alice Example", consent=True, key_fob_id="f1"))
        await r.set_vehicle(vehicle(key_fob_id="f1"))
        greeting, = r.events_of("greeter.greeting")
        print("model greeting:", greeting.message)
        assert "Alice Example" in greeting.message
    finally:
        await harness.stop()
        scheduler.close()
