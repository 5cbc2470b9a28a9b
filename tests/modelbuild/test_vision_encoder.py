"""VisionEncoder over a real (tiny) AutoNeural bundle: preprocessing, CPU float against the numpy reference,
the shipped W8A16 context binary on the QNN HTP emulator, and bad input."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from service.modelbuild import bundle_writer, qdq, vision
from service.modelbuild.reference_vision import vision_forward
from service.runtime import bundle as bundle_mod
from service.runtime.backends import BackendError
from service.runtime.vision import VisionEncoder
from tests.conftest import PHOTOS


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_bundle")
    cfg = vision.tiny_config(lm_hidden=64)
    weights = vision.random_weights(cfg, seed=0)
    component = vision.build_vision_component(cfg, weights, root, precisions=("float", "w8a16"),
                                              targets=("emulator",), calibration_samples=6)
    (root / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}))
    np.save(root / "embed_tokens.npy", np.zeros((8, 64), np.float16))
    manifest = {"format": "incar-bundle", "format_version": 1, "name": "tiny-autoneural-vision",
                "architecture": "autoneural", "text": {"hidden_size": 64, "embedding": {"file": "embed_tokens.npy"}},
                "tokenizer": {"file": "tokenizer.json"}, "components": {"vision": component},
                "quantization": {"vision": component["quantization"]}}
    bundle_writer.write_manifest(root, manifest)
    return cfg, weights, bundle_mod.load_bundle(root)


def _photo() -> np.ndarray:
    img = cv2.imread(str(PHOTOS / "dog.jpg"))
    assert img is not None
    return img


def test_preprocess_is_rgb_normalised_nchw(tiny_bundle):
    _, _, bundle = tiny_bundle
    enc = VisionEncoder(bundle, "cpu")
    img = np.random.default_rng(0).integers(0, 256, (768, 768, 3), dtype=np.uint8)
    x = enc.preprocess(img)
    assert x.shape == (1, 3, 768, 768) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0], img[:, :, 2] / 255.0 * 2 - 1, atol=1e-6)   # channel 0 is red
    np.testing.assert_allclose(x[0, 2], img[:, :, 0] / 255.0 * 2 - 1, atol=1e-6)
    photo = enc.preprocess(_photo())
    assert photo.shape == (1, 3, 768, 768) and -1.0 <= photo.min() < photo.max() <= 1.0


def test_cpu_float_encoder_matches_the_reference(tiny_bundle):
    cfg, weights, bundle = tiny_bundle
    enc = VisionEncoder(bundle, "cpu")
    assert enc.variant_name == "float"
    embeds = enc.encode(_photo())
    assert embeds.shape == (256, 64) and enc.encode_seconds > 0 and enc.preprocess_seconds > 0
    want = vision_forward(cfg, weights, enc.preprocess(_photo()))[0]
    np.testing.assert_allclose(embeds, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_w8a16_context_binary_on_the_htp_emulator(tiny_bundle):
    _, _, bundle = tiny_bundle
    spec = bundle.variant("vision", "w8a16")
    assert "emulator" in spec["context_binaries"]
    htp = VisionEncoder(bundle, "qnn-emulator")
    assert htp.variant_name == "w8a16"
    photo = _photo()
    got = htp.encode(photo)
    ref = VisionEncoder(bundle, "cpu").encode(photo)
    report = qdq.compare([ref], [got], component="vision", precision="w8a16", backend="qnn-emulator",
                         output="image_embeds")
    print(json.dumps({"vision_photo_w8a16": report.to_dict()}))
    assert report.sqnr_db > 25.0, report.to_dict()
    # The builder's report is held-out accuracy on CPU QDQ.
    assert bundle.manifest["quantization"]["vision"][0]["sqnr_db"] > 30.0


def test_bad_input_and_missing_component(tiny_bundle):
    _, _, bundle = tiny_bundle
    enc = VisionEncoder(bundle, "cpu")
    with pytest.raises(ValueError, match=r"expected a BGR image \[H, W, 3\]"):
        enc.encode(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        enc.encode(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="empty"):
        enc.encode(np.zeros((0, 32, 3), np.uint8))
    with pytest.raises(BackendError, match="not qnn-emulator|is for"):
        VisionEncoder(bundle, "qnn-emulator", variant="float")

    class TextOnly:
        manifest = {"name": "text-only", "components": {"decoder_decode": {}}}
    with pytest.raises(BackendError, match="has no vision component"):
        VisionEncoder(TextOnly(), "cpu")
