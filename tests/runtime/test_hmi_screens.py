"""HMI understanding: rendered screens (gauge, labels, warning banner, menu) read by the real OCR stage, and
questions about them answered over Assistant.Ask with the default bundle, from the layout."""
from __future__ import annotations

import cv2
import pytest

from incar.v1 import assistant_pb2, common_pb2
from service.perception.screen import describe_screen, read_screen
from service.runtime.assistant import AssistantService
from service.runtime.engine import GenerationEngine
from service.runtime.scheduler import NpuScheduler
from skills.hmi_screen import ScreenReader
from tests.runtime.assistant_server import AssistantServer
from tests.runtime.hmi_screens import AMBER, hmi_screen
from tests.runtime.serving_support import language_model


@pytest.fixture(scope="module")
def read_text():
    from pathlib import Path

    from service.perception.models import model_path
    from service.perception.text import TextReader
    det, rec = Path(model_path("ocr_det")), Path(model_path("ocr_rec"))
    if not (det.exists() and rec.exists()):   # the project's own build step; cached otherwise
        from service.perception.build import ensure_built
        ensure_built()
    return TextReader(det, rec).read


def png(image) -> common_pb2.Image:
    return common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_PNG, data=cv2.imencode(".png", image)[1].tobytes())


def test_the_layout_pairs_labels_with_values_and_finds_banner_and_menu(read_text):
    image = hmi_screen()
    screen = read_screen(read_text(image), image)
    assert ("RANGE", "312 km") in [(label, value) for label, value, _ in screen.readings]
    assert ("", "88 km/h") in [(label, value) for label, value, _ in screen.readings]
    assert screen.warnings == ["LOW TYRE PRESSURE"]
    assert screen.menu == ["MEDIA", "NAV", "PHONE", "SETTINGS"]
    assert "RANGE 312 km (top right)" in describe_screen(screen)


def test_an_amber_banner_without_warning_words_is_still_a_warning(read_text):
    image = hmi_screen(warning="DRIVER ASSIST UNAVAILABLE", banner=AMBER, readings=(("RANGE", "87 km"),),
                       menu=("HOME", "MAP", "MUSIC"))
    screen = read_screen(read_text(image), image)
    assert screen.warnings == ["DRIVER ASSIST UNAVAILABLE"] and screen.menu == ["HOME", "MAP", "MUSIC"]


class Screens(AssistantServer):
    def __init__(self, read_text):
        self.scheduler = NpuScheduler()
        engine = GenerationEngine(language_model(), None, self.scheduler, describe_images=lambda images: "")
        super().__init__(AssistantService(engine, answer_screen=ScreenReader(read_text)))

    async def __aexit__(self, *exc):
        await super().__aexit__(*exc)
        self.scheduler.close()

    async def ask(self, question: str, image) -> assistant_pb2.AskDone:
        return await self.done(assistant_pb2.AskRequest(question=question, images=[png(image)]))


@pytest.mark.parametrize("screen, question, expected", [
    (dict(), "What range does the screen show?", ["312 km"]),
    (dict(readings=(("RANGE", "57 km"), ("BATTERY", "12 %"))), "What range does the screen show?", ["57 km"]),
    (dict(), "Which warning is on?", ["LOW TYRE PRESSURE"]),
    (dict(warning="DOOR OPEN"), "Which warning is on?", ["DOOR OPEN"]),
    (dict(speed=47), "How fast am I going according to the screen?", ["47 km/h"]),
    (dict(), "What is the battery level on the screen?", ["64 %"]),
    (dict(menu=("HOME", "MAP", "MUSIC")), "Which menu items does the screen have?", ["HOME", "MAP", "MUSIC"]),
])
async def test_questions_about_a_screen_are_answered_from_its_layout(read_text, screen, question, expected):
    async with Screens(read_text) as s:
        done = await s.ask(question, hmi_screen(**screen))
        assert done.handled_by == "screen" and done.tool == "screen.read"
        for value in expected:
            assert value.lower().replace(" ", "") in done.answer.lower().replace(" ", ""), done.answer


async def test_a_screen_without_a_warning_says_so(read_text):
    async with Screens(read_text) as s:
        done = await s.ask("Which warning is on?", hmi_screen(warning=""))
        assert "no warning" in done.answer.lower() and "PRESSURE" not in done.answer
