"""`incar.v1.Assistant`: a question about cameras or inline images, answered as a token stream.

Status codes: UNAVAILABLE while the model loads (or a camera has no frame yet), INVALID_ARGUMENT for bad
input (naming the field or image index), NOT_FOUND for an unknown camera id, RESOURCE_EXHAUSTED when the
priority's queue is full, DEADLINE_EXCEEDED when the deadline passes mid-answer. A client that cancels stops
the decode within one step (the engine checks `context.cancelled()` before each step; grpc.aio also cancels
the handler task, which lands on the step in flight).
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import structlog

from incar.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2
from service.cameras.decoding import decode_for_call
from service.rpc_errors import abort_for
from service.runtime.answer_stream import answer_stream
from service.runtime.conversation_service import ConversationRpcs
from service.runtime.conversations import ConversationStore
from service.runtime.engine import (GenerationEngine, GenerationRequest)
from service.runtime.scheduler import QueueFullError
from service.runtime.tool_answer import ToolAnswerer, word_result
from service.runtime.tooling import ToolRegistry, ToolResult

log = structlog.get_logger(__name__)

# frames_for(camera_ids) -> one BGR frame per id, in order. Raises KeyError(camera_id) for an unknown camera
# and LookupError (not KeyError) when a known camera has no frame yet.
FramesFor = Callable[[Sequence[str]], Sequence[np.ndarray]]
# answer_screen(question, images) -> the facts of an HMI screen among the images, or None (skills.hmi_screen).
AnswerScreen = Callable[[str, Sequence[np.ndarray]], Awaitable[ToolResult | None]]


@dataclass
class AssistantConfig:
    priority: str = "chat"          # scheduler priority of Ask requests
    max_images: int = 4             # inline images + cameras per question
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096   # checked from the header, before decoding (decompression bombs)
    max_question_chars: int = 4000
    tool_choice: str = "head"       # how the model picks a tool: "head", "nearest", "greedy" or "likelihood"
                                    # (tool_choice.py)
    keyword_prior: bool = False     # mode "head": the keyword router's choice as a prior (docs/tool-routing.md)
    word_tool_results: bool = True  # the model words a tool's result (kept only when it holds every fact)

    def validate(self) -> None:
        from service.runtime.scheduler import PRIORITIES
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority: {self.priority!r} is not one of {', '.join(PRIORITIES)}")
        if self.max_images < 0:
            raise ValueError(f"max_images: must be >= 0, got {self.max_images}")
        if self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes: must be >= 1, got {self.max_image_bytes}")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels: must be >= 1, got {self.max_image_pixels}")
        if self.max_question_chars < 1:
            raise ValueError(f"max_question_chars: must be >= 1, got {self.max_question_chars}")
        from service.runtime.tool_choice import MODES
        if self.tool_choice not in MODES:
            raise ValueError(f"tool_choice: expected one of {', '.join(MODES)}, got {self.tool_choice!r}")


class AssistantService(ConversationRpcs, assistant_pb2_grpc.AssistantServicer):
    def __init__(self, engine: GenerationEngine | None = None, frames_for: FramesFor | None = None,
                 config: AssistantConfig | None = None, tools: ToolRegistry | None = None,
                 role_of: Callable[[object], str] | None = None, answer_screen: AnswerScreen | None = None,
                 conversations: ConversationStore | None = None):
        self.config = config or AssistantConfig()
        self.config.validate()
        self._engine = engine
        self.conversations = conversations or ConversationStore()
        self._frames_for = frames_for
        self._loading_reason = "the language model is loading"
        # The caller's role decides which state-changing tools it may use (server.py reads it from the auth
        # check); without one, the least privileged role.
        self._role_of = role_of or (lambda context: "hmi")
        self._answer_screen = answer_screen     # questions about HMI screenshots, answered from their layout
        self.tools = ToolAnswerer(tools, self.config) if tools is not None else None
        if engine is not None and self.tools is not None:
            self.tools.use(engine)

    def set_engine(self, engine: GenerationEngine | None, reason: str = "the language model is loading") -> None:
        """Called by the server once the model is loaded (or with None and a reason when it failed)."""
        self._engine = engine
        self._loading_reason = reason
        if self.tools is not None:
            self.tools.use(engine)

    async def Ask(self, request: assistant_pb2.AskRequest, context: grpc.aio.ServicerContext):
        engine = self._engine
        question = await self._checked_text("question", request.question, request, context)
        if request.route_to_skill and self.tools is not None:
            started = time.monotonic()
            try:
                answered = await self.tools.answer(question, self._role_of(context))
            except QueueFullError as exc:
                await abort_for(context, exc)
            if answered is not None and answered.refused is not None:
                await context.abort(getattr(grpc.StatusCode, answered.refused.code), str(answered.refused))
            if answered is not None:
                # The skill's facts, worded by the model only where its words kept them all.
                yield assistant_pb2.AskResponse(text=answered.text)
                yield assistant_pb2.AskResponse(done=assistant_pb2.AskDone(
                    answer=answered.text, finish_reason="stop", handled_by=answered.skill,
                    model=engine.name if engine else "", backend=engine.backend if engine else "",
                    tool=answered.call.name, tool_result=answered.result.text, chosen_by=answered.call.chosen_by,
                    timings=common_pb2.Timings(end_to_end_s=time.monotonic() - started)))
                return
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._loading_reason)
        images = await self._gather_images(request, context)
        if images and self._answer_screen is not None and not request.json_schema:
            started = time.monotonic()
            result = await self._answer_screen(question, images)
            if result is not None:
                # An HMI screen: the answer comes from its layout (the values OCR read), worded by the model.
                text = await word_result(engine, question, result)
                yield assistant_pb2.AskResponse(text=text)
                yield assistant_pb2.AskResponse(done=assistant_pb2.AskDone(
                    answer=text, finish_reason="stop", handled_by="screen", model=engine.name,
                    backend=engine.backend, tool="screen.read", tool_result=result.text,
                    timings=common_pb2.Timings(end_to_end_s=time.monotonic() - started)))
                return
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        gen = GenerationRequest(
            prompt=question, images=images, max_tokens=request.max_tokens,
            temperature=request.sampling.temperature, top_p=request.sampling.top_p or 1.0,
            top_k=request.sampling.top_k, seed=request.sampling.seed, stop=list(request.stop),
            json_schema=request.json_schema or None, priority=self.config.priority,
            deadline=deadline, is_cancelled=context.cancelled)
        async for response in answer_stream(engine, gen, context):
            yield response

    async def _checked_text(self, field: str, text: str, request, context) -> str:
        """The question (or a conversation's message) stripped, and its images within the limits."""
        text = text.strip()
        if not text:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: empty")
        if len(text) > self.config.max_question_chars:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{field}: {len(text)} characters, the limit is {self.config.max_question_chars}")
        if len(request.images) + len(request.camera_ids) > self.config.max_images:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{len(request.images)} images and {len(request.camera_ids)} cameras: at most "
                                f"{self.config.max_images} in total")
        return text

    async def _gather_images(self, request: assistant_pb2.AskRequest, context) -> list[np.ndarray]:
        images: list[np.ndarray] = []
        for i, image in enumerate(request.images):
            images.append(await decode_for_call(image, self.config.max_image_pixels, context, f"images[{i}]",
                                                max_bytes=self.config.max_image_bytes))
        if request.camera_ids:
            if self._frames_for is None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    "camera_ids given but no camera source is configured")
            try:
                frames = list(self._frames_for(list(request.camera_ids)))
            except KeyError as exc:
                camera = exc.args[0] if exc.args else "?"
                await context.abort(grpc.StatusCode.NOT_FOUND, f"camera_ids: unknown camera {camera!r}")
            except LookupError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"camera_ids: {exc}")
            images.extend(frames)
        return images
