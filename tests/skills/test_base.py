"""The shared pieces: routing, the narrators (template fallback, switch to the model, model failure), config
validation with key-named errors, the latency metric and budget counter."""
from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from skills.base import SwitchableNarrator, TemplateNarrator, accept_words, narrate, narration_request
from skills.config import GreeterConfig, SafetyConfig, SentinelConfig, SkillsConfig, decode_key
from skills.router import route
from skills.safety_config import EscalationStep


@pytest.mark.parametrize("question, skill", [
    ("Where is my car?", "car_finder"), ("which level did I park on", "car_finder"),
    ("Was anyone near my car while I was away?", "sentinel"), ("show me the sentry clips", "sentinel"),
    ("Did I forget something in the car?", "safety"), ("is my kid still inside?", "safety"),
    ("delete my profile", "greeter"), ("What is the capital of France?", None), ("tell me a joke", None),
])
def test_routes(question, skill):
    assert route(question) == skill


async def test_template_narrator_says_the_draft_and_the_switch_prefers_a_working_model():
    system, prompt = narration_request("The driver asks where the car is.", "Level P2, bay 17.")
    assert "Keep every name, number and code" in system and prompt == "Message: Level P2, bay 17."
    assert await TemplateNarrator().complete(prompt, priority="car_finder", system=system) == "Level P2, bay 17."

    class Model:
        def __init__(self, reply):
            self.reply, self.calls = reply, []

        async def complete(self, prompt, *, priority, **kwargs):
            self.calls.append((priority, kwargs.get("system")))
            if isinstance(self.reply, Exception):
                raise self.reply
            return self.reply

    narrator = SwitchableNarrator()
    assert await narrator.complete(prompt, priority="car_finder") == "Level P2, bay 17."
    model = Model("  You parked on level P2, bay 17.  ")
    narrator.use(model)
    assert await narrate(narrator, task="t", draft="Level P2, bay 17.", priority="car_finder") == \
        "You parked on level P2, bay 17."
    assert model.calls[0][0] == "car_finder" and model.calls[0][1].startswith("t ")
    narrator.use(Model(RuntimeError("NPU gone")))                      # the facts still go out
    assert await narrator.complete(prompt, priority="sentinel") == "Level P2, bay 17."


def test_unusable_model_words_fall_back_to_the_draft():
    draft = "Welcome back, Alice!"
    assert accept_words("Hi Alice, good to see you.", draft, ("Alice",)) == "Hi Alice, good to see you."
    assert accept_words("Hi there, good to see you.", draft, ("Alice",)) == draft      # lost the name
    assert accept_words("Message: Welcome back, Alice!", draft) == draft                # echoed the prompt
    assert accept_words("", draft) == draft
    assert accept_words("Hello Alice. " * 40, draft, ("Alice",)) == draft              # rambling
    assert accept_words("Hi Alice!\n\nAs an AI model I ...", draft, ("Alice",)) == "Hi Alice!"
    # Numbers are facts: the words keep every number of the draft and add none.
    alert = "Sentinel alert on the front camera: a person at the car (1.3 m away, standing)."
    assert accept_words("Someone is standing 1.3 m from the car.", alert) == "Someone is standing 1.3 m from the car."
    assert accept_words("Sentinel alert on the front camera: 1 person; 2 faces.", alert) == alert   # invented
    assert accept_words("A person is standing at the car.", alert) == alert                       # dropped


def test_config_errors_name_the_key(monkeypatch):
    SkillsConfig().validate()
    with pytest.raises(ValueError, match="^battery_floor_percent:"):
        SentinelConfig(battery_floor_percent=120).validate()
    with pytest.raises(ValueError, match=r"^door_handle_zones\.left\[0\]:"):
        SentinelConfig(door_handle_zones={"left": [[0.5, 0.1, 0.2, 0.3]]}).validate()
    with pytest.raises(ValueError, match="^escalation: steps must come in time order"):
        SafetyConfig(escalation=[EscalationStep(60.0), EscalationStep(30.0, ["horn"])]).validate()
    with pytest.raises(ValueError, match=r"^escalation\[0\]\.actions:"):
        SafetyConfig(escalation=[EscalationStep(0.0, ["fireworks"])]).validate()
    with pytest.raises(ValueError, match="^profile_key: expected 32 bytes"):
        GreeterConfig(profile_key="c2hvcnQ=").validate()
    with pytest.raises(ValueError, match=r"^sentinel\.clip_format:"):
        SkillsConfig(sentinel=SentinelConfig(clip_format="avi")).validate()
    monkeypatch.setenv("INCAR_PROFILE_KEY", "A" * 43)
    assert GreeterConfig().resolved_key() == decode_key("A" * 43)
    monkeypatch.delenv("INCAR_PROFILE_KEY")
    assert GreeterConfig().resolved_key() is None


def test_service_config_composes_the_skills_section():
    from service.config import load_config
    config = load_config(env={"INCAR_SKILLS__TICK_SECONDS": "0.25"},
                         overrides=["skills.sentinel.battery_floor_percent=25",
                                    "skills.safety.notification_repeat_seconds=45"])
    assert config.skills.tick_seconds == 0.25
    assert config.skills.sentinel.battery_floor_percent == 25 and config.skills.safety.notification_repeat_seconds == 45


def test_latency_and_budget_metrics_are_registered():
    from skills.base import SKILL_LATENCY  # noqa: F401  (registered at import)
    names = {m.name for m in REGISTRY.collect()}
    assert {"incar_skill_latency_seconds", "incar_safety_exit_warning_latency_seconds"} <= names
    assert "incar_skill_budget_violations" not in names   # one violation counter: the power budgets' own
