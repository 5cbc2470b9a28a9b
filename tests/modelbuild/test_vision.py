"""AutoNeural vision path: the float ONNX graph against the numpy reference, config and weight checks."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from safetensors.numpy import save_file

from service.modelbuild import vision
from service.modelbuild.reference_vision import vision_forward
from service.runtime.backends import create_session


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = vision.tiny_config(lm_hidden=64)
    weights = vision.random_weights(cfg, seed=0)
    path = vision.build_vision(cfg, weights, tmp_path_factory.mktemp("vision") / "vision.float.onnx")
    return cfg, weights, path


def test_float_graph_matches_numpy_reference(tiny):
    cfg, weights, path = tiny
    session = create_session(path, "cpu")
    for x in vision.calibration_images(cfg, 2, seed=3):
        got = session.run(["image_embeds"], {"pixel_values": x})[0]
        want = vision_forward(cfg, weights, x)
        assert got.shape == (1, 256, 64)
        assert np.abs(want).max() > 1e-2          # a live signal, not a collapsed one
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_graph_structure_is_mobilenet_style_with_msfa_and_plain_connector(tiny):
    cfg, _, path = tiny
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    depthwise = [n for n in model.graph.node if n.op_type == "Conv"
                 and next(a.i for a in n.attribute if a.name == "group") > 1]
    assert len(depthwise) == sum(s.repeats for s in cfg.stages)
    assert ops.count("AveragePool") == 1 and ops.count("Concat") == 1      # MSFA fuses two stages to 16x16
    assert not {"LayerNormalization", "SimplifiedLayerNormalization", "BatchNormalization"} & set(ops)
    assert ops.count("MatMul") == 2 and "Gelu" in ops                      # 2-layer MLP connector
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, 256, 64]


def test_stage_resolutions_reach_the_token_grid():
    cfg = vision.tiny_config()
    sizes = cfg.stage_resolutions()
    assert sizes[-1] == 16 and sizes[cfg.fusion_stages[0]] == 48
    default = vision.VisionConfig().validate()
    assert default.stage_resolutions()[-1] == 16 and default.num_tokens == 256


def test_config_round_trip_and_validation():
    cfg = vision.tiny_config()
    assert vision.VisionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="activation"):
        vision.VisionConfig(activation="swish").validate()
    with pytest.raises(ValueError, match="fusion_stages"):
        vision.VisionConfig(fusion_stages=(5,)).validate()
    with pytest.raises(ValueError, match="token grid"):
        vision.VisionConfig(image_size=736).validate()         # stage 4 would be 46x46

def test_real_weights_load_from_safetensors(tmp_path, tiny):
    cfg, weights, _ = tiny
    other = vision.random_weights(cfg, seed=7)
    save_file(other, str(tmp_path / "w.safetensors"))
    loaded = vision.load_weights(tmp_path / "w.safetensors", cfg)
    assert all(np.array_equal(loaded[k], other[k]) for k in other)
    bad = dict(other)
    bad["connector.fc2.weight"] = bad["connector.fc2.weight"][:, :10].copy()
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="connector.fc2.weight has shape"):
        vision.load_weights(tmp_path / "bad.safetensors", cfg)
    del bad["stem.weight"]
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        vision.load_weights(tmp_path / "missing.safetensors", cfg)
