"""The skills' tools: what the model may choose, with a one-line description and JSON-schema arguments.

`SkillTools` implements `service.runtime.tooling.ToolRegistry` over a `SkillHost`: it lists the specs, gives the
few-shot examples the model chooses from, runs a chosen tool and returns a grounded result (tools_answers.py).
A tool that changes the car's state needs the caller's role to allow the equivalent gRPC method (the same
policy as `service.security.auth.ROLE_METHODS`) and is refused while driving where that is unsafe.
"""
from __future__ import annotations

from collections.abc import Callable

from service.runtime.tooling import ToolCall, ToolRefused, ToolResult, ToolSpec
from service.security.auth import allowed
from skills.base import InvalidRequestError, NotFoundError, PreconditionError, is_moving
from skills.router import route_tool
from skills import tools_answers as answers
# What the model learns to route from (kept apart from tests/data/routing.jsonl: the bench checks it).
from skills.tool_examples import EXAMPLES

_NAME_ARG = {"type": "object", "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64}},
             "required": ["name"], "additionalProperties": False}
_LIMIT_ARG = {"type": "object", "properties": {"limit": {"type": "integer", "minimum": 1, "maximum": 10}},
              "additionalProperties": False}

SPECS: list[ToolSpec] = [
    ToolSpec("car_finder.where_is_my_car", "where the car is parked: level, row, bay, GPS, since when",
             skill="car_finder"),
    ToolSpec("sentinel.status", "whether Sentinel surveillance mode is armed, and why", skill="sentinel"),
    ToolSpec("sentinel.arm", "turn Sentinel surveillance on to guard the parked car", changes_state=True,
             skill="sentinel"),
    ToolSpec("sentinel.disarm", "turn Sentinel surveillance off", changes_state=True, skill="sentinel"),
    ToolSpec("sentinel.recent_clips", "what Sentinel recorded near the parked car: people, times, cameras",
             _LIMIT_ARG, skill="sentinel"),
    ToolSpec("greeter.enrol", "register the driver's face so the car recognises them", _NAME_ARG,
             changes_state=True, skill="greeter"),
    ToolSpec("greeter.forget", "delete a driver's profile and face template", _NAME_ARG, changes_state=True,
             skill="greeter"),
    ToolSpec("greeter.who_is_here", "which driver profiles the car knows and recognises", skill="greeter"),
    ToolSpec("safety.status", "the active safety alerts and their escalation levels", skill="safety"),
    ToolSpec("safety.is_it_safe_to_exit", "whether it is safe to open a door and get out now", skill="safety"),
    ToolSpec("safety.left_behind", "whether a child, a pet or a bag was left in the locked car", skill="safety"),
    ToolSpec("vehicle.climate_on", "turn the climate control on, optionally to a temperature",
             {"type": "object", "properties": {"temperature_c": {"type": "integer", "minimum": 16, "maximum": 30}},
              "additionalProperties": False}, changes_state=True, skill="vehicle"),
    ToolSpec("vehicle.flash_lights", "flash the headlights to spot the car in a car park", changes_state=True,
             skill="vehicle"),
    ToolSpec("vehicle.vent_windows", "open the windows a little to air the cabin", changes_state=True,
             skill="vehicle"),
]

# The gRPC method each state-changing tool stands for: the caller's role must be allowed to call it.
METHODS = {"sentinel.arm": "/incar.v1.Sentinel/Arm", "sentinel.disarm": "/incar.v1.Sentinel/Disarm",
           "greeter.enrol": "/incar.v1.Greeter/Enroll", "greeter.forget": "/incar.v1.Greeter/DeleteProfile"}
# Vehicle actions come from a person in or at the car: the HMI and admin roles (never cameras or the gateway).
ACTION_ROLES = ("hmi", "admin")
UNSAFE_WHILE_DRIVING = {"greeter.enrol": "enrolment needs the driver to look into the cabin camera",
                        "sentinel.arm": "Sentinel guards a parked car",
                        "vehicle.flash_lights": "flashing headlights at other drivers is a signal to them"}


