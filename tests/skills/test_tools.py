"""Skills' tools through Assistant.Ask on a real gRPC port: grounded answers (every fact of the skill's state the
question needs, nothing invented), and state-changing tools that respect the caller's role and the driving state.
No model here: the keyword router chooses (the fallback while no model is loaded); test_tool_choice.py has the
model."""
from __future__ import annotations

import json

import grpc
import pytest

from incar.v1 import assistant_pb2, vehicle_pb2
from service.runtime.assistant import AssistantService
from service.runtime.tooling import ToolCall, ToolResult, dropped, ungrounded
from skills.safety_state import ActiveAlert
from skills.tools import SPECS, SkillTools
from tests.runtime.assistant_server import AssistantServer
from tests.skills.conftest import vehicle

DRIVING = dict(gear=vehicle_pb2.GEAR_DRIVE, ignition=vehicle_pb2.IGNITION_ON, speed=50.0)


class Assistant(AssistantServer):
    """The Assistant service on its own port, its role settable per test."""

    def __init__(self, host):
        self.role = "hmi"
        self.tools = SkillTools(host)
        super().__init__(AssistantService(None, tools=self.tools, role_of=lambda context: self.role))

    async def ask(self, question: str) -> assistant_pb2.AskDone:
        return await self.done(assistant_pb2.AskRequest(question=question, route_to_skill=True), timeout=30)


def park_record(r, *, level="P2", row="C", bay="17", gps=(48.137154, 11.576124), at=1_790_000_000.0):
    with r.db.transaction() as tx:
        tx.execute("INSERT INTO car_finder_parking(record_id, time, gps_valid, latitude_deg, longitude_deg,"
                   " altitude_m, accuracy_m, level, row_name, bay, sign_text, snapshot_id, snapshot_path)"
                   " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
                   ("park-1", at, 1, gps[0], gps[1], 500.0, 5.0, level, row, bay,
                    json.dumps([f"LEVEL {level}", f"{row}-{bay}"]), "", ""))


def clip(r, clip_id, camera, at, description):
    with r.db.transaction() as tx:
        tx.execute("INSERT INTO sentinel_clips(clip_id, camera_id, level, start_time, event_time, end_time,"
                   " frame_count, size_bytes, format, path, description) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                   (clip_id, camera, "alert", at - 5, at, at + 5, 20, 1000, "mp4", "/nonexistent", description))


def assert_grounded(answer: str, result_text: str, facts: list[str]):
    result = ToolResult(result_text, facts)
    assert not dropped(answer, result), f"facts dropped from {answer!r}: {dropped(answer, result)}"
    assert not ungrounded(answer, result), f"invented in {answer!r}: {ungrounded(answer, result)}"


async def test_answers_carry_every_fact_of_the_skill_state(harness, clock):
    r = await harness.start()
    park_record(r, at=clock())
    clip(r, "clip-a", "ext-front", clock() - 600, "a person walked up to the driver's door")
    clip(r, "clip-b", "ext-rear", clock() - 60, "a cyclist leaned on the boot")
    await r.host.greeter.enroll("Anna", True, key_fob_id="fob-anna")
    await r.host.greeter.enroll("Ben", True, key_fob_id="fob-ben")
    # An item alert as Safety holds it after locking (its own tests make it from frames).
    r.host.safety.items[7] = ActiveAlert("item_left_behind", clock() - 30, "backpack left on the rear seat",
                                         event_cursor=7, escalation_level=2)
    async with Assistant(r.host) as a:
        where = await a.ask("Where is my car?")
        assert where.handled_by == "car_finder" and where.tool == "car_finder.where_is_my_car"
        for fact in ("P2", "C", "17", "48.13715", "11.57612"):
            assert fact in where.answer
        clips = await a.ask("Was anyone near my car while I was away?")
        assert clips.tool == "sentinel.recent_clips"
        for fact in ("ext-front", "ext-rear", "a person walked up to the driver's door", "a cyclist leaned"):
            assert fact in clips.answer
        drivers = await a.ask("Who is enrolled?")
        assert "Anna" in drivers.answer and "Ben" in drivers.answer and "2 driver profiles" in drivers.answer
        alerts = await a.ask("Did I forget something in the car?")
        assert alerts.tool == "safety.left_behind"
        assert "item left behind" in alerts.answer and "level 2" in alerts.answer and "backpack" in alerts.answer
        for done in (where, clips, drivers, alerts):
            # The answer holds the result's facts and says nothing that is not in it.
            assert_grounded(done.answer, done.tool_result, [])
            assert done.chosen_by == "keywords"


def test_the_grounding_checks_catch_dropped_and_invented_facts():
    result = ToolResult("The car is parked on level P2, bay 17, since 2026-12-01 08:12.", ["P2", "17", "08:12"])
    assert dropped("Your car is on level P2.", result) == ["17", "08:12"]
    assert ungrounded("Level P2, bay 71 since 08:12, next to Mercedes.", result) == ["71", "Mercedes"]
    assert not ungrounded("It is on level P2, bay 17 (since 08:12).", result)


async def test_sentinel_is_armed_by_a_question_and_the_answer_says_so(harness):
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=False))
    async with Assistant(r.host) as a:
        done = await a.ask("Turn on sentry mode please")
        assert done.tool == "sentinel.arm" and done.answer.startswith("Done: I armed Sentinel")
        assert r.host.sentinel.armed and r.events_of("sentinel.armed")
        done = await a.ask("Sentinel off")
        assert done.tool == "sentinel.disarm" and "disarmed" in done.answer and not r.host.sentinel.armed


