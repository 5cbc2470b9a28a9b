"""The tiny AutoNeural VLM bundle at run time: the QDQ graphs (vision W8A16 + decoder W8A16, replace mode) on the
QNN HTP emulator with CPU fallback disabled give the tokens of the CPU EP run of the same graphs; and one Ask
over a real grpc.aio port with an inline image, whose pixels go through the vision encoder."""
from __future__ import annotations

import functools

import cv2
import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY
from tests.conftest import PHOTOS
from tests.runtime.test_assistant import ask, free_port

from incar.v1 import assistant_pb2_grpc, common_pb2
from service.modelbuild.autoneural import tiny_autoneural_bundle
from service.runtime import generator
from service.runtime.assistant import AssistantService
from service.runtime.backends import QNN_BACKENDS, create_session
from service.runtime.bundle import load_bundle
from service.runtime.engine import EngineConfig, GenerationEngine
from service.runtime.generator import LanguageModel
from service.runtime.scheduler import NpuScheduler
from service.runtime.vision import VisionEncoder

CONTEXT, STEPS = 512, 6


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("autoneural_rt") / "tiny-autoneural"
    # The vision context binary for the emulator ships in the bundle, as for a device target.
    tiny_autoneural_bundle(out, seed=1, precisions=("w8a16",), context_length=CONTEXT, targets=("emulator",))
    return load_bundle(out)


@pytest.fixture(scope="module")
def dog() -> np.ndarray:
    img = cv2.imread(str(PHOTOS / "dog.jpg"))
    assert img is not None
    return img


def _greedy(lm: LanguageModel, enc: VisionEncoder, img: np.ndarray, question: str, steps: int = STEPS):
    ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]))
    embeds = enc.encode(img)
    seq = lm.new_sequence(ids, [embeds])
    while not seq.prefill_step():
        pass
    tokens, logits = [], []
    for _ in range(steps):
        logits.append(seq.logits.copy())
        tokens.append(int(seq.logits.argmax()))
        seq.append(tokens[-1])
    return tokens, np.stack(logits), embeds


def test_qdq_graphs_on_the_htp_emulator_match_their_cpu_run(bundle, dog, monkeypatch, tmp_path):
    # The builder compiled every QDQ graph for the emulator with CPU fallback off (it fails on a rejected node).
    for component in ("vision", "decoder_prefill", "decoder_decode"):
        ctx = bundle.variant(component, "w8a16")["context_binaries"]["emulator"]
        assert bundle.file(ctx).is_file()
    cpu_tokens, cpu_logits, cpu_embeds = _greedy(LanguageModel(bundle, "cpu", variant="w8a16"),
                                                 VisionEncoder(bundle, "cpu", variant="w8a16"), dog, "Dog?")
    # The decoder sessions must run wholly on the HTP: session creation fails if any node would need the CPU.
    no_fallback = functools.partial(create_session, context_cache=tmp_path / "qnn-cache")

    def open_on_htp(path, backend="cpu", **kwargs):
        if backend in QNN_BACKENDS:
            kwargs["disable_cpu_fallback"] = True
        return no_fallback(path, backend, **kwargs)
    monkeypatch.setattr(generator, "create_session", open_on_htp)
    lm = LanguageModel(bundle, "qnn-emulator", variant="w8a16")
    enc = VisionEncoder(bundle, "qnn-emulator", variant="w8a16")
    # This machine's target (the emulator here) picks the bundle's shipped context binaries: no compile.
    for component in ("decoder_prefill", "decoder_decode"):
        ctx = bundle.variant(component, "w8a16")["context_binaries"]["emulator"]
        assert lm.model_files[component] == str(bundle.file(ctx))
    htp_tokens, htp_logits, htp_embeds = _greedy(lm, enc, dog, "Dog?")
    for model in ("decoder_prefill.w8a16", "decoder_decode.w8a16"):
        labels = {"backend": "qnn-emulator", "model": model}
        assert REGISTRY.get_sample_value("incar_runtime_nodes", {**labels, "placement": "cpu"}) == 0
        assert REGISTRY.get_sample_value("incar_runtime_nodes", {**labels, "placement": "npu"}) > 0
    assert htp_tokens == cpu_tokens, (htp_tokens, cpu_tokens)
    # Same integer arithmetic: the emulator's outputs sit on the CPU EP's to within a few 16-bit steps.
    np.testing.assert_allclose(htp_embeds, cpu_embeds, atol=0.02 * np.abs(cpu_embeds).max())
    np.testing.assert_allclose(htp_logits, cpu_logits, atol=0.02 * np.abs(cpu_logits).max())


async def test_ask_with_an_inline_image_goes_through_the_vision_encoder(bundle, dog):
    lm = LanguageModel(bundle, "cpu", threads=2)
    enc = VisionEncoder(bundle, "cpu")
    scheduler = NpuScheduler()
    engine = GenerationEngine(lm, enc, scheduler, config=EngineConfig(system_prompt=""))
    server = grpc.aio.server()
    assistant_pb2_grpc.add_AssistantServicer_to_server(AssistantService(engine), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            ok, jpeg = cv2.imencode(".jpg", dog)
            assert ok
            texts, done = await ask(assistant_pb2_grpc.AssistantStub(channel), question="What animal is this?",
                                    max_tokens=STEPS,
                                    images=[common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG,
                                                             data=jpeg.tobytes())])
    finally:
        await server.stop(None)
        scheduler.close()
    assert done is not None and done.model == bundle.name and done.backend == "cpu"
    assert done.timings.vision_encode_s > 0 and done.timings.preprocess_s > 0
    assert done.answer == "".join(texts)
    # The same prompt (256 image placeholders before the question) run directly: the decoded JPEG's pixels
    # replaced the placeholders, so the served tokens are the direct greedy ones.
    decoded = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
    placeholder = bundle.manifest["tokenizer"]["image_token"] * 256
    ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": placeholder + "\nWhat animal is this?"}]))
    assert done.timings.prompt_tokens == len(ids)
    seq = lm.new_sequence(ids, [enc.encode(decoded)])
    while not seq.prefill_step():
        pass
    want = []
    for _ in range(done.timings.generated_tokens):
        want.append(int(seq.logits.argmax()))
        seq.append(want[-1])
    assert done.timings.generated_tokens > 0
    # The tiny byte-level model emits arbitrary bytes: the stream holds back an incomplete UTF-8 tail.
    direct = lm.tokenizer.decode(want)
    assert direct.startswith(done.answer) and set(direct[len(done.answer):]) <= {"\ufffd"}, (done.answer, direct)
    assert len(done.answer) > 0
