"""The model chooses the tool (the default bundle, real steps on the scheduler): the prefix is prefilled once and
every question returns the sequence to it; a model's choice of a state-changing tool alone changes nothing."""
from __future__ import annotations

import pytest

from incar.v1 import assistant_pb2
from service.runtime.assistant import AssistantService
from service.runtime.engine import GenerationEngine
from service.runtime.scheduler import NpuScheduler
from service.runtime.tool_choice import ToolChooser
from skills.tools import EXAMPLES, SPECS, SkillTools
from tests.runtime.assistant_server import AssistantServer
from tests.runtime.serving_support import language_model
from tests.skills.conftest import harness, clock  # noqa: F401  (fixtures)


@pytest.fixture
def scheduler():
    s = NpuScheduler()
    yield s
    s.close()


async def test_the_head_routes_from_the_prefilled_prefix_and_decodes_arguments(scheduler):
    chooser = ToolChooser(language_model(), scheduler, SPECS, EXAMPLES, mode="head")
    await chooser.prepare()
    base = chooser._base
    assert chooser.training_accuracy >= 0.95          # the head fits the examples it learned from
    for question, tool, _args in EXAMPLES[:6]:
        first = await chooser.choose(question)
        again = await chooser.choose(question)
        assert first.call.name == again.call.name == tool, question
        assert first.call.chosen_by == "model" and 0 < first.confidence <= 1
        if not chooser.specs.get(tool) or not chooser.specs[tool].takes_arguments:
            assert first.steps == 1                   # the question's own prefill, nothing more
    # Every question starts from the same prefix state: the mark is untouched by the choices.
    assert chooser._base is base and chooser._base.length == chooser.prefix_tokens
    choice = await chooser.choose("Please enrol my face, my name is Anna")
    assert choice.call.name == "greeter.enrol" and choice.call.arguments == {"name": "Anna"}


async def test_greedy_choice_is_one_of_the_tools_or_none(scheduler):
    chooser = ToolChooser(language_model(), scheduler, SPECS, EXAMPLES[:8], mode="greedy")
    names = {s.name for s in SPECS} | {"none"}
    for question in ("Where did I leave the car?", "Play my favourite song"):
        choice = await chooser.choose(question)
        assert choice.call.name in names and choice.steps > 0


async def test_a_model_choice_alone_does_not_change_the_car(harness):  # noqa: F811
    r = await harness.start()
    model_scheduler = NpuScheduler()
    try:
        engine = GenerationEngine(language_model(), None, model_scheduler)
        service = AssistantService(engine, tools=SkillTools(r.host), role_of=lambda context: "admin")
        await service.tools._prepare(service.tools.chooser)
        async with AssistantServer(service) as server:
            # An example the model maps to sentinel.arm that the keyword router does not confirm.
            done = await server.done(assistant_pb2.AskRequest(question="Keep an eye on the car",
                                                              route_to_skill=True))
        assert done.tool == "sentinel.arm" and done.chosen_by == "model"
        assert done.answer.startswith("Nothing was changed") and not r.host.sentinel.armed
    finally:
        model_scheduler.close()


def test_a_keyword_prior_weighs_in_the_heads_scores_but_never_forces_none(scheduler):
    model = language_model()
    named = {"q1": "sentinel.status", "q2": "none", "q3": None}
    chooser = ToolChooser(model, scheduler, SPECS, EXAMPLES, mode="head", prior=named.get)
    head = {"sentinel.status": 0.2, "safety.status": 0.7, "none": 0.1}
    assert chooser._weigh(head, "q1") == ("sentinel.status", 0.2)      # raised by e^4 past 0.7
    assert chooser._weigh(head, "q2") == ("safety.status", 0.7)        # "none" is never pushed
    assert chooser._weigh(head, "q3") == ("safety.status", 0.7)
    assert chooser._weigh({"sentinel.status": 1e-4, "safety.status": 0.9999}, "q1")[0] == "safety.status"
    with pytest.raises(ValueError, match="prior"):
        ToolChooser(model, scheduler, SPECS, EXAMPLES, mode="nearest", prior=named.get)
