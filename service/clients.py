"""Client commands: `incar health` (gRPC health + reasons) and `incar events` (tail the event stream).

Every client command connects the same way (`add_connection_args`, `Connection`): plaintext to a loopback
server, TLS with `--ca`, mTLS with `--cert/--key`, a bearer token with `--token`; each option also reads an
environment variable (INCAR_TARGET, INCAR_CA, INCAR_CERT, INCAR_KEY, INCAR_TOKEN) so a container health check
works in every security mode without a different command line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from incar.v1 import common_pb2, events_pb2, events_pb2_grpc, system_pb2, system_pb2_grpc
from service.security.credentials import channel_credentials

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Connection:
    """Where a client connects and how it proves who it is."""

    target: str = DEFAULT_TARGET
    ca_file: str = ""           # TLS: trust this CA (required for --cert/--key/--token)
    cert_file: str = ""         # mTLS: the client certificate (its SAN/OU carries the role)
    key_file: str = ""
    token: str = ""             # a bearer token (sent over TLS only; the server refuses it in plaintext)
    server_name: str = ""       # TLS name to expect when the target is an address the certificate does not name

    def __post_init__(self):
        if (self.cert_file or self.key_file or self.token) and not self.ca_file:
            raise ValueError("--cert/--key/--token need --ca (the CA that signed the server's certificate)")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("--cert and --key go together")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Connection:
        return cls(target=args.target, ca_file=args.ca, cert_file=args.cert, key_file=args.key, token=args.token,
                   server_name=args.server_name)

    def open(self) -> grpc.aio.Channel:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if not self.ca_file:
            return grpc.aio.insecure_channel(self.target, options=options)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        creds = channel_credentials(self.ca_file, self.cert_file or None, self.key_file or None, self.token or None)
        return grpc.aio.secure_channel(self.target, creds, options=options)


def open_channel(target: str | Connection) -> grpc.aio.Channel:
    """A channel to `target`: an address (plaintext) or a Connection (TLS, mTLS, token as it says)."""
    return (target if isinstance(target, Connection) else Connection(target)).open()


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--target", default=env("INCAR_TARGET", DEFAULT_TARGET),
                        help=f"server address (default $INCAR_TARGET or {DEFAULT_TARGET})")
    parser.add_argument("--ca", default=env("INCAR_CA", ""), help="CA certificate (PEM): connect with TLS")
    parser.add_argument("--cert", default=env("INCAR_CERT", ""), help="client certificate (PEM) for mTLS")
    parser.add_argument("--key", default=env("INCAR_KEY", ""), help="client private key (PEM) for mTLS")
    parser.add_argument("--token", default=env("INCAR_TOKEN", ""), help="bearer token (over TLS)")
    parser.add_argument("--server-name", default="", help="the name in the server certificate, if not the target's")


def connection_or_exit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Connection:
    try:
        return Connection.from_args(args)
    except ValueError as exc:
        parser.error(str(exc))


def run_call(prog: str, coro) -> int:
    """Run a client command's coroutine; the exit status every client command uses: its own (0 done), 1 when the
    call failed (the gRPC status and details, or the OS error, on stderr after the command's name). Usage errors
    exit 2 through argparse before anything runs."""
    try:
        return int(asyncio.run(coro) or 0)
    except grpc.aio.AioRpcError as exc:
        print(f"{prog}: {exc.code().name}: {exc.details()}", file=sys.stderr)
    except OSError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
    return 1


async def check_health(target: str | Connection, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
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
        except grpc.aio.AioRpcError as exc:     # health is open to all; the reasons need a role
            lines.append(f"  (no reasons: {exc.code().name}: {exc.details()})")
        return serving, "\n".join(lines)


def health_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="incar health", description="Query gRPC health (exit 0 when SERVING)")
    add_connection_args(parser)
    parser.add_argument("--json", action="store_true", help="print the status as one JSON object")
    parser.add_argument("--service", default="", help="a service name, e.g. incar.v1.Assistant (default: overall)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    serving, text = asyncio.run(check_health(connection_or_exit(parser, args), args.service, args.timeout))
    print(json.dumps({"service": args.service or "overall", "serving": serving, "detail": text.splitlines()})
          if args.json else text)
    return 0 if serving else 1


def format_event(event: common_pb2.Event) -> str:
    severity = common_pb2.Severity.Name(event.severity).removeprefix("SEVERITY_")
    when = event.time.ToDatetime().strftime("%H:%M:%S")
    camera = f" [{event.camera_id}]" if event.camera_id else ""
    return f"#{event.cursor} {when} {severity:<8} {event.kind}{camera}: {event.message}"


def event_as_json(event: common_pb2.Event) -> dict:
    """The event as a JSON object; its payload as the object it holds, not a string inside a string."""
    data = MessageToDict(event, preserving_proto_field_name=True)
    text = data.pop("payload_json", "")
    try:
        data["payload"] = json.loads(text) if text else {}
    except ValueError:
        data["payload"] = text
    return data


async def tail_events(target: str | Connection, after: int, kinds: list[str], as_json: bool, limit: int = 0) -> int:
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
                    print(json.dumps(event_as_json(event)) if as_json else format_event(event), flush=True)
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
    add_connection_args(parser)
    parser.add_argument("--after", type=int, default=0, help="start after this cursor (default: the oldest)")
    parser.add_argument("--kind", action="append", default=[], help="kind prefix filter, e.g. sentinel. (repeatable)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--limit", type=int, default=0, help="stop after N events")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(tail_events(connection_or_exit(parser, args), args.after, args.kind, args.json, args.limit))
    except KeyboardInterrupt:
        return 0
