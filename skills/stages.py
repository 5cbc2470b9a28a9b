"""Extra perception stages skills ask for on a camera, merged: Greeter wants faces + identity on the side cameras
while someone walks up; Sentinel wants body pose on the exterior cameras while armed. Each skill states its own
wish; the camera runs its usual stages plus the union of the wishes, and its usual stages again when none is left.
"""
from __future__ import annotations

import structlog

log = structlog.get_logger(__name__)


class CameraStages:
    """Over `service.perception.cascade.Cascade.set_requested`: the union of the skills' wishes per camera."""

    def __init__(self, cascade):
        self.cascade = cascade
        self._wants: dict[str, dict[str, tuple[str, ...]]] = {}

    def want(self, camera_id: str, skill: str, stages: tuple[str, ...] | None) -> None:
        wants = self._wants.setdefault(camera_id, {})
        if stages:
            wants[skill] = tuple(stages)
        else:
            wants.pop(skill, None)
        extra = {s for wanted in wants.values() for s in wanted}
        if "pose" in extra:
            extra.add("objects")          # pose rides with the object detector
        if "identity" in extra or "age" in extra:
            extra.add("faces")
        self.cascade.set_requested(camera_id, tuple(sorted(extra)))
        log.info("skills.camera_stages", camera_id=camera_id, skill=skill, stages=stages, extra=sorted(extra))

    def requested(self, camera_id: str) -> set[str]:
        """The stages skills ask for on this camera now (the analysis pipeline keeps them in every lane)."""
        return {s for wanted in self._wants.get(camera_id, {}).values() for s in wanted}

    def switch(self, skill: str, stages: tuple[str, ...]):
        """A (camera_id, on) callable for one skill's wish."""
        return lambda camera_id, on: self.want(camera_id, skill, stages if on else None)
