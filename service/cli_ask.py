"""`incar ask` and `incar chat`: questions to a running server's Assistant, the answer streamed as it is made.

    incar ask "Where is my car?" [--image FILE ...] [--camera ID ...] [--no-tools] [--max-tokens N]
    incar chat                                  # interactive; an empty line or Ctrl-D ends it

Timings (time to first token, tokens per second) go to stderr after each answer, as llama-cli prints them.
Both connect like every client command (--target, --ca/--cert/--key for TLS/mTLS, --token; INCAR_* env).
Until the server keeps a conversation's decoder state, `chat` sends the recent turns with each question.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc

from incar.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2
from service.clients import Connection, add_connection_args, connection_or_exit, run_call

HISTORY_TURNS = 3          # earlier (question, answer) pairs resent by `chat`
HISTORY_CHARS = 1500       # and at most this much of them: the question limit is the server's


ENCODINGS = {b"\xff\xd8": common_pb2.IMAGE_ENCODING_JPEG, b"\x89P": common_pb2.IMAGE_ENCODING_PNG}


def image_from(path: str) -> common_pb2.Image:
    """A JPEG or PNG file as an inline image; any other format is converted to PNG first (OpenCV reads it)."""
    data = Path(path).read_bytes()
    encoding = ENCODINGS.get(data[:2])
    if encoding is None:
        import cv2
        image = cv2.imread(path)
        if image is None:
            raise OSError(f"--image {path}: not an image OpenCV can read")
        data, encoding = cv2.imencode(".png", image)[1].tobytes(), common_pb2.IMAGE_ENCODING_PNG
    return common_pb2.Image(encoding=encoding, data=data)


def ask_request(question: str, images: list[str], cameras: list[str], tools: bool,
                max_tokens: int) -> assistant_pb2.AskRequest:
    return assistant_pb2.AskRequest(question=question, images=[image_from(p) for p in images],
                                    camera_ids=cameras, route_to_skill=tools, max_tokens=max_tokens)


def describe_done(done: assistant_pb2.AskDone) -> str:
    t = done.timings
    who = f"{done.handled_by}" + (f" via {done.tool} ({done.chosen_by})" if done.tool else "")
    parts = [who, f"finish {done.finish_reason}"]
    if t.time_to_first_token_s:
        parts.append(f"TTFT {t.time_to_first_token_s * 1e3:.0f} ms")
    if t.tokens_per_second:
        parts.append(f"{t.tokens_per_second:.1f} tok/s")
    if t.generated_tokens:
        parts.append(f"{t.prompt_tokens} prompt + {t.generated_tokens} generated tokens")
    parts.append(f"{t.end_to_end_s:.2f} s")
    model = f"{done.model}/{done.backend}" if done.model else ""
    return "[" + ", ".join(p for p in (*parts, model) if p) + "]"


async def stream_answer(stub, request: assistant_pb2.AskRequest, out=sys.stdout, err=sys.stderr,
                        timeout: float | None = None) -> assistant_pb2.AskDone | None:
    done = None
    async for item in stub.Ask(request, timeout=timeout):
        if item.WhichOneof("item") == "text":
            out.write(item.text)
            out.flush()
        else:
            done = item.done
    out.write("\n")
    if done is not None:
        err.write(describe_done(done) + "\n")
    return done


def _arguments(parser: argparse.ArgumentParser, question: bool) -> None:
    add_connection_args(parser)
    if question:
        parser.add_argument("question")
        parser.add_argument("--image", action="append", default=[], metavar="FILE", help="an image (repeatable)")
        parser.add_argument("--camera", action="append", default=[], metavar="ID", help="a camera's latest frame")
    parser.add_argument("--no-tools", action="store_true", help="the general model only, no skill tools")
    parser.add_argument("--max-tokens", type=int, default=0, help="0: the server's default")
    parser.add_argument("--timeout", type=float, default=120.0)


async def _ask(conn: Connection, args) -> int:
    async with conn.open() as channel:
        stub = assistant_pb2_grpc.AssistantStub(channel)
        request = ask_request(args.question, args.image, args.camera, not args.no_tools, args.max_tokens)
        await stream_answer(stub, request, timeout=args.timeout)
    return 0


def with_history(history: list[tuple[str, str]], question: str) -> str:
    """The recent turns and the new question, trimmed to HISTORY_CHARS from the oldest turn."""
    turns = [f"Driver: {q}\nAssistant: {a}" for q, a in history[-HISTORY_TURNS:]]
    while turns and sum(map(len, turns)) > HISTORY_CHARS:
        turns.pop(0)
    return "\n".join([*turns, question]) if turns else question


async def _chat(conn: Connection, args, lines=None) -> int:
    lines = lines if lines is not None else sys.stdin
    history: list[tuple[str, str]] = []
    async with conn.open() as channel:
        stub = assistant_pb2_grpc.AssistantStub(channel)
        while True:
            sys.stdout.write("> ")
            sys.stdout.flush()
            line = await asyncio.to_thread(lines.readline)
            question = line.strip()
            if not question:
                return 0
            # With tools the question goes alone (the model chooses a tool from its words, and a tool answers
            # from the car's state); with --no-tools the general model gets the recent turns too.
            text = question if not args.no_tools else with_history(history, question)
            request = ask_request(text, [], [], not args.no_tools, args.max_tokens)
            try:
                done = await stream_answer(stub, request, timeout=args.timeout)
            except grpc.aio.AioRpcError as exc:
                print(f"incar: {exc.code().name}: {exc.details()}", file=sys.stderr)
                continue
            if done is not None:
                history.append((question, done.answer))


def ask_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="incar ask", description="Ask the Assistant; the answer streams")
    _arguments(parser, question=True)
    args = parser.parse_args(argv)
    return run_call("incar ask", _ask(connection_or_exit(parser, args), args))


def chat_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="incar chat", description="An interactive session with the Assistant")
    _arguments(parser, question=False)
    args = parser.parse_args(argv)
    return run_call("incar chat", _chat(connection_or_exit(parser, args), args))
