"""CPU weight-only variants: int4 / int8 MatMulNBits (blockwise, onnxruntime's quantizer)."""
from __future__ import annotations

import logging

import onnx

BLOCK_SIZE = 32
# accuracy_level 4: int8 activations inside MatMulNBits, the fast kernel on x86 (AVX2/AVX512-VNNI).
ACCURACY_LEVEL = 4


def quantize_weights(model: onnx.ModelProto, bits: int = 4, block_size: int = BLOCK_SIZE) -> onnx.ModelProto:
    """Every constant-weight MatMul becomes MatMulNBits with `bits`-bit symmetric blockwise weights."""
    if bits not in (4, 8):
        raise ValueError(f"bits: {bits} is not supported (4 or 8)")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # The quantizer logs every node at INFO; keep build output to our own progress lines.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    # Only the layer weights (named `*.weight`); the RoPE rotation and attention MatMuls stay float.
    exclude = [n.name for n in model.graph.node
               if n.op_type == "MatMul" and not (len(n.input) > 1 and n.input[1].endswith(".weight"))]
    quant = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                 accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=exclude,
                                 op_types_to_quantize=("MatMul",))
    quant.process()
    return quant.model.model


def nbits_from_float(weight, bits: int = 4, block_size: int = BLOCK_SIZE, source_type: str = "F32"):
    """Re-round a float [N, K] weight to symmetric `bits`-bit blocks (the opt-in path for GGUF types that
    MatMulNBits cannot hold exactly): scale = max|w| / (2^(bits-1) - 1) per block, default zero point."""
    import numpy as np

    from .gguf_blocks import NBitsWeight

    w = np.asarray(weight, np.float32)
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of the block size {block_size}")
    blocks = w.reshape(n, k // block_size, block_size)
    top = (1 << (bits - 1)) - 1
    scales = np.abs(blocks).max(axis=-1) / top
    safe = np.where(scales == 0, 1, scales)[..., None]
    codes = np.clip(np.rint(blocks / safe), -top - 1, top) + (top + 1)
    return NBitsWeight(codes.reshape(n, k).astype(np.uint8), scales.astype(np.float32), None, bits, block_size,
                       f"{source_type}->int{bits}")
