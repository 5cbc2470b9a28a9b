"""An engine answer as the Assistant's gRPC stream: text pieces, then the done record; engine errors as the
gRPC status that means the same (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED)."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from incar.v1 import assistant_pb2, common_pb2
from service.rpc_errors import RequestError, abort_for
from service.runtime.engine import Done, GenerationEngine, GenerationRequest, TextDelta


def timings_proto(t) -> common_pb2.Timings:
    return common_pb2.Timings(
        queue_s=t.queue_s, preprocess_s=t.preprocess_s, vision_encode_s=t.vision_encode_s,
        time_to_first_token_s=t.time_to_first_token_s, tokens_per_second=t.tokens_per_second,
        end_to_end_s=t.end_to_end_s, prompt_tokens=t.prompt_tokens, generated_tokens=t.generated_tokens,
        cached_prompt_tokens=t.cached_prompt_tokens)


async def answer_stream(engine: GenerationEngine, request: GenerationRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[assistant_pb2.AskResponse]:
    try:
        # aclosing: an abort mid-stream still closes the generator now, freeing the scheduler slot at once.
        async with contextlib.aclosing(engine.stream(request)) as stream:
            async for item in stream:
                if isinstance(item, TextDelta):
                    yield assistant_pb2.AskResponse(text=item.text)
                elif isinstance(item, Done):
                    if item.finish_reason == "deadline":
                        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                            f"deadline passed after {item.timings.generated_tokens} tokens")
                    if item.finish_reason == "cancelled":
                        return
                    yield assistant_pb2.AskResponse(done=assistant_pb2.AskDone(
                        answer=item.text, finish_reason=item.finish_reason, handled_by="model",
                        model=engine.name, backend=engine.backend, timings=timings_proto(item.timings)))
    except RequestError as exc:    # a bad request, a full queue, a failed model step (the next one is served)
        await abort_for(context, exc)
