"""The Assistant's conversation RPCs: StartConversation, Converse (streamed like Ask), EndConversation.

Mixed into AssistantService, whose engine, limits and image intake (inline images, camera frames) a turn uses
as a question does. One turn of a conversation at a time: its history is what the next turn starts from.
"""
from __future__ import annotations

import time

import grpc

from incar.v1 import assistant_pb2
from service.rpc_errors import abort_for
from service.runtime.answer_stream import answer_stream
from service.runtime.conversations import ConversationNotFound, ConversationStore
from service.runtime.engine import GenerationRequest


class ConversationRpcs:
    conversations: ConversationStore

    async def StartConversation(self, request, context):
        engine = self._engine
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._loading_reason)
        conversation = self.conversations.start(engine.config.system_prompt)
        return assistant_pb2.ConversationInfo(session_id=conversation.session_id,
                                              idle_expiry_s=self.conversations.config.idle_seconds)

    async def Converse(self, request, context):
        engine = self._engine
        message = await self._checked_text("message", request.message, request, context)
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._loading_reason)
        try:
            conversation = self.conversations.get(request.session_id)
        except ConversationNotFound as exc:
            await abort_for(context, exc)
        if not conversation.lock.acquire(blocking=False):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"session_id {request.session_id!r}: the previous turn is still being answered")
        try:
            images = await self._gather_images(request, context)
            remaining = context.time_remaining()
            gen = GenerationRequest(
                prompt=message, images=images, max_tokens=request.max_tokens,
                temperature=request.sampling.temperature, top_p=request.sampling.top_p or 1.0,
                top_k=request.sampling.top_k, seed=request.sampling.seed, priority=self.config.priority,
                deadline=time.monotonic() + remaining if remaining is not None else None,
                is_cancelled=context.cancelled, conversation=conversation)
            async for response in answer_stream(engine, gen, context):
                yield response
            self.conversations.kept(conversation)
        finally:
            conversation.lock.release()

    async def EndConversation(self, request, context):
        try:
            self.conversations.end(request.session_id)
        except ConversationNotFound as exc:
            await abort_for(context, exc)
        return assistant_pb2.EndConversationResponse()
