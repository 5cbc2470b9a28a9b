"""Source model -> float ONNX with a static input shape (TFLite through tflite2onnx, TF.js through our reader)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from service.perception.build.spec import ModelSpec


def convert_float(spec: ModelSpec, dst: Path) -> None:
    src = spec.source_path()
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model.onnx"
        if spec.kind == "tflite":
            import tflite2onnx
            # tflite2onnx warns once per float16 tensor (the weights are dequantized correctly); keep the log readable.
            logging.disable(logging.WARNING)
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    tflite2onnx.convert(str(src), str(staged))
            finally:
                logging.disable(logging.NOTSET)
        elif spec.kind == "tfjs" and spec.outputs:
            from service.perception.build.tfjs.fused import convert_fused
            convert_fused(src, staged, input_shape=spec.input_shape, outputs=dict(spec.outputs))
        elif spec.kind == "tfjs":
            from service.perception.build.tfjs import convert
            convert(src, staged)
        else:
            shutil.copyfile(src, staged)
        model = onnx.load(str(staged))
        fix_input_shape(model, spec.input_shape)
        onnx.checker.check_model(model)
        tmp_dst = dst.with_suffix(".tmp")
        onnx.save(model, str(tmp_dst))
        os.replace(tmp_dst, dst)


def fix_input_shape(model: onnx.ModelProto, shape: tuple[int, ...]) -> None:
    """Pin every symbolic dimension (QNN compiles static graphs) and re-infer the output shapes."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed
    inp = model.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise ValueError(f"perception: input rank {len(dims)} != expected {len(shape)}")
    for d, value in zip(dims, shape):
        if d.dim_param:
            make_dim_param_fixed(model.graph, d.dim_param, value)
        elif d.dim_value != value:
            raise ValueError(f"perception: input dim {d.dim_value} != expected {value}")
    for out in model.graph.output:   # stale symbolic output dims would stop shape inference from refreshing them
        for d in out.type.tensor_type.shape.dim:
            if d.dim_param:
                d.Clear()
    fix_output_shapes(model)
