"""Answers worth reading from the default bundle: greedy decoding with the engine's defaults does not loop, and
a JSON-schema answer holds values, not the schema's own words."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from tests.runtime.serving_support import language_model

from service.runtime.engine import EngineConfig, GenerationEngine
from service.runtime.scheduler import NpuScheduler

COCKPIT_QUESTIONS = [
    "What should I do if a warning light comes on while driving?",
    "How can I save battery when the car is parked for a week?",
    "Give me tips for driving safely in heavy rain.",
    "What does adaptive cruise control do?",
    "How do I keep the windscreen from fogging up?",
    "Why should children sit in the back seat?",
    "What is a good tyre pressure check routine?",
    "How can I make a long drive less tiring?",
    "What should I pack in the car for a winter trip?",
    "Explain what regenerative braking is.",
]


def most_repeated_4gram(text: str) -> tuple[tuple[str, ...], int]:
    words = re.findall(r"[\w']+", text.lower())
    grams = Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3))
    return grams.most_common(1)[0] if grams else ((), 0)


@pytest.fixture(scope="module")
def engine():
    scheduler = NpuScheduler()
    yield GenerationEngine(language_model(), None, scheduler)
    scheduler.close()


async def test_ten_cockpit_answers_do_not_loop(engine):
    for question in COCKPIT_QUESTIONS:
        text = await engine.complete(question, max_tokens=0)   # 0: the engine's default length
        gram, count = most_repeated_4gram(text)
        assert count <= 2, f"{question!r}: {' '.join(gram)!r} said {count} times in {text!r}"
        assert len(text.split()) >= 5, f"{question!r}: a non-answer {text!r}"


async def test_without_repetition_control_the_same_model_loops(engine):
    """The control above is what makes the difference: switched off, greedy decoding repeats itself."""
    bare = GenerationEngine(engine.model, None, engine.scheduler,
                            config=EngineConfig(repetition_penalty=1.0, no_repeat_ngram=0))
    worst = 0
    for question in COCKPIT_QUESTIONS:
        worst = max(worst, most_repeated_4gram(await bare.complete(question, max_tokens=160))[1])
    assert worst > 2


async def test_a_json_answer_holds_values_not_the_schema(engine):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    text = await engine.complete("Paris is the capital of France. Which city and country are named?",
                                 max_tokens=40, json_schema=json.dumps(schema))
    value = json.loads(text)
    assert set(value) == {"city", "country"}
    for field in value.values():
        assert field.strip() and field.lower() not in ("string", "type", "object", "properties")


def test_repetition_settings_are_validated():
    with pytest.raises(ValueError, match="repetition_penalty"):
        EngineConfig(repetition_penalty=0.5).validate()
    with pytest.raises(ValueError, match="no_repeat_ngram"):
        EngineConfig(no_repeat_ngram=1).validate()
