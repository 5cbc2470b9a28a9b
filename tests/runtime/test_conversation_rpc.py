"""Assistant conversations over gRPC on `incar serve`: follow-ups remember, prefill only themselves, and bad or
ended sessions get a clear status."""
from __future__ import annotations

import grpc
import pytest

from incar.v1 import assistant_pb2, assistant_pb2_grpc
from tests.foundation.test_stale_frames import wait_serving


async def turn(stub, session_id: str, message: str, max_tokens: int = 24) -> assistant_pb2.AskDone:
    pieces, done = [], None
    async for item in stub.Converse(assistant_pb2.ConverseRequest(session_id=session_id, message=message,
                                                                  max_tokens=max_tokens), timeout=120):
        if item.WhichOneof("item") == "text":
            pieces.append(item.text)
        else:
            done = item.done
    assert done is not None and "".join(pieces) == done.answer
    return done


async def status_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


async def test_conversation_over_grpc(server_process):
    server = server_process().start(timeout=120)
    async with grpc.aio.insecure_channel(server.target) as channel:
        await wait_serving(channel, "incar.v1.Assistant")
        stub = assistant_pb2_grpc.AssistantStub(channel)
        info = await stub.StartConversation(assistant_pb2.StartConversationRequest())
        assert info.session_id and info.idle_expiry_s > 0

        first = await turn(stub, info.session_id, "My car is a red hatchback parked on level 3.")
        second = await turn(stub, info.session_id, "What colour is my car?")
        assert "red" in second.answer.lower()
        # The follow-up restored the whole history and prefilled only the new turn.
        assert second.timings.cached_prompt_tokens >= first.timings.prompt_tokens
        assert second.timings.prompt_tokens - second.timings.cached_prompt_tokens < 30

        code, details = await status_of(stub.Converse(assistant_pb2.ConverseRequest(session_id=info.session_id)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "message" in details
        code, details = await status_of(stub.Converse(assistant_pb2.ConverseRequest(session_id="nope", message="hi")))
        assert code == grpc.StatusCode.NOT_FOUND and "nope" in details

        await stub.EndConversation(assistant_pb2.EndConversationRequest(session_id=info.session_id))
        code, details = await status_of(stub.Converse(
            assistant_pb2.ConverseRequest(session_id=info.session_id, message="Still there?")))
        assert code == grpc.StatusCode.NOT_FOUND and "ended by the client" in details
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await stub.EndConversation(assistant_pb2.EndConversationRequest(session_id=info.session_id))
        assert ended.value.code() == grpc.StatusCode.NOT_FOUND
