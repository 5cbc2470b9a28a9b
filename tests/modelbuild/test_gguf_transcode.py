"""GGUF blocks -> MatMulNBits, exactly: small GGUF files of each type written with the `gguf` package, and the real
default GGUF layer by layer; the weights ORT reconstructs (identity input) equal the GGUF's own dequantization."""
from __future__ import annotations

import gguf
import numpy as np
import onnxruntime as ort
import pytest

from service.modelbuild.cpu_quant import nbits_from_float
from service.modelbuild.gguf_blocks import TranscodeError, transcode
from service.modelbuild.gguf_llama import default_gguf, unpermute_rope_rows
from service.modelbuild.gqa_decoder import linear_graph

Q = gguf.GGMLQuantizationType
N, K = 8, 512
# Types gguf-py can quantize itself; the K-quants it only dequantizes, so their blocks are random bytes with sane
# fp16 scales (every bit pattern of their codes is a valid block).
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16")
RANDOM_BLOCKS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82)}


def _raw_blocks(qtype: str, rng) -> np.ndarray:
    elems, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    raw = rng.integers(0, 256, (N, K // elems * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for at in RANDOM_BLOCKS[qtype]:
        blocks[:, at:at + 2] = rng.uniform(-0.05, 0.05, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return raw


def _write_gguf(path, qtype: str, rng) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    w = rng.standard_normal((N, K)).astype(np.float32)
    if qtype in QUANTIZABLE:
        writer.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(w, Q[qtype]), raw_dtype=Q[qtype])
    elif qtype == "F16":
        writer.add_tensor("blk.0.ffn_up.weight", w.astype(np.float16))
    elif qtype == "F32":
        writer.add_tensor("blk.0.ffn_up.weight", w)
    else:
        writer.add_tensor("blk.0.ffn_up.weight", _raw_blocks(qtype, rng), raw_dtype=Q[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _reconstructed(weight, accuracy_level: int = 0) -> np.ndarray:
    """W [N, K] as ORT computes it: identity rows through the decoder's own linear (MatMulNBits + offsets)."""
    k = weight.shape[1]
    session = ort.InferenceSession(linear_graph(weight, accuracy_level).model().SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(k, dtype=np.float32)[None]})[0][0].T


def _held(tensor):
    qtype = tensor.tensor_type.name
    k, n = (int(d) for d in tensor.shape)
    if qtype in ("F32", "F16", "BF16"):
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(n, k)
    return transcode(tensor.name, qtype, tensor.data, (n, k))


def _assert_same(got: np.ndarray, expected: np.ndarray, held) -> None:
    """Bit for bit, except where a block offset (Q4_1/Q5_1/K-quant mins) is added: there the float32 sum
    scale * (code - zero) + offset may round once differently from GGUF's scale * code - min (half an ulp each)."""
    if getattr(held, "offsets", None) is None:
        np.testing.assert_array_equal(got, expected)
        return
    n, k = expected.shape
    block = held.block_size
    magnitude = np.abs(held.offsets)[..., None] + np.abs(expected).reshape(n, k // block, block)
    assert np.all(np.abs(got - expected).reshape(n, k // block, block) <= 2.0 ** -22 * magnitude)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16",
                                   "F32"])
def test_each_type_reconstructs_the_gguf_dequantization(tmp_path, qtype):
    rng = np.random.default_rng(sum(map(ord, qtype)))
    _write_gguf(tmp_path / "t.gguf", qtype, rng)
    tensor = gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors[0]
    assert tensor.tensor_type.name == qtype
    expected = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(N, K)
    held = _held(tensor)
    if not isinstance(held, np.ndarray):
        _assert_same(held.dequantize(), expected, held)                  # the codes and block scales
        assert held.bits in (4, 8) and held.block_size in (16, 32)
    _assert_same(_reconstructed(held), expected, held)


def test_type_that_cannot_be_held_is_refused_by_name(tmp_path):
    _write_gguf(tmp_path / "t.gguf", "Q2_K", np.random.default_rng(1))
    tensor = gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors[0]
    with pytest.raises(TranscodeError, match=r"blk\.0\.ffn_up\.weight: GGUF type Q2_K cannot be held exactly"):
        _held(tensor)
    # Re-quantization, when asked for, re-rounds onto symmetric 4-bit blocks: close, and said to be rounded.
    expected = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(N, K)
    requant = nbits_from_float(expected, source_type="Q2_K")
    assert requant.source_type == "Q2_K->int4"
    err = np.abs(_reconstructed(requant) - expected).max()
    assert 0 < err <= np.abs(expected).max() / 7


def test_default_gguf_layer_by_layer():
    reader = gguf.GGUFReader(str(default_gguf()))
    tensors = {t.name: t for t in reader.tensors}
    names = [f"blk.{i}.{part}.weight" for i in (0, 29) for part in
             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")] + ["token_embd.weight"]
    for name in names:
        t = tensors[name]
        expected = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        held = _held(t)
        if name.endswith("attn_q.weight"):        # the loader's RoPE row order: a permutation, still exact
            perm = unpermute_rope_rows(np.arange(held.shape[0])[:, None], 9)[:, 0]
            held, expected = held.rows(perm), expected[perm]
        if name == "token_embd.weight":
            held, expected = held.rows(np.arange(0, 49152, 97)), expected[::97]   # a sample of the 49152 rows
        _assert_same(_reconstructed(held), expected, held)
