"""W4A16 from a GGUF's own Q4_1 codes (`gguf_lpbq`): the codes are copied into LPBQ (int4 blocks of 32 on an
8-bit per-channel scale grid), the block offsets become a (block sums of x) @ C correction, and the graph runs
wholly on the QNN HTP emulator (CPU fallback disabled) within 1 dB of CPU QDQ."""
from __future__ import annotations

import json

import gguf
import numpy as np
import onnx
import pytest
from gguf import quants

from service.modelbuild import gguf_lpbq, qdq, weight_codec
from service.modelbuild.gguf_blocks import transcode
from service.modelbuild.graph import GraphBuilder
from service.runtime.backends import create_session

EMULATOR_MATCH_DB = 1.0
SHAPES = {"layers.0.up.weight": (256, 128), "layers.0.down.weight": (128, 256)}     # [N, K]


def _q4_1(name: str, n: int, k: int, rng) -> object:
    """A real Q4_1 tensor (gguf's own quantizer) of a weight with uneven row and block magnitudes."""
    w = rng.standard_normal((n, k)) * np.linspace(0.02, 0.12, n)[:, None] * rng.uniform(0.3, 1.5, (1, k))
    raw = quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
    return transcode(name, "Q4_1", raw, (n, k))


@pytest.fixture(scope="module")
def q4_1_mlp(tmp_path_factory):
    """Float graph whose layer weights are exactly two Q4_1 tensors (as the dequantized GGUF gives them)."""
    root = tmp_path_factory.mktemp("gguf_lpbq")
    rng = np.random.default_rng(0)
    blocks = {name: _q4_1(name, n, k, rng) for name, (n, k) in SHAPES.items()}
    g = GraphBuilder("q4_1_mlp")
    x = g.input("x", "float32", [1, 16, 128])
    h = g.op("MatMul", [x, g.init("layers.0.up.weight", blocks["layers.0.up.weight"].dequantize().T)])
    h = g.op("Relu", [h])
    h = g.op("MatMul", [h, g.init("layers.0.down.weight", blocks["layers.0.down.weight"].dequantize().T)])
    h = g.op("MatMul", [h, g.init("lm_head.weight", (rng.standard_normal((128, 96)) * 0.09).astype(np.float32))])
    g.output(h, "y", "float32", [1, 16, 96])
    float_path = g.save(root / "mlp.float.onnx")
    split_path = root / "mlp.split.onnx"
    onnx.save(gguf_lpbq.split_offsets(onnx.load(str(float_path)), blocks), str(split_path))
    feeds = [{"x": (rng.standard_normal((1, 16, 128)) + 0.5).astype(np.float32)} for _ in range(10)]
    return root, float_path, split_path, blocks, feeds[:8], feeds[8:]


def test_codes_are_copied_and_only_the_block_scales_move(q4_1_mlp):
    _, _, _, blocks, _, _ = q4_1_mlp
    w = blocks["layers.0.down.weight"]
    enc, offsets = gguf_lpbq.exact_lpbq(w)
    assert enc.block == 32 and enc.q.shape == (256, 128) and offsets.shape == (8, 128)
    assert np.array_equal(enc.q, w.codes.T.astype(np.int32) - 8)              # the file's codes, not re-rounded
    assert enc.block_ints.min() >= 1 and enc.block_ints.max() == 16         # the HTP's 4-bit block-scale integers
    exact_scales = np.repeat(w.scales.T, 32, axis=0)
    got_scales = np.repeat(enc.block_ints * enc.channel_scale[None], 32, axis=0)
    assert qdq.sqnr_db(exact_scales, got_scales) > 25.0
    exact = w.dequantize().T
    copied = gguf_lpbq.weight_error_db(w, enc, offsets)
    without_mean_move = gguf_lpbq.weight_error_db(w, enc, w.offsets.T)
    rerounded = weight_codec.lpbq_quantize(exact, 64)                          # the older recipe: a second rounding
    print(json.dumps({"gguf_lpbq_weight_db": {"copied": copied, "offsets_unadjusted": without_mean_move,
                                              "rerounded_lpbq64": qdq.sqnr_db(exact, rerounded.dequantize())}}))
    assert copied > without_mean_move and copied > qdq.sqnr_db(exact, rerounded.dequantize()) + 8.0


