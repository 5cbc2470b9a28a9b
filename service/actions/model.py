"""Names skills use for action kinds, priorities and targets, checked and turned into the protobuf values."""
from __future__ import annotations

import json
from collections.abc import Mapping

from google.protobuf.timestamp_pb2 import Timestamp

from incar.v1 import actions_pb2, common_pb2, vehicle_pb2
from service.rpc_errors import InvalidRequestError

KINDS = {name.removeprefix("ACTION_KIND_").lower(): value
         for name, value in actions_pb2.ActionKind.items() if value}
PRIORITIES = {name.removeprefix("ACTION_PRIORITY_").lower(): value
              for name, value in actions_pb2.ActionPriority.items() if value}
DOORS = {name.removeprefix("DOOR_ID_").lower(): value for name, value in vehicle_pb2.DoorId.items() if value}
SEATS = {name.removeprefix("SEAT_ID_").lower(): value for name, value in vehicle_pb2.SeatId.items() if value}

DOOR_REQUIRED = {"door_lock_hold", "child_lock"}
DOOR_OPTIONAL = {"window_vent"}
SEAT_REQUIRED = {"seat_mirror_profile"}
# Comfort actions are routine unless the requester says otherwise; everything else can matter for safety.
ROUTINE_BY_DEFAULT = {"seat_mirror_profile", "owner_notification", "headlight_flash"}
MAX_REASON = 512
MAX_PARAMETERS = 16


class ActionRequestError(InvalidRequestError):
    """A request names an unknown kind, priority or target, or lacks what its kind needs; the message says which."""


def kind_name(kind: str | int) -> str:
    if isinstance(kind, int) and not isinstance(kind, bool):
        for name, value in KINDS.items():
            if value == kind:
                return name
        raise ActionRequestError(f"kind: unknown action kind {kind}")
    name = str(kind).lower().removeprefix("action_kind_")
    if name not in KINDS:
        raise ActionRequestError(f"kind: unknown action kind {kind!r} (known: {', '.join(KINDS)})")
    return name


def priority_value(priority: str | int | None, kind: str) -> int:
    if priority is None or priority == "":
        return PRIORITIES["routine" if kind in ROUTINE_BY_DEFAULT else "safety"]
    if isinstance(priority, int) and not isinstance(priority, bool):
        if priority not in PRIORITIES.values():
            raise ActionRequestError(f"priority: unknown priority {priority}")
        return priority
    name = str(priority).lower().removeprefix("action_priority_")
    if name not in PRIORITIES:
        raise ActionRequestError(f"priority: unknown priority {priority!r} (known: {', '.join(PRIORITIES)})")
    return PRIORITIES[name]


def _lookup(table: dict[str, int], value: str | int, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value not in table.values():
            raise ActionRequestError(f"target: unknown {what} {value}")
        return value
    name = str(value).lower().removeprefix(f"{what}_id_")
    if name not in table:
        raise ActionRequestError(f"target: unknown {what} {value!r} (known: {', '.join(table)})")
    return table[name]


def resolve_target(kind: str, target: str | int | None) -> tuple[int, int]:
    """(door, seat) for this kind: a door for holds, child locks and vents, a seat for profiles."""
    empty = target is None or target == "" or target == 0
    if kind in DOOR_REQUIRED or kind in DOOR_OPTIONAL:
        if empty:
            if kind in DOOR_REQUIRED:
                raise ActionRequestError(f"target: {kind} needs a door (one of {', '.join(DOORS)})")
            return 0, 0
        return _lookup(DOORS, target, "door"), 0
    if kind in SEAT_REQUIRED:
        if empty:
            raise ActionRequestError(f"target: {kind} needs a seat (one of {', '.join(SEATS)})")
        return 0, _lookup(SEATS, target, "seat")
    if not empty:
        raise ActionRequestError(f"target: {kind} takes no target, got {target!r}")
    return 0, 0


def check_parameters(kind: str, parameters: Mapping[str, object] | None) -> dict[str, str]:
    out = {str(k): str(v) for k, v in (parameters or {}).items()}
    if len(out) > MAX_PARAMETERS or any(len(k) > 64 or len(v) > 2048 for k, v in out.items()):
        raise ActionRequestError(f"parameters: at most {MAX_PARAMETERS}, keys <= 64 and values <= 2048 characters")
    if kind == "seat_mirror_profile" and not out.get("profile_id"):
        raise ActionRequestError("parameters.profile_id: seat_mirror_profile needs the profile to apply")
    if kind == "owner_notification" and not out.get("body"):
        raise ActionRequestError("parameters.body: owner_notification needs the text the owner reads")
    return out


def cause_of(cause_event: common_pb2.Event | int | None) -> tuple[int, str]:
    if cause_event is None:
        return 0, ""
    if isinstance(cause_event, common_pb2.Event):
        return int(cause_event.cursor), cause_event.kind
    if isinstance(cause_event, int) and not isinstance(cause_event, bool) and cause_event >= 0:
        return cause_event, ""
    raise ActionRequestError(f"cause_event: expected an Event or its cursor, got {cause_event!r}")


def _ts(seconds: float | None) -> Timestamp:
    ts = Timestamp()
    if seconds:
        ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def delivery_from_row(row) -> actions_pb2.VehicleAction:
    """A VehicleAction from a joined delivery + action row (see queue.DELIVERY_SELECT)."""
    return actions_pb2.VehicleAction(
        id=row["id"], cursor=row["cursor"], kind=KINDS[row["kind"]], state=row["d_state"],
        priority=row["d_priority"], reason=row["reason"], cause_event_cursor=row["cause_cursor"],
        cause_event_kind=row["cause_kind"], requested_by=row["requested_by"], created=_ts(row["created"]),
        expires=_ts(row["expires"]), attempt=row["d_attempt"], escalation_level=row["d_escalation"],
        door=row["door"], seat=row["seat"], parameters=json.loads(row["parameters_json"]))


def status_from_row(row) -> actions_pb2.ActionStatus:
    return actions_pb2.ActionStatus(action=delivery_from_row(row), state=row["state"], result=row["result"],
                                    detail=row["detail"], acknowledged=_ts(row["acknowledged"]),
                                    attempts=row["attempts"])