class SkillTools:
    def __init__(self, host, *, permits: Callable[[str, str], bool] = allowed, vehicle_actions=None):
        self.host = host
        self.permits = permits
        self.vehicle_actions = vehicle_actions
        self._specs = {s.name: s for s in SPECS}
        self._run = {
            "car_finder.where_is_my_car": lambda a: answers.where_is_my_car(host.car_finder),
            "sentinel.status": lambda a: answers.sentinel_status(host.sentinel),
            "sentinel.arm": lambda a: answers.sentinel_arm(host.sentinel),
            "sentinel.disarm": lambda a: answers.sentinel_disarm(host.sentinel),
            "sentinel.recent_clips": lambda a: answers.recent_clips(host.sentinel, int(a.get("limit") or 3)),
            "greeter.enrol": lambda a: answers.enrol(host, str(a.get("name", ""))),
            "greeter.forget": lambda a: answers.forget(host.greeter, str(a.get("name", ""))),
            "greeter.who_is_here": lambda a: answers.who_is_here(host.greeter),
            "safety.status": lambda a: answers.safety_status(host.safety),
            "safety.is_it_safe_to_exit": lambda a: answers.safe_to_exit(host.safety),
            "safety.left_behind": lambda a: answers.left_behind(host.safety),
            "vehicle.climate_on": lambda a: answers.vehicle_action(
                host.ctx.actions, "climate_on", "the driver asked for the climate on",
                {"temperature_c": str(a["temperature_c"])} if "temperature_c" in a else None),
            "vehicle.flash_lights": lambda a: answers.vehicle_action(
                host.ctx.actions, "headlight_flash", "the driver asked to flash the lights to find the car"),
            "vehicle.vent_windows": lambda a: answers.vehicle_action(
                host.ctx.actions, "window_vent", "the driver asked to air the cabin"),
        }

    def specs(self) -> list[ToolSpec]:
        return list(self._specs.values())

    def examples(self) -> list[tuple[str, str, dict]]:
        return list(EXAMPLES)

    def keyword_call(self, question: str) -> ToolCall | None:
        found = route_tool(question)
        return ToolCall(found[0], found[1], "keywords") if found else None

    def spec(self, name: str) -> ToolSpec | None:
        return self._specs.get(name)

    async def run(self, call: ToolCall, role: str) -> ToolResult:
        spec = self._specs.get(call.name)
        if spec is None:
            raise ToolRefused("INVALID_ARGUMENT", f"tool: unknown tool {call.name!r}")
        if spec.skill == "vehicle" and role not in ACTION_ROLES:
            raise ToolRefused("PERMISSION_DENIED", f"{call.name}: role {role!r} may not ask for vehicle actions "
                                                   f"(roles: {', '.join(ACTION_ROLES)})")
        method = METHODS.get(call.name)
        if method and not self.permits(role, method):
            raise ToolRefused("PERMISSION_DENIED", f"{call.name}: role {role!r} may not change this "
                                                   f"(it needs {method})")
        if call.name in UNSAFE_WHILE_DRIVING and is_moving(self.host.sentinel.vehicle):
            raise ToolRefused("FAILED_PRECONDITION", f"{call.name}: refused while driving: "
                                                     f"{UNSAFE_WHILE_DRIVING[call.name]}")
        try:
            result = self._run[call.name](call.arguments)
            if hasattr(result, "__await__"):
                result = await result
            return result
        except PreconditionError as exc:
            raise ToolRefused("FAILED_PRECONDITION", f"{call.name}: {exc}") from None
        except InvalidRequestError as exc:
            raise ToolRefused("INVALID_ARGUMENT", f"{call.name}: {exc}") from None
        except NotFoundError as exc:
            raise ToolRefused("NOT_FOUND", f"{call.name}: {exc}") from None
