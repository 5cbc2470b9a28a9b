"""The build half of perception: the catalog, the TF.js converter's op table, and the run-time path rules."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from service.perception.build import SPECS
from service.perception.build.spec import ModelSpec, fetch_human_model
from service.perception.build.tfjs import TfjsConversionError, convert
from service.perception.build.tfjs.ops import OPS
from service.perception.models import model_path


def test_catalog_names_resolve_to_run_time_paths(models_dir):
    for name in SPECS:
        for variant in ("float", "qdq"):
            assert model_path(name, variant, models_dir).is_file(), (name, variant)


def test_run_time_paths_reject_bad_names_and_variants():
    with pytest.raises(KeyError, match="not a model name"):
        model_path("../etc/passwd")
    with pytest.raises(ValueError, match="unknown variant"):
        model_path("objects", "int3")


def test_spec_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind 'caffe'"):
        ModelSpec("x", "rapidocr", "m", "caffe", (1, 3, 8, 8), list)


def test_nanodet_converts_with_the_op_table(tmp_path):
    out = tmp_path / "nanodet.onnx"
    model = convert(fetch_human_model("models/nanodet.json"), out)
    assert {n.op_type for n in model.graph.node} <= {"Transpose", "Conv", "MaxPool", "Pad", "Add", "LeakyRelu",
                                                       "Sigmoid", "Identity", "Concat", "Reshape", "Split", "Resize"}
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in sess.get_inputs()[0].shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    assert len(outs) == 6 and all(np.isfinite(o).all() for o in outs)


def test_an_op_without_a_handler_is_named(tmp_path):
    src = fetch_human_model("models/nanodet.json")
    model_json = json.loads(src.read_text())
    assert "Softmax" not in OPS
    victim = next(n for n in model_json["modelTopology"]["node"] if n["op"] == "Sigmoid")
    victim["op"] = "Softmax"
    (tmp_path / src.name).write_text(json.dumps(model_json))
    for group in model_json["weightsManifest"]:
        for shard in group["paths"]:
            (tmp_path / shard).symlink_to((src.parent / shard).resolve())
    with pytest.raises(TfjsConversionError, match=f"{victim['name']}: op Softmax is not supported"):
        convert(tmp_path / src.name, tmp_path / "out.onnx")