def test_gptq_refined_codes_beat_copied_codes_on_the_layer_output(q4_1_mlp):
    _, _, _, blocks, _, _ = q4_1_mlp
    w = blocks["layers.0.down.weight"]                                          # [N=128, K=256]
    rng = np.random.default_rng(4)
    # inputs with a few dominant directions, as a decoder's normed stream has (GPTQ has correlations to use)
    x = rng.standard_normal((4000, 256)) + rng.standard_normal((4000, 8)) @ rng.standard_normal((8, 256)) * 2
    copied = gguf_lpbq.encode({"w": w})
    refined = gguf_lpbq.encode({"w": w}, {"w": (x.T @ x / len(x)).astype(np.float32)})
    assert copied.recipe() == gguf_lpbq.RECIPE and refined.recipe() != copied.recipe()
    (c_ints, c_scale), = copied.offset_ints.values()
    offsets = np.repeat(c_ints * c_scale[None], 32, axis=0)

    def output_error(enc):
        return np.sum((x @ (w.dequantize().T - enc.dequantize() - offsets)) ** 2)
    changed = np.mean(refined.codes["w"].q != copied.codes["w"].q)
    assert 0 < changed < 0.2 and np.abs(refined.codes["w"].q).max() <= 8
    assert output_error(refined.codes["w"]) < 0.8 * output_error(copied.codes["w"])


def test_split_offsets_keeps_the_float_function(q4_1_mlp):
    _, float_path, split_path, _, _, held = q4_1_mlp
    model = onnx.load(str(split_path))
    assert [n.op_type for n in model.graph.node].count("ReduceSum") == 2
    ref = create_session(float_path, "cpu").run(None, held[0])[0]
    got = create_session(split_path, "cpu").run(None, held[0])[0]
    assert qdq.sqnr_db(ref, got) > 100.0


def test_copied_codes_w4a16_encodings_and_htp_emulator(q4_1_mlp):
    root, float_path, split_path, blocks, calibration, held = q4_1_mlp
    encoded = gguf_lpbq.encode(blocks)
    path = qdq.quantize_qdq(split_path, root / "mlp.gguf_w4a16.onnx", calibration, "w4a16",
                            lpbq_codes=encoded.codes, integers=encoded.offset_ints)
    rerounded = qdq.quantize_qdq(float_path, root / "mlp.w4a16.onnx", calibration, "w4a16")
    model = onnx.load(str(path))
    enc = {e.weight: e for e in weight_codec.weight_encodings(model)}
    assert all(e.per_channel for e in enc.values()), enc
    for name, (n, k) in SHAPES.items():
        e = enc[name.replace("/", "_") + "_lpbq_q"]
        assert (e.dtype, e.scale_shape, e.block_size) == ("int4", (k // 32, n), 32)
        off = enc[name.removesuffix(".weight") + gguf_lpbq.OFFSETS_SUFFIX]
        assert (off.dtype, off.scale_shape, off.axis) == ("int8", (n,), 1)
        stored = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer
                                                 if t.name == off.weight + "_quantized"))
        assert np.array_equal(stored, encoded.offset_ints[off.weight][0])      # our int8 C, not a re-rounding
    assert (enc["lm_head.weight"].dtype, enc["lm_head.weight"].scale_shape) == ("int8", (96,))
    ref = [create_session(float_path, "cpu").run(None, f)[0] for f in held]
    cpu = [create_session(path, "cpu").run(None, f)[0] for f in held]
    old = [create_session(rerounded, "cpu").run(None, f)[0] for f in held]
    htp_session = create_session(path, "qnn-emulator", disable_cpu_fallback=True, context_cache=False,
                                 model_name="mlp.gguf_w4a16")
    htp = [htp_session.run(None, f)[0] for f in held]
    figures = {"htp": qdq.compare(ref, htp, component="mlp", precision="w4a16", backend="qnn", output="y").sqnr_db,
               "cpu": qdq.compare(ref, cpu, component="mlp", precision="w4a16", backend="cpu", output="y").sqnr_db,
               "rerounded_lpbq_cpu": qdq.compare(ref, old, component="mlp", precision="w4a16", backend="cpu",
                                                 output="y").sqnr_db}
    print(json.dumps({"gguf_lpbq_mlp_db": figures}))
    assert abs(figures["htp"] - figures["cpu"]) < EMULATOR_MATCH_DB, figures
    assert figures["cpu"] > 25.0 and figures["cpu"] > figures["rerounded_lpbq_cpu"] + 8.0, figures


