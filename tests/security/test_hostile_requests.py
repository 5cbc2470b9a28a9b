"""Hostile clients of the whole service (issue 13, holes 2, 6 and 7): a scan bomb as an Ask image, schemas
nested 100k deep or megabytes long, NaN/inf sampling values, thousands of streams on one connection and
connections that never speak. Real server, real port, real model bundle."""
from __future__ import annotations

import asyncio
import json
import socket
import struct

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from incar.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2
from service.runtime.constrained import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH
from tests.security.bombs import progressive_scan_bomb
from tests.security.conftest import make_app


@pytest.fixture
async def live(tmp_path):
    app = make_app(tmp_path, ["transport.handshake_timeout_seconds=1", "transport.max_connections=64",
                              "transport.max_concurrent_streams=16"])
    await app.start()
    await app.ready()
    yield app
    await app.stop(0.2)


async def _ask(ch, request: assistant_pb2.AskRequest, timeout: float = 60) -> grpc.aio.AioRpcError | None:
    try:
        async for _ in assistant_pb2_grpc.AssistantStub(ch).Ask(request, timeout=timeout):
            pass
    except grpc.aio.AioRpcError as err:
        return err
    return None


async def test_a_scan_bomb_as_an_ask_image_is_refused_while_health_answers(live):
    bomb = common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG, data=progressive_scan_bomb())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{live.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        asks = [asyncio.ensure_future(_ask(ch, assistant_pb2.AskRequest(question="what is this?", images=[bomb]),
                                           timeout=10)) for _ in range(3)]
        checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
        for err in await asyncio.gather(*asks):
            assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert "images[0].image.data" in err.details() and "scans" in err.details(), err.details()


async def test_hostile_schemas_are_refused_with_invalid_argument_naming_json_schema(live):
    deep = "{\"a\":" * 8_000 + "1" + "}" * 8_000             # 48 KB: json.loads alone hits RecursionError
    deepest = "{\"a\":" * 100_000 + "1" + "}" * 100_000      # the hostile run's 100k levels
    big = json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 64}
                                                       for i in range(60_000)}})           # ~7 MB
    fine = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                       "additionalProperties": False})
    assert len(big) > MAX_SCHEMA_BYTES
    async with grpc.aio.insecure_channel(f"127.0.0.1:{live.port}",
                                         options=[("grpc.max_send_message_length", 16 * 2**20)]) as ch:
        for schema, why in ((deep, f"deeper than {MAX_SCHEMA_DEPTH}"), (deepest, f"the limit is {MAX_SCHEMA_BYTES}"),
                            (big, f"the limit is {MAX_SCHEMA_BYTES}")):
            err = await _ask(ch, assistant_pb2.AskRequest(question="hi", json_schema=schema, max_tokens=4))
            assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert "json_schema" in err.details() and why in err.details(), err.details()
        assert await _ask(ch, assistant_pb2.AskRequest(question="Are you ok?", json_schema=fine,
                                                       max_tokens=32), timeout=300) is None   # a loaded host


@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("temperature", float("inf")),
                                         ("top_p", float("nan"))])
async def test_non_finite_sampling_values_are_invalid_argument(live, field, value):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{live.port}") as ch:
        sampling = assistant_pb2.Sampling(**{field: value})
        err = await _ask(ch, assistant_pb2.AskRequest(question="hello", sampling=sampling, max_tokens=4))
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert field in err.details() and "finite" in err.details(), err.details()


def _server_settings(port: int) -> dict[int, int]:
    """The HTTP/2 SETTINGS the server sends to a fresh connection (hand-written client preface)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        data = b""
        while len(data) < 9 or len(data) < 9 + int.from_bytes(data[:3], "big"):
            chunk = sock.recv(4096)
            assert chunk, "the server closed the connection before its SETTINGS"
            data += chunk
    length, kind = int.from_bytes(data[:3], "big"), data[3]
    assert kind == 0x4, f"first frame is type {kind}, not SETTINGS"
    payload = data[9:9 + length]
    return {struct.unpack(">H", payload[i:i + 2])[0]: struct.unpack(">I", payload[i + 2:i + 6])[0]
            for i in range(0, length, 6)}


async def test_streams_per_connection_are_capped(live):
    settings = await asyncio.to_thread(_server_settings, live.port)
    assert settings.get(0x3) == 16, settings          # SETTINGS_MAX_CONCURRENT_STREAMS


def _silent_connections(port: int, count: int) -> list[socket.socket]:
    out = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        out.append(sock)
    return out


def _closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes (EOF or reset); False when it is still open after the socket timeout."""
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_silent_connections_are_capped_and_closed_and_health_still_answers(live):
    """100 TCP connections that never send the HTTP/2 preface: those over the cap (64) are closed at once, the rest
    when the handshake timeout (1 s) passes; a health check waiting for a slot then gets through."""
    socks = await asyncio.to_thread(_silent_connections, live.port, 100)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{live.port}") as ch:
            checked = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30,
                                                                  wait_for_ready=True)
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
        closed = await asyncio.to_thread(lambda: [_closed_by_server(s) for s in socks])
        assert all(closed), f"{closed.count(False)} silent connections were never closed"
    finally:
        for sock in socks:
            sock.close()
