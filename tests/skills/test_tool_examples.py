"""The examples the model's routing head learns from are apart from the evaluation set, and they cover every
tool; the evaluation set covers the distractors the issue names."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from service.runtime.tooling import NONE
from skills.tools import EXAMPLES, SPECS

ROUTING = Path(__file__).resolve().parents[1] / "data" / "routing.jsonl"


def normalised(question: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", question.lower()).split())


def cases() -> list[dict]:
    return [json.loads(line) for line in ROUTING.read_text().splitlines() if line.strip()]


def test_no_evaluation_question_is_a_training_example():
    taught = {normalised(q) for q, _, _ in EXAMPLES}
    assert not [c["question"] for c in cases() if normalised(c["question"]) in taught]
    assert normalised("Where's the car?!") == normalised("where s the car")      # the check's own rule


def test_the_examples_teach_every_tool_and_none():
    names = {s.name for s in SPECS} | {NONE}
    counts = Counter(name for _, name, _ in EXAMPLES)
    assert set(counts) == names
    assert min(counts.values()) >= 5, counts
    assert len({normalised(q) for q, _, _ in EXAMPLES}) == len(EXAMPLES)         # no example twice


def test_the_evaluation_set_holds_every_tool_and_the_named_distractors():
    rows = cases()
    assert len(rows) >= 80
    names = {s.name for s in SPECS} | {NONE}
    assert {c["tool"] for c in rows} == names
    distractors = " ".join(c["question"].lower() for c in rows if c["tool"] == NONE)
    for word in ("charging station", "restaurant", "alarm", "song"):
        assert word in distractors, word
    for c in rows:
        spec = next((s for s in SPECS if s.name == c["tool"]), None)
        for key in c.get("arguments", {}):
            assert spec is not None and key in spec.parameters["properties"], c
