"""One handler wrapper for every interceptor: the four RPC kinds pass through telemetry and a second
interceptor built on `wrap_handler`; aborts keep their code, bugs become INTERNAL with the request id."""
from __future__ import annotations

import grpc
import pytest
from prometheus_client import REGISTRY

from service.rpc_wrap import is_abort, wrap_handler
from service.telemetry.interceptors import TelemetryInterceptor
from tests.conftest import free_port

SERVICE = "test.Echo"


async def _unary_unary(request: bytes, context):
    if request == b"abort":
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "echo: not now")
    if request == b"bug":
        raise KeyError("a bug")
    return request.upper()


async def _unary_stream(request: bytes, context):
    for ch in request:
        if ch == ord("!"):
            raise RuntimeError("a bug mid-stream")
        yield bytes([ch])


async def _stream_unary(requests, context):
    return b"".join([r async for r in requests])


async def _stream_stream(requests, context):
    async for r in requests:
        await context.write(r[::-1])      # the coroutine style: writes, returns nothing


class Tagging(grpc.aio.ServerInterceptor):
    """A second interceptor written once for all kinds: counts each response it passes on."""
    seen: list[str] = []

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)

        async def around(call, context):
            async for item in call():
                self.seen.append(details.method.rsplit("/", 1)[-1])
                yield item
        return wrap_handler(handler, around, method=details.method)


@pytest.fixture
async def channel():
    server = grpc.aio.server(interceptors=[TelemetryInterceptor(), Tagging()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "UU": grpc.unary_unary_rpc_method_handler(_unary_unary),
        "US": grpc.unary_stream_rpc_method_handler(_unary_stream),
        "SU": grpc.stream_unary_rpc_method_handler(_stream_unary),
        "SS": grpc.stream_stream_rpc_method_handler(_stream_stream)})])
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(None)


def _handled(method: str, code: str) -> float:
    return REGISTRY.get_sample_value("incar_grpc_server_handled_total",
                                     {"grpc_service": SERVICE, "grpc_method": method, "grpc_code": code}) or 0.0


async def test_every_kind_passes_through_both_interceptors(channel):
    Tagging.seen.clear()
    assert await channel.unary_unary(f"/{SERVICE}/UU")(b"abc") == b"ABC"
    assert [r async for r in channel.unary_stream(f"/{SERVICE}/US")(b"xy")] == [b"x", b"y"]
    assert await channel.stream_unary(f"/{SERVICE}/SU")(iter([b"a", b"b"])) == b"ab"
    assert [r async for r in channel.stream_stream(f"/{SERVICE}/SS")(iter([b"ab", b"cd"]))] == [b"ba", b"dc"]
    assert Tagging.seen == ["UU", "US", "US", "SU"]   # context.write() bypasses the yield path, as in grpc


async def test_aborts_keep_their_code_and_bugs_become_internal(channel):
    before_abort, before_bug = _handled("UU", "FAILED_PRECONDITION"), _handled("UU", "INTERNAL")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary(f"/{SERVICE}/UU")(b"abort")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and err.value.details() == "echo: not now"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary(f"/{SERVICE}/UU")(b"bug", metadata=(("x-request-id", "req-42"),))
    assert err.value.code() == grpc.StatusCode.INTERNAL and "request id req-42" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [r async for r in channel.unary_stream(f"/{SERVICE}/US")(b"a!")]
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert _handled("UU", "FAILED_PRECONDITION") == before_abort + 1
    assert _handled("UU", "INTERNAL") == before_bug + 1


def test_aborts_are_recognised_by_grpc_aio_types():
    assert is_abort(grpc.aio.AbortError()) and is_abort(grpc.aio.UsageError()) and is_abort(grpc.aio.InternalError())
    assert not is_abort(KeyError("x"))

    class AbortError(Exception):   # a look-alike name is not an abort
        pass
    assert not is_abort(AbortError())
