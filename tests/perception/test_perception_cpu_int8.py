"""The CPU int8 object detector (x86 fast path): built beside the float graph, held to the float model's
detections, and opened by a cascade configured for it (every other model stays float)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import onnx
import pytest

from service.perception.build.cpu_int8 import head_convs
from service.perception.cascade import Cascade, PerceptionConfig
from service.perception.models import CPU_INT8, MANIFEST, model_path, variant_for
from service.perception.objects import ObjectDetector
from service.perception.types import box_iou
from tests.perception.perception_helpers import load_image

ALL_PHOTOS = ("faces1.jpg", "faces2.jpg", "faces3.jpg", "dog.jpg", "horses.jpg", "person.jpg")


@pytest.fixture(scope="module")
def detectors(models_dir):
    return (ObjectDetector(model_path("objects", "float", models_dir), threads=1),
            ObjectDetector(model_path("objects", CPU_INT8, models_dir), threads=1))


def test_the_build_writes_an_int8_graph_with_float_heads(models_dir):
    path = model_path("objects", CPU_INT8, models_dir)
    assert path.name == "objects.int8.onnx" and path.is_file()
    manifest = json.loads((models_dir / "perception" / MANIFEST).read_text())
    assert manifest["objects"][CPU_INT8] and manifest["objects"]["float"] != manifest["objects"][CPU_INT8]
    graph = onnx.load(str(path)).graph
    weights = {t.name: t.data_type for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    heads = set(head_convs(onnx.load(str(model_path("objects", "float", models_dir)))))
    quantized = [n for n in convs if n.name not in heads]
    # every backbone conv reads int8 weights through a DequantizeLinear; the three heads keep float weights
    dequant_inputs = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert len(heads) == 3 and all(n.name in heads for n in convs if n.input[1] in weights)
    assert quantized and all(weights[dequant_inputs[n.input[1]]] == onnx.TensorProto.INT8 for n in quantized)


def test_int8_finds_what_the_float_model_finds_on_every_photo(detectors):
    float_det, int8_det = detectors
    matched = total = 0
    for name in ALL_PHOTOS:
        bgr = load_image(name)
        found = int8_det.detect(bgr)
        for ref in float_det.detect(bgr):
            total += 1
            best = max((box_iou(ref.box, d.box) for d in found if d.label == ref.label), default=0.0)
            matched += best >= 0.5
            if ref.score >= 0.4:   # a confident float detection must be there, on the same object
                assert best >= 0.7, (name, ref, found)
    assert total >= 20 and matched >= 0.9 * total, (matched, total)


def test_int8_acceptance_photos(detectors):
    _, det = detectors
    dog = {d.label for d in det.detect(load_image("dog.jpg"))}
    assert {"dog", "bicycle"} <= dog and dog & {"car", "truck"}, dog
    person = {d.label for d in det.detect(load_image("person.jpg"))}
    assert {"person", "horse", "dog"} <= person, person


def test_a_cpu_int8_cascade_opens_int8_objects_and_float_everything_else(models_dir):
    cascade = Cascade(PerceptionConfig(models_dir=str(models_dir), variant=CPU_INT8))
    assert cascade.model("objects").session._model_path == str(model_path("objects", CPU_INT8, models_dir))
    assert variant_for("face_full", CPU_INT8) == "float" and variant_for("objects", "qdq") == "qdq"
    lane = cascade.lane_models(1)
    assert lane("objects").session._model_path.endswith("objects.int8.onnx")
    meta = SimpleNamespace(camera_id="left", role="exterior", position="left", capture_time=10.0)
    analysis = cascade.analyze(load_image("person.jpg"), meta, models=lane)
    assert "objects" in analysis.stages_run and any(d.label == "person" for d in analysis.detections)


def test_the_int8_variant_is_for_the_cpu_only():
    with pytest.raises(ValueError, match="QNN backends run the quantized"):
        PerceptionConfig(backend="qnn-htp", variant=CPU_INT8).validate()
    with pytest.raises(ValueError, match="expected float, qdq or cpu-int8"):
        PerceptionConfig(variant="int4").validate()
