"""The CNN recipe (cnn_ptq: per-channel int8, equalization, sequential rounding, bias correction, split layers)
on real pretrained weights, on the QNN HTP emulator with CPU fallback disabled: EfficientNet-Lite0's stem and
first three blocks (the layers the recipe splits) and stem + blocks 0-5 (split layers deep in the network),
calibrated on augmented crops of the calibration photos, compared on a held-out photo. The emulator must land
where ORT's CPU QDQ simulation does (within 1 dB), so the CPU figures of bench/quant.py stand for the HTP."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from service.modelbuild import cnn_ptq, qdq, weight_codec
from service.modelbuild.efficientnet_lite import build_efficientnet_lite0, crops, lite_input, pretrained_state_dict
from service.perception.calibration import CALIBRATION_PHOTOS, HELD_OUT_PHOTOS, load_photo
from service.runtime.backends import create_session

SIZE = 160            # smaller than the trained 224: the emulator is slow, the layers and weights are the same
BLOCKS = 3


def _first_blocks(full: onnx.ModelProto, blocks: int) -> onnx.ModelProto:
    """The graph up to the output of block `blocks - 1` (its projection conv, or the residual Add after it)."""
    producer = {o: n for n in full.graph.node for o in n.output}
    project = next(n for n in full.graph.node if n.name.startswith(f"b{blocks - 1}_project"))
    out = project.output[0]
    adds = [n for n in full.graph.node if n.op_type == "Add" and out in n.input]
    out = adds[0].output[0] if adds else out
    keep, stack = set(), [out]
    while stack:                       # everything the output depends on
        name = stack.pop()
        node = producer.get(name)
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        stack.extend(node.input)
    nodes = [n for n in full.graph.node if id(n) in keep]
    used = {i for n in nodes for i in n.input}
    graph = onnx.helper.make_graph(nodes, "lite0_head_blocks", list(full.graph.input),
                                   [onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)],
                                   [t for t in full.graph.initializer if t.name in used])
    return onnx.helper.make_model(graph, opset_imports=full.opset_import, ir_version=full.ir_version)


@pytest.fixture(scope="module")
def real_blocks(tmp_path_factory):
    root = tmp_path_factory.mktemp("lite0_blocks")
    full = build_efficientnet_lite0(pretrained_state_dict(), root / "lite0.onnx", SIZE)
    float_path = root / "blocks.float.onnx"
    onnx.save(_first_blocks(onnx.load(str(full)), BLOCKS), str(float_path))
    rng = np.random.default_rng(0)
    calibration = [{"pixel_values": x} for p in CALIBRATION_PHOTOS
                   for x in crops(load_photo(p), 8, rng, SIZE, jitter=True)]
    held = {"pixel_values": lite_input(load_photo(HELD_OUT_PHOTOS[0]), SIZE)}
    return root, float_path, calibration, held


def _int8_on_cpu_and_htp(float_path, path, held, name: str) -> dict:
    """Checks every weight is int8 per-channel; SQNR of CPU QDQ and of the emulator (no CPU fallback)."""
    encodings = weight_codec.weight_encodings(onnx.load(str(path)))
    assert encodings and all(e.per_channel and e.dtype == "int8" for e in encodings)
    output = onnx.load(str(float_path), load_external_data=False).graph.output[0].name
    ref = create_session(float_path, "cpu").run([output], held)[0]
    cpu = create_session(path, "cpu").run([output], held)[0]
    htp = create_session(path, "qnn-emulator", disable_cpu_fallback=True, context_cache=False,
                         model_name=name).run([output], held)[0]
    return {"htp_db": round(qdq.sqnr_db(ref, htp), 2), "cpu_qdq_db": round(qdq.sqnr_db(ref, cpu), 2),
            "htp_vs_cpu_db": round(qdq.sqnr_db(cpu, htp), 2)}


def test_cnn_recipe_on_real_weights_matches_cpu_qdq_on_the_htp_emulator(real_blocks):
    root, float_path, calibration, held = real_blocks
    path, report = cnn_ptq.quantize_cnn(float_path, root / "blocks.w8a16.onnx", calibration,
                                        recipe=cnn_ptq.CnnRecipe(sensitivity_samples=4))
    assert report.split and report.bytes_above_8bit_pct <= 15.0, report.to_dict()
    assert len(report.rounded) == len(cnn_ptq._convs(onnx.load(str(float_path)))), report.to_dict()
    figures = {**_int8_on_cpu_and_htp(float_path, path, held, "lite0_blocks.w8a16"), **report.to_dict()}
    print(json.dumps({"lite0_blocks_w8a16": figures}))
    assert figures["cpu_qdq_db"] > 35.0, figures          # the first blocks alone: well above the full network
    assert abs(figures["htp_db"] - figures["cpu_qdq_db"]) < 1.0, figures


def test_qat_step_on_real_weights_runs_on_the_htp_emulator_as_on_the_cpu(real_blocks):
    """The quantization-aware fine-tuning step (cnn_qat) moves weights, scales and biases: what it writes must
    still be int8 per-channel everywhere and computed by the HTP as by CPU QDQ."""
    pytest.importorskip("jax", reason="the QAT step needs jax (the dev extra installs it)")
    from service.modelbuild import cnn_qat
    root, float_path, calibration, held = real_blocks
    recipe = cnn_ptq.CnnRecipe(sensitivity_samples=4, qat=cnn_qat.QatRecipe(steps=40, batch=4, train_size=96))
    path, report = cnn_ptq.quantize_cnn(float_path, root / "blocks.qat.onnx", calibration, recipe=recipe)
    assert report.qat["qat_steps"] == 40 and report.bytes_above_8bit_pct <= 15.0, report.to_dict()
    figures = {**_int8_on_cpu_and_htp(float_path, path, held, "lite0_blocks.qat.w8a16"),
               "qat_history": report.qat["qat_history"]}
    print(json.dumps({"lite0_blocks_qat_w8a16": figures}))
    assert figures["cpu_qdq_db"] > 35.0, figures
    assert abs(figures["htp_db"] - figures["cpu_qdq_db"]) < 1.0, figures


@pytest.fixture(scope="module")
def deep_blocks(real_blocks):
    """Stem + blocks 0-5: split 1x1 convs after the first block (b1_expand, b3_expand...), where the HTP used
    to part from CPU QDQ (39.7 dB apart, HTP 34.81 / CPU 36.34 dB) until the requantization scales were
    aligned (htp_requant)."""
    root, _, calibration, held = real_blocks
    float_path = root / "deep.float.onnx"
    onnx.save(_first_blocks(onnx.load(str(root / "lite0.onnx")), 6), str(float_path))
    return root, float_path, calibration, held


@pytest.mark.parametrize("spatial", [False, True], ids=["1x1-splits", "3x3-and-depthwise-splits-too"])
def test_deep_split_layers_run_on_the_htp_emulator_as_on_the_cpu(deep_blocks, spatial):
    root, float_path, calibration, held = deep_blocks
    recipe = cnn_ptq.CnnRecipe(sensitivity_samples=4, split_spatial=spatial)
    path, report = cnn_ptq.quantize_cnn(float_path, root / f"deep.{spatial}.w8a16.onnx", calibration, recipe=recipe)
    assert {"b1_expand.weight", "b3_expand.weight"} <= set(report.split), report.to_dict()
    if spatial:
        assert "b0_dw.weight" in report.split, report.to_dict()
    figures = {**_int8_on_cpu_and_htp(float_path, path, held, f"lite0_deep.{spatial}.w8a16"), **report.to_dict()}
    print(json.dumps({f"lite0_blocks0to5_w8a16{'_spatial' if spatial else ''}": figures}))
    assert figures["cpu_qdq_db"] > 35.0, figures
    assert figures["htp_vs_cpu_db"] > 50.0, figures                 # the HTP computes what CPU QDQ computes
    assert abs(figures["htp_db"] - figures["cpu_qdq_db"]) < 1.0, figures
