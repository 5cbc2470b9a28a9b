"""Commands in over MQTT (arm/disarm Sentinel), allowed only to a caller whose role may call the same gRPC method.

MQTT carries no caller identity the service can trust (any client may put anything in a payload or a user
property), so each command carries a bearer token, checked against `security.tokens` and the gRPC role table.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable

from service.mqtt import metrics
from service.security.auth import allowed

# armed -> the gRPC method a caller must be allowed to arm or disarm over MQTT
SENTINEL_METHODS = {True: "/incar.v1.Sentinel/Arm", False: "/incar.v1.Sentinel/Disarm"}
MAX_PAYLOAD = 4096

SetArmed = Callable[[bool], Awaitable[dict]]


class CommandRefused(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Commands:
    def __init__(self, tokens: dict[str, tuple[str, str]], set_sentinel_armed: SetArmed | None):
        self.tokens = tokens                    # sha256 hex -> (identity, role), as SecurityConfig.load_tokens()
        self.set_sentinel_armed = set_sentinel_armed

    async def sentinel(self, payload: bytes, retained: bool) -> dict:
        """The reply for one `.../sentinel/set` message: {"ok": true, ...} or {"ok": false, "code", "error"}."""
        request_id = ""
        try:
            if retained:
                raise CommandRefused("INVALID_ARGUMENT", "retained commands are ignored (they would replay on "
                                                         "every reconnect)")
            body = _parse(payload)
            request_id = str(body.get("request_id", ""))[:128]
            armed = body.get("armed")
            if not isinstance(armed, bool):
                raise CommandRefused("INVALID_ARGUMENT", "armed: expected true or false")
            method = SENTINEL_METHODS[armed]
            identity, role = self._caller(body.get("token"))
            if not allowed(role, method):
                raise CommandRefused("PERMISSION_DENIED", f"{method}: role {role!r} ({identity}) may not call this")
            if self.set_sentinel_armed is None:
                raise CommandRefused("UNAVAILABLE", "Sentinel is not part of this service")
            status = await self.set_sentinel_armed(armed)
        except CommandRefused as exc:
            metrics.COMMANDS.labels("sentinel", exc.code).inc()
            return {"ok": False, "code": exc.code, "error": str(exc), "request_id": request_id}
        except Exception as exc:    # the skill refused (FAILED_PRECONDITION and the like): say so, keep running
            metrics.COMMANDS.labels("sentinel", "FAILED").inc()
            return {"ok": False, "code": "FAILED_PRECONDITION", "error": str(exc), "request_id": request_id}
        metrics.COMMANDS.labels("sentinel", "OK").inc()
        return {"ok": True, "request_id": request_id, "by": identity, **status}

    def _caller(self, token) -> tuple[str, str]:
        if not isinstance(token, str) or not token.strip():
            raise CommandRefused("UNAUTHENTICATED", "token: a command needs the bearer token of an allowed role")
        entry = self.tokens.get(hashlib.sha256(token.strip().encode()).hexdigest())
        if entry is None:
            raise CommandRefused("UNAUTHENTICATED", "token: unknown bearer token")
        return entry


def _parse(payload: bytes) -> dict:
    if len(payload) > MAX_PAYLOAD:
        raise CommandRefused("INVALID_ARGUMENT", f"payload: at most {MAX_PAYLOAD} bytes")
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CommandRefused("INVALID_ARGUMENT", f"payload: not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise CommandRefused("INVALID_ARGUMENT", "payload: expected a JSON object")
    return body
