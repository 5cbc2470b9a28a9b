"""Routes an Assistant question to the skill that owns the answer ("where is my car?" -> Car Finder).

Keyword patterns, not the model: routing must be instant and predictable, and a wrong route is worse than none
(the Assistant then answers with the general model).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from incar.v1 import skills_pb2

ROUTES: list[tuple[str, re.Pattern]] = [
    ("car_finder", re.compile(r"\b(where('?s| is| did)?\b.*\b(my )?(car|vehicle|parked?)|where did i park|"
                              r"parking (spot|space|bay|level)|find my car|which (level|floor|bay))\b", re.I)),
    ("sentinel", re.compile(r"\b(sentinel|sentry|surveillance|while i was (away|gone)|anyone (near|around|at) "
                            r"(my|the) car|break-?in|alarm|clips?)\b", re.I)),
    ("safety", re.compile(r"\b(left (behind|in the car)|forgot|forget|child|kid|baby|safety|safe exit)\b", re.I)),
    ("greeter", re.compile(r"\b(profile|enrol+(ed|ment)?|recogni[sz]e me|who am i|my presets?)\b", re.I)),
]


def route(question: str) -> str | None:
    """The skill name for a question, or None when no skill owns it."""
    for skill, pattern in ROUTES:
        if pattern.search(question):
            return skill
    return None


@dataclass
class RoutedAnswer:
    skill: str
    answer: str


class SkillRouter:
    """Answers routed questions from the skills' own state; None means "not a skill question"."""

    def __init__(self, *, car_finder=None, sentinel=None, safety=None, greeter=None):
        self.car_finder, self.sentinel, self.safety, self.greeter = car_finder, sentinel, safety, greeter

    async def answer(self, question: str) -> RoutedAnswer | None:
        skill = route(question)
        if skill == "car_finder" and self.car_finder is not None:
            from skills.base import NotFoundError
            try:
                text, _record = await self.car_finder.where_is_my_car(question)
            except NotFoundError:
                text = "I have no parking position recorded yet."
            return RoutedAnswer(skill, text)
        if skill == "sentinel" and self.sentinel is not None:
            status = self.sentinel.status()
            clips = self.sentinel.list_clips(3)
            state = skills_pb2.SentinelState.Name(status.state).removeprefix("SENTINEL_STATE_").lower()
            text = f"Sentinel is {state} ({status.reason})."
            if clips:
                text += " Latest recordings: " + "; ".join(c.description for c in clips if c.description) + "."
            else:
                text += " Nothing has been recorded."
            return RoutedAnswer(skill, text)
        if skill == "safety" and self.safety is not None:
            active = self.safety.status().active
            text = ("Active safety alerts: " + "; ".join(a.detail for a in active) + ".") if active \
                else "There are no active safety alerts."
            return RoutedAnswer(skill, text)
        if skill == "greeter" and self.greeter is not None:
            names = [p.name for p in self.greeter.list_profiles()]
            text = ("Enrolled driver profiles: " + ", ".join(names) + ".") if names else "No driver profiles are enrolled."
            return RoutedAnswer(skill, text)
        return None