async def test_state_changing_tools_are_refused_while_driving_with_a_reason(harness):
    r = await harness.start()
    await r.set_vehicle(vehicle(**DRIVING))
    async with Assistant(r.host) as a:
        a.role = "admin"
        for question, tool in (("Arm Sentinel", "sentinel.arm"), ("Register my face, I am Anna", "greeter.enrol"),
                               ("Flash the headlights", "vehicle.flash_lights")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await a.ask(question)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, question
            assert tool in err.value.details() and "driving" in err.value.details()
        assert not r.host.sentinel.armed and not r.host.greeter.list_profiles()
        assert r.db.connect().execute("SELECT COUNT(*) FROM actions").fetchone()[0] == 0
        # Climate is fine while driving: it is asked of the gateway and the answer names the action.
        done = await a.ask("Turn the heating on, it is cold")
        assert done.tool == "vehicle.climate_on" and "climate" in done.answer and "act-" in done.answer
        assert r.db.connect().execute("SELECT kind FROM actions").fetchall()[0][0] == "climate_on"


async def test_the_callers_role_decides_who_may_enrol_or_act(harness):
    r = await harness.start()
    async with Assistant(r.host) as a:
        a.role = "hmi"       # the HMI may not enrol (biometric data): admin only, as Greeter/Enroll itself
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.ask("Please enrol my face, my name is Anna")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "Greeter/Enroll" in err.value.details()
        a.role = "camera"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.ask("Open the windows a bit to air out the cabin")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "vehicle actions" in err.value.details()
        a.role = "admin"     # no cabin camera in this harness: refused with the reason, nothing stored
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.ask("Please enrol my face, my name is Anna")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cabin camera" in err.value.details()
        assert not r.host.greeter.list_profiles()


async def test_forget_deletes_the_named_profile_and_says_so(harness):
    r = await harness.start()
    await r.host.greeter.enroll("Anna", True, key_fob_id="fob-anna")
    tools = SkillTools(r.host)
    with pytest.raises(Exception) as err:
        await tools.run(ToolCall("greeter.forget", {"name": "Zoe"}), "admin")
    assert getattr(err.value, "code", "") == "NOT_FOUND"
    result = await tools.run(ToolCall("greeter.forget", {"name": "anna"}), "admin")
    assert result.acted and "deleted Anna's profile" in result.text and not r.host.greeter.list_profiles()


def test_every_tool_has_a_description_and_an_object_schema():
    assert len({s.name for s in SPECS}) == len(SPECS)
    for spec in SPECS:
        assert spec.description and spec.parameters["type"] == "object" and "." in spec.name
