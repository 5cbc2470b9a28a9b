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
