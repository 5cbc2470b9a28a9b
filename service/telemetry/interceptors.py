"""gRPC server interceptors: metrics and one structured log line per RPC (request id, method, code, latency).

Unexpected exceptions become INTERNAL with the request id, and are logged with their traceback:
a client never sees a bare UNKNOWN.
"""
from __future__ import annotations

import time
import uuid

import grpc
import structlog

from service.telemetry.metrics import GRPC_ACTIVE, GRPC_HANDLED, GRPC_SECONDS, GRPC_STARTED

log = structlog.get_logger("incar.rpc")


def _split(method: str) -> tuple[str, str]:
    _, service, name = method.rsplit("/", 2) if method.count("/") >= 2 else ("", "", method)
    return service, name


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        service, method = _split(details.method)
        metadata = dict(details.invocation_metadata or ())
        request_id = metadata.get("x-request-id") or uuid.uuid4().hex[:16]

        def begin():
            GRPC_STARTED.labels(service, method).inc()
            GRPC_ACTIVE.labels(service).inc()
            structlog.contextvars.bind_contextvars(request_id=request_id, rpc=f"{service}/{method}")
            return time.perf_counter()

        def end(context, started, exc: BaseException | None):
            code = _code_of(context, exc)
            elapsed = time.perf_counter() - started
            GRPC_ACTIVE.labels(service).dec()
            GRPC_HANDLED.labels(service, method, code.name).inc()
            GRPC_SECONDS.labels(service, method).observe(elapsed)
            level = log.info if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED) else log.warning
            level("rpc", service=service, method=method, code=code.name, latency_s=round(elapsed, 6),
                  details=(context.details() or None) if code != grpc.StatusCode.OK else None)
            structlog.contextvars.unbind_contextvars("request_id", "rpc")

        async def guard(context, exc: BaseException):
            if not isinstance(exc, Exception) or isinstance(exc, grpc.RpcError) or _is_abort(exc):
                raise exc
            log.exception("rpc.unexpected_error", service=service, method=method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                started, exc = begin(), None
                try:
                    context.set_trailing_metadata((("x-request-id", request_id),))
                    return await inner(request, context)
                except BaseException as e:  # CancelledError too: it is recorded as CANCELLED
                    exc = e
                    await guard(context, e)
                finally:
                    end(context, started, exc)
            return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream:
            inner = handler.unary_stream

            async def unary_stream(request, context):
                started, exc = begin(), None
                try:
                    async for item in _aiter(inner(request, context)):
                        yield item
                except BaseException as e:  # CancelledError too: it is recorded as CANCELLED
                    exc = e
                    await guard(context, e)
                finally:
                    end(context, started, exc)
            return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.stream_unary:
            inner = handler.stream_unary

            async def stream_unary(request_iterator, context):
                started, exc = begin(), None
                try:
                    return await inner(request_iterator, context)
                except BaseException as e:  # CancelledError too: it is recorded as CANCELLED
                    exc = e
                    await guard(context, e)
                finally:
                    end(context, started, exc)
            return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer,
                                                        handler.response_serializer)
        inner = handler.stream_stream

        async def stream_stream(request_iterator, context):
            started, exc = begin(), None
            try:
                async for item in _aiter(inner(request_iterator, context)):
                    yield item
            except BaseException as e:
                exc = e
                await guard(context, e)
            finally:
                end(context, started, exc)
        return grpc.stream_stream_rpc_method_handler(stream_stream, handler.request_deserializer,
                                                     handler.response_serializer)


async def _aiter(result):
    """A streaming handler may be an async generator, or a coroutine that writes with context.write()."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result


def _is_abort(exc: BaseException) -> bool:
    return type(exc).__name__ in ("AbortError", "UsageError", "CancelledError", "InternalError")


def _code_of(context, exc: BaseException | None) -> grpc.StatusCode:
    try:
        code = context.code()
    except Exception:
        code = None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status
    if exc is None:
        return grpc.StatusCode.OK
    import asyncio
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
