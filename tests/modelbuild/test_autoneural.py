"""The tiny AutoNeural VLM bundle: one bundle with the LFM2 decoder, the vision component and the image token;
on `cpu` its greedy tokens (and logits) equal the numpy reference (vision reference -> connector -> image rows
spliced into the LFM2 reference's embeddings)."""
from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest

from service.modelbuild import autoneural, reference, vision
from service.modelbuild.lfm2 import load_lfm2
from service.modelbuild.reference_vision import vision_forward
from service.runtime.bundle import load_bundle
from service.runtime.generator import LanguageModel
from service.runtime.vision import VisionEncoder
from tests.conftest import PHOTOS

SEED, CONTEXT, STEPS = 3, 384, 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("autoneural") / "tiny-autoneural"
    autoneural.tiny_autoneural_bundle(out, seed=SEED, precisions=("w8a16", "w4a16"), context_length=CONTEXT)
    cfg = vision.tiny_config(lm_hidden=64)
    lfm2 = load_lfm2(out.with_name(out.name + ".ckpt"), context_length=CONTEXT)
    return load_bundle(out), cfg, vision.random_weights(cfg, seed=SEED), lfm2


def _photo(name: str) -> np.ndarray:
    img = cv2.imread(str(PHOTOS / name))
    assert img is not None, name
    return img


def _prompt(lm: LanguageModel, question: str) -> list[int]:
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": question}]}])
    return lm.tokenizer.encode(text)


def test_one_bundle_holds_decoder_vision_and_image_token(tiny):
    bundle, cfg, _, lfm2 = tiny
    m = bundle.manifest
    assert m["architecture"] == "autoneural"
    tok = m["tokenizer"]
    assert tok["image_token"] == "<image>" and tok["image_tokens_per_image"] == 256 == cfg.num_tokens
    comps = m["components"]
    assert set(comps["decoder_decode"]["variants"]) == {"float", "float_replace", "w8a16", "w4a16"}
    assert comps["decoder_decode"]["variants"]["float"]["state_update"] == "append"
    for precision in ("w8a16", "w4a16"):
        for component in ("decoder_prefill", "decoder_decode"):
            entry = comps[component]["variants"][precision]
            assert entry["state_update"] == "replace" and "qnn-emulator" in entry["backends"]
    assert set(comps["vision"]["variants"]) == {"float", "w8a16"}
    assert comps["vision"]["tokens"] == 256
    # Every quantized graph is reported on held-out inputs; W8 decoders keep the float's greedy choice mostly.
    reports = {(r["component"], r["precision"]): r for r in m["quantization"]["decoder"]}
    assert set(reports) == {(c, p) for c in ("decoder_prefill", "decoder_decode") for p in ("w8a16", "w4a16")}
    assert reports["decoder_decode", "w8a16"]["sqnr_db"] > 20.0, reports
    assert reports["decoder_decode", "w8a16"]["sqnr_db"] > reports["decoder_decode", "w4a16"]["sqnr_db"]
    # float LFM2 weights: W4A16 re-rounds onto LPBQ (only a GGUF source has codes to copy, gguf_lpbq)
    assert {r["recipe"] for r in reports.values()} == {"per-channel-int8-nearest-a16", "lpbq64-int4-nearest-a16"}
    assert m["quantization"]["vision"][0]["sqnr_db"] > 30.0
    print(json.dumps({"autoneural_quantization": m["quantization"]}))

    lm = LanguageModel(bundle, "cpu")
    ids = _prompt(lm, "What is this?")
    assert ids.count(tok["image_token_id"]) == 256
    # The image token was added (the tiny checkpoint lacks it): one more embedding row, and a head covering it.
    assert tok["image_token_id"] == lfm2.spec.vocab_size == m["text"]["vocab_size"] - 1
    assert not np.load(bundle.file("embed_tokens.npy"))[tok["image_token_id"]].any()
    # A plain string message (what the engine sends, placeholders already in it) renders unchanged.
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "<image>" * 256 + "\nhi"}])
    assert lm.tokenizer.encode(text).count(tok["image_token_id"]) == 256


