"""The tiny AutoNeural vision encoder + connector, W8A16, on the QNN HTP emulator with CPU fallback disabled;
context binaries compile, reload and give bit-identical outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.modelbuild import qdq, vision
from service.modelbuild.qnn_compile import TARGETS, cached_context, compile_context
from service.runtime.backends import count_nodes, create_session

SQNR_FLOOR_DB = 30.0        # random-weight tiny encoder measures ~39 dB; the paper's CNN reaches 45 dB


@pytest.fixture(scope="module")
def w8a16(tmp_path_factory):
    root = tmp_path_factory.mktemp("qnn_vision")
    cfg = vision.tiny_config(lm_hidden=64)
    float_path = vision.build_vision(cfg, vision.random_weights(cfg, seed=0), root / "vision.float.onnx")
    calibration = [{"pixel_values": x} for x in vision.calibration_images(cfg, 8, seed=1)]
    held_out = [{"pixel_values": x} for x in vision.calibration_images(cfg, 1, seed=10_000)]
    qdq_path = qdq.quantize_qdq(float_path, root / "vision.w8a16.onnx", calibration, "w8a16")
    online = create_session(qdq_path, "qnn-emulator", disable_cpu_fallback=True, context_cache=False)
    online_out = online.run(["image_embeds"], held_out[0])[0]
    return {"root": root, "float": float_path, "qdq": qdq_path, "held_out": held_out, "online_out": online_out}


def test_w8a16_vision_runs_wholly_on_the_htp_emulator(w8a16):
    reference = create_session(w8a16["float"], "cpu").run(["image_embeds"], w8a16["held_out"][0])[0]
    cpu_qdq = create_session(w8a16["qdq"], "cpu").run(["image_embeds"], w8a16["held_out"][0])[0]
    htp = qdq.compare([reference], [w8a16["online_out"]], component="vision", precision="w8a16",
                      backend="qnn-emulator", output="image_embeds")
    cpu = qdq.compare([reference], [cpu_qdq], component="vision", precision="w8a16", backend="cpu",
                      output="image_embeds")
    print(json.dumps({"vision_w8a16": [htp.to_dict(), cpu.to_dict()]}))
    assert htp.sqnr_db > SQNR_FLOOR_DB, htp.to_dict()
    assert htp.rms_pct < 5.0
    # The emulator is bit-faithful to the HTP; it should land where ORT's CPU QDQ simulation does.
    assert abs(htp.sqnr_db - cpu.sqnr_db) < 6.0, (htp.to_dict(), cpu.to_dict())
    # The weights handed to QNN really are 8-bit per channel: every Conv/MatMul weight is an int8 initializer
    # behind a DQ with one scale per output channel.
    import onnx
    model = onnx.load(str(w8a16["qdq"]))
    inits = {t.name: t for t in model.graph.initializer}
    producer = {n.output[0]: n for n in model.graph.node}
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul")]
    dq = [producer[n.input[1]] for n in weighted]
    float_model = onnx.load(str(w8a16["float"]))
    assert len(weighted) == sum(n.op_type in ("Conv", "MatMul") for n in float_model.graph.node)
    assert all(d.op_type == "DequantizeLinear" for d in dq)
    assert {inits[d.input[0]].data_type for d in dq} == {onnx.TensorProto.INT8}
    from service.modelbuild.weight_codec import weight_encodings
    assert all(e.per_channel and e.scale_shape == (e.channels,) for e in weight_encodings(model))


@pytest.mark.parametrize("target", list(TARGETS))
def test_context_binary_reload_is_bit_identical(w8a16, target):
    cache = w8a16["root"] / "cache"
    first = cached_context(w8a16["qdq"], cache, target)
    assert first.path.is_file() and (first.path.parent / first.path.name.replace(".onnx", "_qnn.bin")).is_file()
    assert first.placement.cpu == 0 and first.placement.npu == count_nodes(w8a16["qdq"])
    again = cached_context(w8a16["qdq"], cache, target)
    assert again.cached and again.path == first.path
    session = create_session(first.path, "qnn-emulator", disable_cpu_fallback=True, model_name=f"vision-{target}")
    out = session.run(["image_embeds"], w8a16["held_out"][0])[0]
    assert np.array_equal(out, w8a16["online_out"])
    assert REGISTRY.get_sample_value("incar_runtime_nodes", {"backend": "qnn-emulator", "placement": "npu",
                                                             "model": f"vision-{target}"}) == first.placement.npu


def test_sa8295p_context_records_the_target_and_differs_in_cache_key(w8a16):
    out_dir = w8a16["root"] / "bundle_qnn" / "sa8295p-v68"
    compiled = compile_context(w8a16["qdq"], out_dir, "sa8295p-v68")
    assert compiled.path.parent == out_dir
    from service.runtime.qnn_context import content_hash
    assert content_hash(w8a16["qdq"], "sa8295p-v68") != content_hash(w8a16["qdq"], "emulator")
