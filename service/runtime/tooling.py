"""What the Assistant knows of tools: their specs, their results, and the registry it is given.

The runtime never imports skills/: `skills.tools.SkillTools` implements `ToolRegistry` and the server injects it.
A tool's result carries every fact the answer may use (`text` says them all in words, `facts` lists the values
the answer must keep), so the model's wording can be checked against it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ToolSpec:
    name: str                          # "sentinel.arm"
    description: str                   # one line: what it answers or does
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})   # JSON schema
    changes_state: bool = False        # arm, disarm, enrol, forget, vehicle actions
    skill: str = ""                    # who answers ("sentinel"); AskDone.handled_by

    @property
    def takes_arguments(self) -> bool:
        return bool(self.parameters.get("properties"))


@dataclass
class ToolResult:
    text: str                          # every fact of the skill's state the question needs, as sentences
    facts: list[str] = field(default_factory=list)   # values the answer must keep (bay "14", a name, a time)
    acted: bool = False                # the tool changed the car's state; the answer says what was done
    data: dict[str, Any] = field(default_factory=dict)   # the raw values, for clients and tests


class ToolRefused(Exception):
    """The tool may not run now. `code` is a grpc.StatusCode name: FAILED_PRECONDITION (driving, wrong state),
    PERMISSION_DENIED (the caller's role), INVALID_ARGUMENT (bad arguments), NOT_FOUND."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ToolCall:
    name: str                          # a spec's name, or "none"
    arguments: dict = field(default_factory=dict)
    chosen_by: str = "model"           # "model" or "keywords"


class ToolRegistry(Protocol):
    def specs(self) -> list[ToolSpec]: ...

    def examples(self) -> list[tuple[str, str, dict]]:
        """(question, tool name or "none", arguments): few-shot examples for the model's choice."""

    def keyword_call(self, question: str) -> ToolCall | None:
        """The keyword router's choice: the fallback while no model is loaded."""

    async def run(self, call: ToolCall, role: str) -> ToolResult:
        """Runs the tool for a caller of `role`; raises ToolRefused."""


NONE = "none"

_NUMBER = re.compile(r"\d+(?:[.:]\d+)*")
_NAME = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]{2,}\b")


def ungrounded(answer: str, result: ToolResult) -> list[str]:
    """Numbers and capitalised names in `answer` that the tool result does not contain (invented facts)."""
    source = result.text + " " + " ".join(result.facts)
    numbers = set(_NUMBER.findall(source))
    words = source.lower()
    invented = [n for n in _NUMBER.findall(answer) if n not in numbers]
    invented += [w for w in _NAME.findall(answer) if w.lower() not in words]
    return invented


def dropped(answer: str, result: ToolResult) -> list[str]:
    """Facts of the result the answer leaves out."""
    text = answer.lower()
    return [f for f in result.facts if f and f.lower() not in text]
