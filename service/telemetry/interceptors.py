"""gRPC server interceptors: metrics and one structured log line per RPC (request id, method, code, latency).

Unexpected exceptions become INTERNAL with the request id, and are logged with their traceback:
a client never sees a bare UNKNOWN.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import structlog

from service.rpc_wrap import is_abort, wrap_handler
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

        async def around(call, context):
            GRPC_STARTED.labels(service, method).inc()
            GRPC_ACTIVE.labels(service).inc()
            structlog.contextvars.bind_contextvars(request_id=request_id, rpc=f"{service}/{method}")
            started, exc = time.perf_counter(), None
            try:
                context.set_trailing_metadata((("x-request-id", request_id),))
                async for item in call():
                    yield item
            except BaseException as e:  # CancelledError too: it is recorded as CANCELLED
                exc = e
                if not isinstance(e, Exception) or is_abort(e):
                    raise
                log.exception("rpc.unexpected_error", service=service, method=method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")
            finally:
                code = _code_of(context, exc)
                elapsed = time.perf_counter() - started
                GRPC_ACTIVE.labels(service).dec()
                GRPC_HANDLED.labels(service, method, code.name).inc()
                GRPC_SECONDS.labels(service, method).observe(elapsed)
                level = log.info if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED) else log.warning
                level("rpc", service=service, method=method, code=code.name, latency_s=round(elapsed, 6),
                      details=(context.details() or None) if code != grpc.StatusCode.OK else None)
                structlog.contextvars.unbind_contextvars("request_id", "rpc")

        return wrap_handler(handler, around, method=details.method)


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
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
