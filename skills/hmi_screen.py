"""Questions about an HMI screenshot (an inline image or an HMI camera's frame), answered from its layout.

Handed to the Assistant as a callable (`ScreenReader`): the runtime runs the model and knows no perception stage.

OCR reads the screen's text with positions; `service.perception.screen` turns the lines into labelled readings,
warnings and a menu. The readings the question asks about ("What range does the screen show?" -> RANGE 312 km)
become a result the model words, kept only when its words hold every value and invent none, as tool results are.
"""
from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence

import numpy as np
import structlog

from service.perception.screen import Screen, describe_screen, looks_like_a_screen, read_screen
from service.perception.types import TextLine
from service.runtime.tooling import ToolResult

log = structlog.get_logger(__name__)

ReadText = Callable[[np.ndarray], list[TextLine]]

# Words a question may use for a reading, by the reading's unit (its label's own words always count).
UNIT_WORDS = {"km/h": ("speed", "fast", "going"), "mph": ("speed", "fast", "going"), "km": ("range", "distance"),
              "mi": ("range", "distance"), "%": ("battery", "charge", "percent", "level"),
              "°c": ("temperature", "warm", "cold", "outside"), "rpm": ("rpm", "revs", "engine")}
WARNING_QUESTION = re.compile(r"\b(warn\w*|alert\w*|lights?|wrong|problem|banner|message)\b", re.I)
MENU_QUESTION = re.compile(r"\b(menus?|options?|items?|buttons?|tabs?)\b", re.I)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z%°/]+", text.lower()))


def relevant(question: str, screen: Screen) -> ToolResult:
    """The readings the question names, said with their values; everything when it names none."""
    asked = _words(question)
    picked, facts = [], []
    for label, value, place in screen.readings:
        unit = value.split()[-1].lower() if len(value.split()) > 1 else ""
        names = _words(label) | set(UNIT_WORDS.get(unit, ()))
        if names & asked:
            picked.append(f"{label + ' ' if label else ''}{value} ({place})")
            facts.append(value)
    if WARNING_QUESTION.search(question):
        picked.append("warning: " + ", ".join(screen.warnings) if screen.warnings else "no warning is shown")
        facts += screen.warnings
    if MENU_QUESTION.search(question) and screen.menu:
        picked.append("menu: " + ", ".join(screen.menu))
        facts += screen.menu
    if not picked:
        text = describe_screen(screen)
        return ToolResult(f"The screen shows {text.removeprefix('a screen showing ')}.",
                          [v for _, v, _ in screen.readings] + screen.warnings, data={"screen": text})
    return ToolResult("The screen shows " + "; ".join(picked) + ".", facts, data={"screen": describe_screen(screen)})


async def read_screens(images: Sequence[np.ndarray], read_text: ReadText) -> list[Screen]:
    """The screens among the images (an image with several text lines); OCR runs off the event loop."""
    screens = []
    for image in images:
        try:
            lines = await asyncio.to_thread(read_text, image)
        except Exception as exc:    # no OCR model (or it failed): the question goes to the model as usual
            log.warning("screen.ocr_failed", error=str(exc))
            return []
        if looks_like_a_screen(lines):
            screens.append(read_screen(lines, image))
    return screens


def merged(screens: list[Screen]) -> Screen:
    out = Screen()
    for s in screens:
        out.readings += s.readings
        out.warnings += s.warnings
        out.menu = out.menu or s.menu
        out.other += s.other
    return out


class ScreenReader:
    """`await reader(question, images)`: the answer's facts when the images hold an HMI screen, else None."""

    def __init__(self, read_text: ReadText):
        self.read_text = read_text

    async def __call__(self, question: str, images: Sequence[np.ndarray]) -> ToolResult | None:
        screens = await read_screens(images, self.read_text)
        return relevant(question, merged(screens)) if screens else None
