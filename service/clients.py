"""Client commands: `incar health` (gRPC health + reasons) and `incar events` (tail the event stream)."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from incar.v1 import common_pb2, events_pb2, events_pb2_grpc, system_pb2, system_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


def open_channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    options = [("grpc.max_receive_message_length", 16 * 1024 * 1024),
               ("grpc.max_send_message_length", 16 * 1024 * 1024)]
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"server address (default {DEFAULT_TARGET})")


async def check_health(target: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """(serving, text): the health status, and the reasons the System service gives."""
    async with open_channel(target) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
        serving = response.status == health_pb2.HealthCheckResponse.SERVING
        lines = [f"{service or 'overall'}: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}"]
        try:
            status = await system_pb2_grpc.SystemStub(channel).GetStatus(system_pb2.GetSystemStatusRequest(),
                                                                          timeout=timeout)
            for c in status.components:
                lines.append(f"  {c.name}: {'SERVING' if c.serving else 'NOT_SERVING'}"
                             + (f" ({c.reason})" if c.reason else ""))
            lines.append(f"  model={status.model or '-'} backend={status.backend or '-'} "
                         f"vehicle_mode={status.vehicle_mode}")
        except grpc.aio.AioRpcError:
            pass
        return serving, "\n".join(lines)


def health_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="incar health", description="Query gRPC health (exit 0 when SERVING)")
    _add_target(parser)
    parser.add_argument("--service", default="", help="a service name, e.g. incar.v1.Assistant (default: overall)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    serving, text = asyncio.run(check_health(args.target, args.service, args.timeout))
    print(text)
    return 0 if serving else 1


def format_event(event: common_pb2.Event) -> str:
    severity = common_pb2.Severity.Name(event.severity).removeprefix("SEVERITY_")
    when = event.time.ToDatetime().strftime("%H:%M:%S")
    camera = f" [{event.camera_id}]" if event.camera_id else ""
    return f"#{event.cursor} {when} {severity:<8} {event.kind}{camera}: {event.message}"


async def tail_events(target: str, after: int, kinds: list[str], as_json: bool, limit: int = 0) -> int:
    """Follow the stream; on a dropped connection, reconnect with the last cursor so nothing is missed."""
    seen = 0
    cursor = after
    backoff = 0.5
    while True:
        try:
            async with open_channel(target) as channel:
                stream = events_pb2_grpc.EventsStub(channel).Subscribe(
                    events_pb2.SubscribeRequest(after_cursor=cursor, kinds=kinds))
                async for event in stream:
                    backoff = 0.5
                    cursor = event.cursor
                    print(json.dumps(MessageToDict(event)) if as_json else format_event(event), flush=True)
                    seen += 1
                    if limit and seen >= limit:
                        return 0
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                print(f"incar events: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            print(f"incar events: connection lost ({exc.code().name}); resuming after #{cursor}", file=sys.stderr)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)


def events_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="incar events", description="Tail the event stream (resumes by cursor)")
    _add_target(parser)
    parser.add_argument("--after", type=int, default=0, help="start after this cursor (default: the oldest)")
    parser.add_argument("--kind", action="append", default=[], help="kind prefix filter, e.g. sentinel. (repeatable)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--limit", type=int, default=0, help="stop after N events")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(tail_events(args.target, args.after, args.kind, args.json, args.limit))
    except KeyboardInterrupt:
        return 0
