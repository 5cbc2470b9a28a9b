"""A small web HMI: a page on loopback and the JSON/SSE gateway it talks to, a gRPC client of the service.

Routes (all read the gRPC API; the page holds no state of its own):
  GET  /                              the page (static/index.html)
  GET  /api/cameras                   Cameras.ListCameras
  GET  /api/cameras/{id}/snapshot     LiveView.GetSnapshot: the latest frame (base64 JPEG) and its detections
  GET  /api/alerts                    Safety.GetStatus and Sentinel.GetStatus
  GET  /api/events                    Events.Subscribe as Server-Sent Events; resumes after Last-Event-ID
  POST /api/ask                       Assistant.Ask as Server-Sent Events: text pieces, then the done record
A gRPC error becomes the HTTP status that means the same (400, 404, 503, ...) with the server's message.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
from pathlib import Path

import grpc
from aiohttp import web
from google.protobuf.json_format import MessageToDict

from incar.v1 import (assistant_pb2, assistant_pb2_grpc, cameras_pb2, cameras_pb2_grpc, events_pb2,
                      events_pb2_grpc, liveview_pb2, liveview_pb2_grpc, skills_pb2, skills_pb2_grpc)
from service.clients import Connection, add_connection_args, connection_or_exit, event_as_json

STATIC = Path(__file__).resolve().parent / "static"
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 409,
               grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.PERMISSION_DENIED: 403,
               grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
               grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNAVAILABLE: 503}
MAX_QUESTION_BYTES = 4096
RPC_TIMEOUT_S = 10.0


def _dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True)


def _error(exc: grpc.aio.AioRpcError) -> web.Response:
    return web.json_response({"error": {"code": exc.code().name, "message": exc.details()}},
                             status=HTTP_STATUS.get(exc.code(), 502))


class Gateway:
    def __init__(self, connection: Connection):
        self.connection = connection
        self.channel: grpc.aio.Channel | None = None

    # --- lifecycle --------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/", self.index)
        app.router.add_static("/static/", STATIC)
        app.router.add_get("/api/cameras", self.cameras)
        app.router.add_get("/api/cameras/{camera_id}/snapshot", self.snapshot)
        app.router.add_get("/api/alerts", self.alerts)
        app.router.add_get("/api/events", self.events)
        app.router.add_post("/api/ask", self.ask)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app) -> None:
        self.channel = self.connection.open()

    async def _close(self, app) -> None:
        if self.channel is not None:
            await self.channel.close()

    # --- handlers ---------------------------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def cameras(self, request: web.Request) -> web.Response:
        try:
            reply = await cameras_pb2_grpc.CamerasStub(self.channel).ListCameras(
                cameras_pb2.ListCamerasRequest(), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return _error(exc)
        return web.json_response(_dict(reply))

    async def snapshot(self, request: web.Request) -> web.Response:
        try:
            width = int(request.query.get("max_width", "640"))
        except ValueError:
            return web.json_response({"error": {"code": "INVALID_ARGUMENT", "message": "max_width: an integer"}},
                                     status=400)
        try:
            snap = await liveview_pb2_grpc.LiveViewStub(self.channel).GetSnapshot(
                liveview_pb2.GetSnapshotRequest(camera_id=request.match_info["camera_id"], max_width=width),
                timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return _error(exc)
        data = _dict(snap)
        data["image"] = {"mime": "image/jpeg", "width": snap.image.width, "height": snap.image.height,
                         "base64": base64.b64encode(snap.image.data).decode()}
        return web.json_response(data)

    async def alerts(self, request: web.Request) -> web.Response:
        try:
            safety = await skills_pb2_grpc.SafetyStub(self.channel).GetStatus(
                skills_pb2.SafetyStatusRequest(), timeout=RPC_TIMEOUT_S)
            sentinel = await skills_pb2_grpc.SentinelStub(self.channel).GetStatus(
                skills_pb2.SentinelStatusRequest(), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return _error(exc)
        return web.json_response({"safety": _dict(safety), "sentinel": _dict(sentinel)})

    async def events(self, request: web.Request) -> web.StreamResponse:
        after = request.headers.get("Last-Event-ID") or request.query.get("after", "0")
        if not after.isdigit():
            return web.json_response({"error": {"code": "INVALID_ARGUMENT", "message": "after: a cursor"}},
                                     status=400)
        stream = events_pb2_grpc.EventsStub(self.channel).Subscribe(
            events_pb2.SubscribeRequest(after_cursor=int(after)))
        response = await self._sse(request)
        try:
            async for event in stream:
                await response.write(f"id: {event.cursor}\ndata: {json.dumps(event_as_json(event))}\n\n".encode())
        except grpc.aio.AioRpcError as exc:
            await self._send_error(response, exc)
        except ConnectionResetError:
            pass                                  # the page went away: nothing to tell it
        finally:
            stream.cancel()
        return response

    async def ask(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            question = str(body["question"]).strip()
            cameras = [str(c) for c in body.get("camera_ids", [])]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": {"code": "INVALID_ARGUMENT",
                                                "message": 'body: JSON {"question": "...", "camera_ids": [...]}'}},
                                     status=400)
        if not question or len(question.encode()) > MAX_QUESTION_BYTES:
            return web.json_response({"error": {"code": "INVALID_ARGUMENT",
                                                "message": f"question: 1..{MAX_QUESTION_BYTES} bytes"}}, status=400)
        call = assistant_pb2_grpc.AssistantStub(self.channel).Ask(
            assistant_pb2.AskRequest(question=question, camera_ids=cameras, route_to_skill=True), timeout=120)
        response = await self._sse(request)
        try:
            async for item in call:
                payload = {"text": item.text} if item.WhichOneof("item") == "text" else {"done": _dict(item.done)}
                await response.write(f"data: {json.dumps(payload)}\n\n".encode())
        except grpc.aio.AioRpcError as exc:
            await self._send_error(response, exc)
        except ConnectionResetError:
            pass                                  # the page went away: the answer stops with it
        finally:
            call.cancel()
        return response

    # --- SSE --------------------------------------------------------------------------------------------------
    @staticmethod
    async def _sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        return response

    @staticmethod
    async def _send_error(response: web.StreamResponse, exc: grpc.aio.AioRpcError) -> None:
        error = {"error": {"code": exc.code().name, "message": exc.details()}}
        await response.write(f"event: error\ndata: {json.dumps(error)}\n\n".encode())


async def serve(connection: Connection, host: str, port: int) -> web.AppRunner:
    """Start the page and gateway; returns the runner (await runner.cleanup() to stop)."""
    runner = web.AppRunner(Gateway(connection).app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    return runner.addresses[0][1]


def hmi_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="incar hmi", description="Serve the web HMI (a page and its gateway)")
    add_connection_args(parser)
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HTTP address (default loopback 127.0.0.1:8080)")
    args = parser.parse_args(argv)
    connection = connection_or_exit(parser, args)
    host, _, port = args.listen.rpartition(":")

    async def run() -> None:
        runner = await serve(connection, host or "127.0.0.1", int(port))
        print(f"incar hmi: http://{host or '127.0.0.1'}:{bound_port(runner)}/ (gRPC {connection.target})", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0
