"""The one-way analysis path: camera frames in, through the perception cascade, to the skills.

Also the perception services other parts use on single images (enrolment, sign reading, the description a
text-only model gets of an image), so every part shares one set of loaded perception models.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import numpy as np
import structlog

from service.cameras.hub import CameraHub
from service.perception.cascade import Cascade
from service.perception.types import Face, FrameAnalysis, TextLine
from service.power.sources import record_busy

log = structlog.get_logger(__name__)


class AnalysisPipeline:
    def __init__(self, hub: CameraHub, cascade: Cascade):
        self.hub = hub
        self.cascade = cascade

    async def analyses(self) -> AsyncIterator[FrameAnalysis]:
        """Newest frame per camera (latest wins while the cascade is busy), analysed off the event loop."""
        async for frame in self.hub.frames():
            started = time.perf_counter()
            try:
                analysis = await asyncio.to_thread(self.cascade.analyze, frame.original, frame)
            except Exception:
                log.exception("pipeline.analysis_failed", camera_id=frame.camera_id)
                continue
            record_busy("cpu", time.perf_counter() - started)
            yield analysis

    # --- single images --------------------------------------------------------------------------------------
    def embed_faces(self, bgr: np.ndarray) -> list[Face]:
        faces = self.cascade.model("faces").detect(bgr)
        return self.cascade.model("identity").embed_faces(bgr, faces) if faces else []

    def read_signs(self, bgr: np.ndarray) -> list[TextLine]:
        return self.cascade.model("text").read(bgr)

    def describe_images(self, images: Sequence[np.ndarray]) -> str:
        """What a text-only model is told about images: the facts perception can see, stated plainly."""
        parts = []
        for index, bgr in enumerate(images, start=1):
            facts = []
            try:
                objects = self.cascade.model("objects").detect(bgr)
            except KeyError:
                objects = []
            counts = Counter(d.label for d in objects)
            if counts:
                facts.append(", ".join(f"{n} {label}{'s' if n > 1 else ''}" for label, n in counts.most_common()))
            faces = self.cascade.model("faces").detect(bgr)
            if faces:
                facts.append(f"{len(faces)} face{'s' if len(faces) > 1 else ''}")
            texts = [t.text for t in self.read_signs(bgr) if t.text.strip()]
            if texts:
                facts.append("text reading " + "; ".join(f'"{t}"' for t in texts[:4]))
            seen = "; ".join(facts) if facts else "nothing the perception models recognise"
            parts.append(f"Image {index}: {seen}.")
        return " ".join(parts)
