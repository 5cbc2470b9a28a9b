"""The keyword router: the fallback that picks a tool while no language model is loaded.

With a model loaded, the model chooses the tool (`service.runtime.tool_choice`); these patterns remain for the
time before (and for `bench/route.py`, which measures both on the same questions). A wrong route is worse than
none (the Assistant then answers with the general model), so distractors that share words with a tool — charging
stations, restaurants, alarm clocks, songs — are ruled out first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from incar.v1 import skills_pb2

_I = re.I
NOT_THE_CAR = re.compile(r"\b(charg\w*|station|restaurant|caf[eé]|coffee|hotel|shop|store|toilet|restroom|"
                         r"alarm clock|set an alarm|wake me|timer|remind|song|music|playing|radio|podcast|"
                         r"weather|traffic jam|fuel price|petrol|gas station|navigate|directions to)\b", _I)

TOOL_ROUTES: list[tuple[str, re.Pattern]] = [
    ("sentinel.disarm", re.compile(r"\b(turn|switch|shut)\w* off\b.*\b(sentinel|sentry|surveillance|guard)|"
                                   r"\b(disarm|deactivate|disable|stop)\b.*\b(sentinel|sentry|surveillance|guard)|"
                                   r"\b(sentinel|sentry|surveillance)( mode)? off\b", _I)),
    ("sentinel.arm", re.compile(r"\b(turn|switch)\w* on\b.*\b(sentinel|sentry|surveillance|guard)|"
                                r"\b(arm|activate|enable|start)\b.*\b(sentinel|sentry|surveillance)|"
                                r"\bwatch (over )?(my|the) car\b|"
                                r"\b(sentinel|sentry|surveillance)( mode)? on\b(?! ?\?)", _I)),
    ("sentinel.recent_clips", re.compile(r"\b(clips?|recordings?|recorded|footage|while i was (away|gone)|"
                                         r"(anyone|somebody|someone) (near|around|at|by|close to) (my|the) car|"
                                         r"break-?in|touch(ed)? (my|the) car)\b", _I)),
    ("sentinel.status", re.compile(r"\b(sentinel|sentry|surveillance)\b", _I)),
    ("safety.is_it_safe_to_exit", re.compile(r"\b(safe (to )?(exit|get out|open)|open (my|the) door|"
                                             r"get out (now|safely)|cyclists?|bikes? coming)\b", _I)),
    ("safety.left_behind", re.compile(r"\b(left (behind|in the car|anything|something)|forg[eo]t\w* "
                                      r"(something|anything|my \w+) in the car|child|kid|baby|pet|dog)\b", _I)),
    ("safety.status", re.compile(r"\b(safety (alerts?|warnings?|status)|any (alerts?|warnings?))\b", _I)),
    ("greeter.forget", re.compile(r"\b(delete|remove|forget|erase)\b.*\b(profile|face|me)\b", _I)),
    ("greeter.enrol", re.compile(r"\b(enrol+|register|save|learn|remember)\b.*\b(face|me|profile)\b", _I)),
    ("greeter.who_is_here", re.compile(r"\b(profiles?|enrol+ed|recogni[sz]e[sd]? me|who am i|drivers? "
                                       r"(are )?(registered|known))\b", _I)),
    ("vehicle.climate_on", re.compile(r"\b(climate|air ?con\w*|a/?c|heating|heater|warm (up )?the car|"
                                      r"cool (down )?the car)\b", _I)),
    ("vehicle.flash_lights", re.compile(r"\b(flash|blink)\w*\b.*\b(lights?|headlights?)\b", _I)),
    ("vehicle.vent_windows", re.compile(r"\b(vent|air (out )?the (car|cabin)|fresh air|crack the windows?|"
                                        r"open the windows?)\b", _I)),
    ("car_finder.where_is_my_car", re.compile(r"\b(where('?s| is| did)?\b.*\b(my )?(car|vehicle|parked?)|"
                                              r"where did i park|parking (spot|space|bay|level)|find my car|"
                                              r"which (level|floor|bay))\b", _I)),
]

NAME = re.compile(r"\b(?:as|named|called|name is|i am|i'm)\s+([A-Z][a-z]+)\b")


def route_tool(question: str) -> tuple[str, dict] | None:
    """(tool name, arguments) for a question, or None when no tool owns it."""
    if NOT_THE_CAR.search(question):
        return None
    for tool, pattern in TOOL_ROUTES:
        if pattern.search(question):
            args = {}
            if tool in ("greeter.enrol", "greeter.forget") and (m := NAME.search(question)):
                args["name"] = m.group(1)
            return tool, args
    return None


def route(question: str) -> str | None:
    """The skill name for a question, or None when no skill owns it."""
    found = route_tool(question)
    return found[0].split(".")[0] if found else None


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
            text = (("Enrolled driver profiles: " + ", ".join(names) + ".") if names
                    else "No driver profiles are enrolled.")
            return RoutedAnswer(skill, text)
        return None
