"""HMI screens from OCR lines with positions: labelled values, warning banners, menus, said as a layout.

A cockpit screen is read the way a person scans it: a label ("RANGE") names the value beside or below it
("312 km"), a number and its unit ("88", "km/h") are one reading, a line on a red or amber band is a warning,
and three or more short words on one row are a menu. `describe_screen` says all of it in one line for a
text-only model; positions are words ("top right") because a small model reads words, not coordinates.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from service.perception.types import TextLine

WARNING_WORDS = re.compile(r"\b(WARNING|LOW|CHECK|FAULT|FAILURE|SERVICE|OPEN|HOT|ERROR|STOP|BRAKE)\b", re.I)
UNIT_ONLY = re.compile(r"^(km/?h|mph|km|mi|%|°C|°F|kW|rpm|bar|psi|V)$", re.I)
HAS_DIGIT = re.compile(r"\d")
MIN_MENU_ITEMS = 3


@dataclass
class Screen:
    readings: list[tuple[str, str, str]] = field(default_factory=list)   # (label or "", value, where)
    warnings: list[str] = field(default_factory=list)
    menu: list[str] = field(default_factory=list)
    other: list[tuple[str, str]] = field(default_factory=list)          # (text, where)


def _height(line: TextLine) -> float:
    return line.box[3] - line.box[1]


def _cy(line: TextLine) -> float:
    return (line.box[1] + line.box[3]) / 2


def where(box, width: int, height: int) -> str:
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def on_warning_band(image: np.ndarray, box) -> bool:
    """The background behind the line is saturated red or amber (BGR): the median of the box and of strips
    beside it on the same rows (text strokes are a minority of those pixels)."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (int(v) for v in box)
    y1, y2 = max(0, y1), min(h, max(y2, y1 + 1))
    side = max(4, (y2 - y1))
    region = image[y1:y2, max(0, x1 - side):min(w, x2 + side)].reshape(-1, 3)
    if not region.size:
        return False
    b, g, r = np.median(region, axis=0)
    return bool(r > 120 and b < 0.5 * r and g < 0.85 * r)   # red (g low) or amber (g ~ 0.65 r), not white


def _below_or_beside(label: TextLine, value: TextLine) -> bool:
    lh = _height(label)
    below = (0 <= value.box[1] - label.box[3] + lh * 0.3 <= 1.5 * lh
             and min(label.box[2], value.box[2]) - max(label.box[0], value.box[0]) > 0)
    beside = abs(_cy(label) - _cy(value)) < 0.5 * lh and 0 <= value.box[0] - label.box[2] <= 3 * lh
    return below or beside


def read_screen(lines: list[TextLine], image: np.ndarray) -> Screen:
    h, w = image.shape[:2]
    screen = Screen()
    left = [line for line in lines if line.text.strip()]
    for line in list(left):
        if on_warning_band(image, line.box) or (WARNING_WORDS.search(line.text) and line.text.isupper()
                                                 and not HAS_DIGIT.search(line.text)):
            screen.warnings.append(line.text)
            left.remove(line)
    rows: list[list[TextLine]] = []
    for line in sorted(left, key=_cy):
        if rows and abs(_cy(rows[-1][0]) - _cy(line)) < 0.5 * _height(line):
            rows[-1].append(line)
        else:
            rows.append([line])
    for row in rows:
        words = [x for x in row if not HAS_DIGIT.search(x.text) and not UNIT_ONLY.match(x.text)
                 and len(x.text.split()) <= 2]
        if len(words) >= MIN_MENU_ITEMS and len(words) == len(row) and not screen.menu:
            screen.menu = [x.text for x in sorted(row, key=lambda x: x.box[0])]
            for x in row:
                left.remove(x)
    values = [x for x in left if HAS_DIGIT.search(x.text)]
    for value in sorted(values, key=lambda x: (x.box[1], x.box[0])):
        text = value.text
        unit = next((u for u in left if UNIT_ONLY.match(u.text) and _below_or_beside(value, u)), None)
        if unit is not None:
            text = f"{text} {unit.text}"
            left.remove(unit)
        label = next((lab for lab in left if not HAS_DIGIT.search(lab.text) and _below_or_beside(lab, value)), None)
        if label is not None:
            left.remove(label)
        left.remove(value)
        screen.readings.append((label.text if label else "", text, where(value.box, w, h)))
    screen.other = [(x.text, where(x.box, w, h)) for x in left]
    return screen


def describe_screen(screen: Screen) -> str:
    parts = [f"{label} {value} ({place})" if label else f"{value} ({place})"
             for label, value, place in screen.readings]
    parts += [f"{text} ({place})" for text, place in screen.other]
    out = "a screen showing " + "; ".join(parts) if parts else "a screen"
    if screen.warnings:
        out += "; warning: " + ", ".join(screen.warnings)
    if screen.menu:
        out += "; menu: " + ", ".join(screen.menu)
    return out


def looks_like_a_screen(lines: list[TextLine]) -> bool:
    """Several lines of text: a display, not a sign in a street scene."""
    return len([line for line in lines if line.text.strip()]) >= 4
