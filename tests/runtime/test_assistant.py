"""Assistant.Ask over a real gRPC port (grpc.aio server in the test) with the real default bundle."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import cv2
import grpc
import numpy as np
import pytest
from tests.runtime.serving_support import language_model

from incar.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2
from service.runtime.assistant import AssistantService
from service.runtime.engine import GenerationEngine, GenerationRequest, TextDelta
from service.runtime.scheduler import JobClass, NpuScheduler, SchedulerConfig

CAMERA_FRAMES = {"cabin": np.full((32, 48, 3), 90, np.uint8)}


def frames_for(camera_ids):
    return [CAMERA_FRAMES[c] for c in camera_ids]  # KeyError(id) for an unknown camera


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Harness:
    def __init__(self, queue_limits=None):
        config = SchedulerConfig(queue_limits=queue_limits) if queue_limits else SchedulerConfig()
        self.scheduler = NpuScheduler(config)
        self.described: list[int] = []

        def describe(images):
            self.described.append(len(images))
            return "a grey, empty cabin"
        self.engine = GenerationEngine(language_model(), None, self.scheduler, describe_images=describe)
        self.service = AssistantService(self.engine, frames_for)

    async def __aenter__(self):
        self.server = grpc.aio.server()
        assistant_pb2_grpc.add_AssistantServicer_to_server(self.service, self.server)
        port = free_port()
        self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.target = f"127.0.0.1:{port}"
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = assistant_pb2_grpc.AssistantStub(self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        await self.server.stop(None)
        self.scheduler.close()


async def ask(stub, **fields):
    texts, done = [], None
    async for response in stub.Ask(assistant_pb2.AskRequest(**fields)):
        if response.HasField("done"):
            done = response.done
        else:
            texts.append(response.text)
    return texts, done


async def expect_status(stub, code, match, **fields):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ask(stub, **fields)
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details()


async def test_paris_over_grpc():
    async with Harness() as h:
        texts, done = await ask(h.stub, question="What is the capital of France?", max_tokens=24)
    assert "Paris" in done.answer and "".join(texts) == done.answer
    assert done.finish_reason in ("stop", "length") and done.handled_by == "model"
    assert done.model == language_model().bundle.manifest["name"] and done.model and done.backend == "cpu"
    t = done.timings
    assert t.time_to_first_token_s > 0 and t.end_to_end_s >= t.time_to_first_token_s and t.prompt_tokens > 0
    assert 0 < t.generated_tokens <= 24 and t.tokens_per_second > 0


def metric(name: str, **labels) -> float:
    from prometheus_client import REGISTRY
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_runtime_metrics_are_exported():
    before = {n: metric(n, priority="chat") for n in (
        "incar_time_to_first_token_seconds_count", "incar_inter_token_latency_seconds_count",
        "incar_queue_time_seconds_count", "incar_request_duration_seconds_count", "incar_preprocess_seconds_count",
        "incar_prompt_tokens_total", "incar_generation_tokens_total")}
    stopped = metric("incar_requests_total", priority="chat", outcome="length")
    async with Harness() as h:
        _, done = await ask(h.stub, question="Count to ten.", max_tokens=5,)
    assert done.finish_reason == "length"
    after = {n: metric(n, priority="chat") for n in before}
    for name in ("incar_time_to_first_token_seconds_count", "incar_queue_time_seconds_count",
                 "incar_request_duration_seconds_count", "incar_preprocess_seconds_count"):
        assert after[name] == before[name] + 1, name
    assert after["incar_inter_token_latency_seconds_count"] == before["incar_inter_token_latency_seconds_count"] + 4
    assert after["incar_generation_tokens_total"] == before["incar_generation_tokens_total"] + 5
    assert after["incar_prompt_tokens_total"] - before["incar_prompt_tokens_total"] == done.timings.prompt_tokens
    assert metric("incar_requests_total", priority="chat", outcome="length") == stopped + 1
    assert metric("incar_requests_running", priority="chat") == 0
    assert metric("incar_requests_waiting", priority="chat") == 0


async def test_json_schema_over_grpc():
    schema = {"type": "object", "properties": {"answer": {"type": "string"}, "confident": {"type": "boolean"}},
              "required": ["answer", "confident"]}
    async with Harness() as h:
        _, done = await ask(h.stub, question="What is the capital of France?", json_schema=json.dumps(schema),
                            max_tokens=32)
    value = json.loads(done.answer)
    assert isinstance(value["answer"], str) and isinstance(value["confident"], bool)


async def test_cancelled_stream_stops_decoding_within_one_step():
    async with Harness() as h:
        call = h.stub.Ask(assistant_pb2.AskRequest(question="Tell me a very long story about a road trip.",
                                                   max_tokens=400))
        received = 0
        async for _response in call:
            received += 1
            if received == 4:
                break
        steps_at_cancel = h.scheduler.steps_total
        call.cancel()
        # Let the server notice the cancellation and unwind.
        for _ in range(100):
            await asyncio.sleep(0.02)
            if h.scheduler.running("chat") == 0:
                break
        assert h.scheduler.running("chat") == 0
        after = h.scheduler.steps_total - steps_at_cancel
    # The step already in flight may finish; at most one more can have started before the cancel crossed loopback.
    assert after <= 2, f"{after} decode steps ran after the client cancelled"
    print(f"decode steps after cancel: {after}")


async def test_safety_request_overtakes_a_long_chat_answer():
    async with Harness() as h:
        chat_tokens: list[float] = []

        async def long_chat():
            async for item in h.engine.stream(GenerationRequest(
                    prompt="Write a long story about a road trip.", max_tokens=120, ignore_eos=True)):
                if isinstance(item, TextDelta):
                    chat_tokens.append(asyncio.get_running_loop().time())
            return asyncio.get_running_loop().time()

        chat = asyncio.create_task(long_chat())
        while len(chat_tokens) < 5:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        safety_start = loop.time()
        answer = await h.engine.complete("A child is alone in the back seat. Say one short warning.",
                                         priority=JobClass.CRITICAL, max_tokens=16)
        safety_end = loop.time()
        chat_end = await chat
    assert answer.strip()
    assert safety_end < chat_end
    during = [t for t in chat_tokens if safety_start < t < safety_end]
    # At most the chat step that was already running when the safety request arrived.
    assert len(during) <= 1, f"chat produced {len(during)} tokens while the safety request ran"


async def test_queue_full_is_resource_exhausted():
    async with Harness(queue_limits={"chat": 0}) as h:
        first = asyncio.create_task(ask(h.stub, question="Tell me a long story about a road trip.", max_tokens=60))
        while h.scheduler.running("chat") == 0:
            await asyncio.sleep(0.01)
        await expect_status(h.stub, grpc.StatusCode.RESOURCE_EXHAUSTED, "chat queue is full",
                            question="What is the capital of France?")
        await first


async def test_images_and_cameras_reach_the_model_as_descriptions():
    ok, jpeg = cv2.imencode(".jpg", np.full((40, 60, 3), 200, np.uint8))
    async with Harness() as h:
        _, done = await ask(h.stub, question="Is anyone in the cabin?", camera_ids=["cabin"], max_tokens=8,
                            images=[common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG, data=jpeg.tobytes())])
        assert h.described == [2] and done.answer


async def test_bad_input_statuses():
    async with Harness() as h:
        await expect_status(h.stub, grpc.StatusCode.INVALID_ARGUMENT, "question", question="  ")
        await expect_status(h.stub, grpc.StatusCode.INVALID_ARGUMENT, "images[1]", question="What is this?",
                            images=[common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_RAW_BGR, width=2, height=2,
                                                     data=bytes(12)),
                                    common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG, data=b"not a jpeg")])
        await expect_status(h.stub, grpc.StatusCode.INVALID_ARGUMENT, "RAW_BGR 4x4 needs 48 bytes",
                            question="What is this?",
                            images=[common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_RAW_BGR, width=4, height=4,
                                                     data=bytes(10))])
        await expect_status(h.stub, grpc.StatusCode.NOT_FOUND, "'trunk'", question="Anything there?",
                            camera_ids=["trunk"])
        await expect_status(h.stub, grpc.StatusCode.INVALID_ARGUMENT, "json_schema", question="hi",
                            json_schema="[1, 2")
        await expect_status(h.stub, grpc.StatusCode.INVALID_ARGUMENT, "temperature", question="hi",
                            sampling=assistant_pb2.Sampling(temperature=-0.5))
        await expect_status(h.stub, grpc.StatusCode.INVALID_ARGUMENT, "the limit is 4000", question="car " * 3000)
        h.service.config.max_question_chars = 20000
        await expect_status(h.stub, grpc.StatusCode.INVALID_ARGUMENT, "does not fit the context of 2048 tokens",
                            question="car " * 3000)
        h.service.set_engine(None)
        await expect_status(h.stub, grpc.StatusCode.UNAVAILABLE, "loading", question="hi")


async def test_deadline_exceeded_mid_answer():
    async with Harness() as h:
        hold = None

        async def hold_the_npu():
            # A safety job occupies the executor past the client's deadline, mid-answer.
            async with h.scheduler.admit("critical") as ticket:
                await ticket.step(time.sleep, 2.5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in h.stub.Ask(assistant_pb2.AskRequest(question="Tell me a long story.", max_tokens=400),
                                      timeout=2.0):
                if hold is None:
                    hold = asyncio.create_task(hold_the_npu())
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert hold is not None, "no text arrived before the deadline"
        await hold
        steps = h.scheduler.steps_total
        for _ in range(100):
            if h.scheduler.running("chat") == 0:
                break
            await asyncio.sleep(0.02)
        assert h.scheduler.running("chat") == 0
        assert h.scheduler.steps_total - steps <= 1  # no decoding goes on after the deadline


async def test_a_session_that_throws_mid_decode_fails_that_request_and_the_next_is_served(monkeypatch):
    from service.runtime import generator

    real_append = generator.SharedSequence.append     # the default bundle's CPU variants keep shared state
    calls = {"n": 0}

    def faulty_append(self, token_id):
        calls["n"] += 1
        if calls["n"] == 3:   # the third decode step of the first answer: mid-decode
            raise RuntimeError("injected NPU session fault")
        return real_append(self, token_id)

    monkeypatch.setattr(generator.SharedSequence, "append", faulty_append)
    async with Harness() as h:
        await expect_status(h.stub, grpc.StatusCode.UNAVAILABLE, "injected NPU session fault",
                            question="What is the capital of France?", max_tokens=16)
        texts, done = await ask(h.stub, question="What is the capital of France?", max_tokens=16)
        assert "Paris" in done.answer and done.finish_reason in ("stop", "length")
        assert h.scheduler.running("chat") == 0 and h.scheduler.waiting("chat") == 0