def _reference_tokens(bundle, cfg, vision_weights, lfm2, enc: VisionEncoder, ids: list[int], img: np.ndarray):
    """Greedy tokens and per-step logits by full recomputation in numpy (float64)."""
    image_rows = vision_forward(cfg, vision_weights, enc.preprocess(img))[0]
    table = np.load(bundle.file(bundle.manifest["text"]["embedding"]["file"])).astype(np.float64)
    slots = np.asarray(ids) == bundle.manifest["tokenizer"]["image_token_id"]
    # The head holds the checkpoint's rows plus the image token's zero row.
    assert not lfm2.spec.tied_head
    weights = dict(lfm2.weights, lm_head=np.concatenate([lfm2.weights["lm_head"],
                                                         np.zeros((1, lfm2.spec.hidden_size))]))
    spec = dataclasses.replace(lfm2.spec, vocab_size=lfm2.spec.vocab_size + 1)
    seq, tokens, logits = list(ids), [], []
    for _ in range(STEPS):
        embeds = table[np.asarray(seq)]
        embeds[: len(ids)][slots] = image_rows
        step_logits = reference.forward(spec, weights, embeds)[-1]
        logits.append(step_logits)
        tokens.append(int(step_logits.argmax()))
        seq.append(tokens[-1])
    return tokens, logits


def _runtime_tokens(lm: LanguageModel, enc: VisionEncoder, ids: list[int], img: np.ndarray):
    seq = lm.new_sequence(ids, [enc.encode(img)])
    while not seq.prefill_step():
        pass
    tokens, logits = [], []
    for _ in range(STEPS):
        logits.append(seq.logits.copy())
        tokens.append(int(seq.logits.argmax()))
        seq.append(tokens[-1])
    return tokens, logits


@pytest.mark.parametrize("variant", ["float", "float_replace"])
def test_cpu_tokens_equal_the_numpy_reference(tiny, variant):
    bundle, cfg, vision_weights, lfm2 = tiny
    lm = LanguageModel(bundle, "cpu", variant=variant)
    enc = VisionEncoder(bundle, "cpu", variant="float")
    results = {}
    for photo in ("dog.jpg", "horses.jpg"):
        img = _photo(photo)
        ids = _prompt(lm, "What animal is this?")
        got_tokens, got_logits = _runtime_tokens(lm, enc, ids, img)
        want_tokens, want_logits = _reference_tokens(bundle, cfg, vision_weights, lfm2, enc, ids, img)
        assert got_tokens == want_tokens, (photo, got_tokens, want_tokens)
        for got, want in zip(got_logits, want_logits):
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())
        results[photo] = got_logits[0]
    # The pixels reach the decoder: another photo gives other logits for the same text.
    assert np.abs(results["dog.jpg"] - results["horses.jpg"]).max() > 1e-2


def test_bundle_refuses_mismatched_parts(tmp_path, tiny):
    _, cfg, vision_weights, lfm2 = tiny
    wrong = vision.tiny_config(lm_hidden=32)
    with pytest.raises(ValueError, match="lm_hidden: 32 != the decoder's hidden size 64"):
        autoneural.build_autoneural_bundle(tmp_path / "x", vision_cfg=wrong,
                                           vision_weights=vision.random_weights(wrong),
                                           lfm2_dir_or_loaded=lfm2, precisions=())
    with pytest.raises(ValueError, match="not HTP QDQ precisions"):
        autoneural.build_autoneural_bundle(tmp_path / "x", vision_cfg=cfg, vision_weights=vision_weights,
                                           lfm2_dir_or_loaded=lfm2, precisions=("int4",))


def test_cli_builds_validates_and_refuses(tmp_path, capsys):
    from service.modelbuild.cli import main

    assert main(["build", "--autoneural", "tiny", "--out", str(tmp_path), "--htp", "w8a16", "--seed", "2"]) == 0
    bundle = load_bundle(tmp_path / "tiny-autoneural")
    assert bundle.manifest["architecture"] == "autoneural" and bundle.name == "tiny-autoneural"
    assert "w8a16" in bundle.variants("decoder_decode") and "vision" in bundle.manifest["components"]
    assert not list(tmp_path.glob("*.building*"))
    assert main(["validate", str(tmp_path / "tiny-autoneural"), "--tokens", "2"]) == 0
    assert main(["build", "--autoneural", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "needs --vision-config and --vision-weights" in capsys.readouterr().err