def _real_mlp_blocks(layer: int) -> tuple[dict, np.ndarray]:
    """SmolLM2-135M's layer-`layer` MLP as the default GGUF stores it (Q4_1), fused as the decoder graph fuses it."""
    from service.modelbuild.gguf_blocks import concat_rows
    from service.modelbuild.gguf_llama import default_gguf

    reader = gguf.GGUFReader(str(default_gguf()))
    tensors = {t.name: t for t in reader.tensors}

    def blocks(name):
        t = tensors[f"blk.{layer}.{name}.weight"]
        k, n = (int(d) for d in t.shape)
        return transcode(name, t.tensor_type.name, t.data, (n, k))
    norm = np.asarray(gguf.quants.dequantize(tensors[f"blk.{layer}.ffn_norm.weight"].data,
                                             tensors[f"blk.{layer}.ffn_norm.weight"].tensor_type), np.float32)
    return {"mlp.gate_up.weight": concat_rows([blocks("ffn_gate"), blocks("ffn_up")]),
            "mlp.down.weight": blocks("ffn_down")}, norm


def test_real_smollm2_mlp_with_copied_codes_runs_on_the_htp_emulator(tmp_path):
    blocks, norm = _real_mlp_blocks(3)
    assert {w.source_type for w in blocks.values()} == {"Q4_1"}
    inter = blocks["mlp.down.weight"].shape[1]
    g = GraphBuilder("smollm2_mlp")
    x = g.input("x", "float32", [1, 16, 576])
    gate_up = g.op("MatMul", [x, g.init("mlp.gate_up.weight", blocks["mlp.gate_up.weight"].dequantize().T)])
    gate, up = g.op("Split", [gate_up, g.const([inter, inter], "int64")], n_out=2, axis=-1)
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    g.output(g.op("MatMul", [act, g.init("mlp.down.weight", blocks["mlp.down.weight"].dequantize().T)]),
             "y", "float32", [1, 16, 576])
    float_path = g.save(tmp_path / "mlp.float.onnx")
    encoded = {name: gguf_lpbq.exact_lpbq(w) for name, w in blocks.items()}
    split = tmp_path / "mlp.split.onnx"
    onnx.save(gguf_lpbq.split_offsets(onnx.load(str(float_path)), blocks, {n: c for n, (_, c) in encoded.items()}),
              str(split))
    rng = np.random.default_rng(7)
    feeds = [{"x": (rng.standard_normal((1, 16, 576)) * norm).astype(np.float32)} for _ in range(10)]
    path = qdq.quantize_qdq(split, tmp_path / "mlp.gguf_w4a16.onnx", feeds[:8], "w4a16",
                            lpbq_codes={n: e for n, (e, _) in encoded.items()})
    rerounded = qdq.quantize_qdq(float_path, tmp_path / "mlp.w4a16.onnx", feeds[:8], "w4a16")
    ref = [create_session(float_path, "cpu").run(None, f)[0] for f in feeds[8:]]
    cpu = [create_session(path, "cpu").run(None, f)[0] for f in feeds[8:]]
    old = [create_session(rerounded, "cpu").run(None, f)[0] for f in feeds[8:]]
    htp_session = create_session(path, "qnn-emulator", disable_cpu_fallback=True, context_cache=False,
                                 model_name="smollm2_mlp.gguf_w4a16")
    htp = [htp_session.run(None, f)[0] for f in feeds[8:]]
    db = lambda got: qdq.sqnr_db(np.concatenate(ref), np.concatenate(got))        # noqa: E731
    figures = {"htp": db(htp), "cpu": db(cpu), "rerounded_lpbq64_cpu": db(old)}
    print(json.dumps({"gguf_lpbq_real_mlp_db": figures}))
    assert abs(figures["htp"] - figures["cpu"]) < EMULATOR_MATCH_DB, figures
    assert figures["cpu"] > figures["rerounded_lpbq64_cpu"] + 6.0, figures
