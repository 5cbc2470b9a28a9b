"""One way to wrap a gRPC method handler, whatever its kind (unary/stream in x unary/stream out).

A server interceptor (telemetry, auth) writes its logic once, as `around(call, context)`: an async generator
that runs what it needs before, iterates `call()` (the real handler's responses: exactly one for a unary
response) and yields them on, and runs what it needs after or on error. `wrap_handler` adapts that to the
four handler kinds grpc.aio has.

`parse_after_around=True` makes the wrapped handler take raw bytes and parse them only inside `call()` (so
after an auth check), answering INVALID_ARGUMENT for bytes that are not the method's message.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

Call = Callable[[], AsyncIterator[Any]]
Around = Callable[[Call, grpc.aio.ServicerContext], AsyncIterator[Any]]


def is_abort(exc: BaseException) -> bool:
    """An exception by which grpc.aio ends a call on purpose (context.abort, a finished RPC, a client error),
    not a bug: interceptors let it through untouched."""
    return isinstance(exc, (grpc.aio.BaseError, grpc.RpcError))   # AbortError, UsageError, InternalError, AioRpcError


async def responses(result) -> AsyncIterator[Any]:
    """A streaming handler may be an async generator, or a coroutine that writes with context.write()."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result


def wrap_handler(handler: grpc.RpcMethodHandler, around: Around, *, method: str = "",
                 parse_after_around: bool = False) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer

    async def parse(raw, context):
        if not parse_after_around or deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{method}: request is not a valid protobuf message: {exc}")

    async def parse_stream(raw_iterator, context):
        async for raw in raw_iterator:
            yield await parse(raw, context)

    request_deserializer = None if parse_after_around else deserialize
    streaming_request = handler.request_streaming
    inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

    def call_for(request, context) -> Call:
        async def call() -> AsyncIterator[Any]:
            req = parse_stream(request, context) if streaming_request else await parse(request, context)
            if handler.response_streaming:
                async for item in responses(inner(req, context)):
                    yield item
            else:
                yield await inner(req, context)
        return call

    if handler.response_streaming:
        async def streaming(request, context):
            async for item in around(call_for(request, context), context):
                yield item
        make = grpc.stream_stream_rpc_method_handler if streaming_request else grpc.unary_stream_rpc_method_handler
        return make(streaming, request_deserializer, handler.response_serializer)

    async def unary(request, context):
        result = None
        async for item in around(call_for(request, context), context):
            result = item
        return result
    make = grpc.stream_unary_rpc_method_handler if streaming_request else grpc.unary_unary_rpc_method_handler
    return make(unary, request_deserializer, handler.response_serializer)
