"""The NPU's (replace-mode) decoder graph keeps each projection's output in its own 16-bit range. Fused into one
QKV MatMul, SmolLM2's V shared Q and K's range, 20x its own, and the HTP wrote it into the cache about one V step
low (docs/quantization-htp.md). Real weights (the bundled GGUF's first layer), real text."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

from service.modelbuild import calibration_text, qdq
from service.modelbuild.decoder import build_decoder, empty_cache_feeds
from service.modelbuild.gguf_llama import default_gguf, load_gguf
from service.runtime.backends import create_session

TOKENS, SLOTS = 16, 32


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    from tokenizers import Tokenizer
    model = load_gguf(default_gguf(), context_length=SLOTS)
    spec = dataclasses.replace(model.spec, layer_kinds=model.spec.layer_kinds[:1])
    tok = Tokenizer.from_str(json.dumps(model.tokenizer_json))
    cal_docs, held_docs = calibration_text.split()
    encode = lambda s: tok.encode(s).ids                                              # noqa: E731
    cal = calibration_text.token_chunks(encode, cal_docs, TOKENS, 16, per_document=4)
    held = calibration_text.token_chunks(encode, held_docs, TOKENS, 2, per_document=1)
    work = tmp_path_factory.mktemp("projections")
    plain, quantized = work / "float.onnx", work / "w8a16.onnx"
    build_decoder(spec, model.weights, TOKENS, "replace", name="one_layer").save(plain, external_data="f.data")
    table = model.weights["embed"]
    qdq.quantize_qdq(plain, quantized, empty_cache_feeds(spec, table, cal, TOKENS), "w8a16")
    return plain, quantized, empty_cache_feeds(spec, table, held, TOKENS)


def test_each_projection_is_its_own_matmul(one_layer):
    plain, _, _ = one_layer
    graph = onnx.load(str(plain), load_external_data=False).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert not [n.name for n in graph.node if n.op_type == "Split" and producers.get(n.input[0]) == "MatMul"]
    weights = {n.input[1] for n in graph.node if n.op_type == "MatMul"}
    assert {f"layers.0.attn.{p}.weight" for p in "qkvo"} | {"layers.0.mlp.gate.weight"} <= weights


def test_the_htp_writes_the_value_cache_as_cpu_qdq_does(one_layer):
    """The cache blend (cache_write @ V, one-hot) on the emulator, CPU fallback off, against CPU QDQ of the same file:
    fused, V's encoding was 20x coarser than the blend's output and the HTP's came out ~1 V step (~20 output codes)
    low: V 42.2 dB from CPU QDQ (now 56.0), where K, whose encodings matched, was 60."""
    _, quantized, held = one_layer
    names = ["present_value.0", "present_key.0"]
    sessions = {"cpu": create_session(quantized, "cpu"),
                "htp": create_session(quantized, "qnn-emulator", disable_cpu_fallback=True, context_cache=False)}
    runs = {name: [session.run(names, f) for f in held] for name, session in sessions.items()}

    def sqnr(k):
        return qdq.sqnr_db(*(np.concatenate([r[k].ravel() for r in runs[name]]) for name in ("cpu", "htp")))
    values, keys = sqnr(0), sqnr(1)
    assert values > 50 and keys > 50, (values, keys)
