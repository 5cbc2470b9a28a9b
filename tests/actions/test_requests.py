"""What the in-process API refuses, and how skills reach it through their context."""
from __future__ import annotations

import pytest

from incar.v1 import actions_pb2, common_pb2
from service.actions import ActionQueue, ActionRequestError
from service.store.db import Database
from service.store.events import EventLog
from skills.base import Skill, SkillContext, TemplateNarrator


@pytest.fixture
def queue(tmp_path):
    db = Database(tmp_path / "incar.db")
    q = ActionQueue(db)
    EventLog(db)
    db.migrate()
    yield q
    db.close()


@pytest.mark.parametrize("kind, options, named", [
    ("teleport", {}, "kind"),
    ("horn", {"reason": ""}, "reason"),
    ("horn", {"priority": "urgent"}, "priority"),
    ("horn", {"target": "front_left"}, "target"),
    ("door_lock_hold", {}, "target"),
    ("door_lock_hold", {"target": "sunroof"}, "target"),
    ("child_lock", {"target": "driver"}, "target"),          # a seat, not a door
    ("seat_mirror_profile", {"target": "driver"}, "parameters.profile_id"),
    ("owner_notification", {"parameters": {"title": "x"}}, "parameters.body"),
    ("horn", {"expiry_s": 0}, "expiry_s"),
    ("horn", {"cause_event": "yesterday"}, "cause_event"),
])
def test_bad_requests_name_the_field(queue, kind, options, named):
    options = {"reason": "testing", **options}
    with pytest.raises(ActionRequestError) as err:
        queue.request(kind, **options)
    assert str(err.value).startswith(named)


def test_targets_by_name_or_enum(queue):
    by_name = queue.request("child_lock", reason="child in the back", target="rear_right")
    by_enum = queue.request("door_lock_hold", reason="scooter", target="DOOR_ID_TAILGATE")
    assert by_name.door == 4 and by_enum.door == 5
    assert queue.request(actions_pb2.ACTION_KIND_EMERGENCY_CALL, reason="no response").kind == 8


class Probe(Skill):
    name = "probe"


def test_a_skill_acts_through_its_context_and_is_named_as_the_requester(queue, tmp_path):
    ctx = SkillContext(db=queue.db, events=EventLog(queue.db), narrator=TemplateNarrator(), data_dir=tmp_path,
                       actions=queue)
    cause = ctx.events.append("probe.seen", "probe", common_pb2.SEVERITY_INFO, "seen")
    action = Probe(ctx).act("hazard_lights", reason="testing", cause_event=cause)
    status = queue.get(action.id)
    assert status.action.requested_by == "probe" and status.action.cause_event_cursor == cause.cursor
    assert Probe(SkillContext(db=queue.db, events=ctx.events, narrator=TemplateNarrator(),
                              data_dir=tmp_path)).act("horn", reason="no queue") is None
