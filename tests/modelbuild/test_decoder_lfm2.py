"""LFM2 hybrid graphs (tiny random weights, HF layout) against the numpy reference, both state modes."""
from __future__ import annotations

import numpy as np
import pytest

from service.modelbuild import reference
from service.modelbuild.lfm2 import load_lfm2, read_safetensors, write_safetensors
from service.runtime import generator
from service.runtime.bundle import load_bundle
from service.runtime.generator import LanguageModel


def _reference_logits(model, ids):
    # The runtime gathers float16 embeddings: feed the reference the same rounded rows.
    embeds = model.weights["embed"].astype(np.float16).astype(np.float32)[ids]
    return reference.forward(model.spec, model.weights, embeds)


@pytest.mark.parametrize("variant", ["float", "float_replace"])
def test_float_graphs_match_reference_and_fed_back_state_equals_recomputation(tiny_lfm2, variant):
    ckpt, path = tiny_lfm2
    model = load_lfm2(ckpt, context_length=64)
    lm = LanguageModel(load_bundle(path), "cpu", variant=variant)
    ids = lm.tokenizer.encode("the car is parked")           # 17 tokens: a padded chunk, then full chunks of 8
    seq = lm.new_sequence(ids)
    chunks = 1
    while not seq.prefill_step():
        chunks += 1
    assert chunks == 3
    tokens = list(ids)
    for _ in range(12):
        ref = _reference_logits(model, tokens)[-1]
        np.testing.assert_allclose(seq.logits, ref, atol=2e-3, rtol=1e-3)
        nxt = int(seq.logits.argmax())
        assert nxt == int(ref.argmax())
        tokens.append(nxt)
        seq.append(nxt)
    assert seq.length == len(tokens)


def test_cache_growth_keeps_results(tiny_lfm2, monkeypatch):
    ckpt, path = tiny_lfm2
    monkeypatch.setattr(generator, "CACHE_BUCKET", 8)         # force several reallocations of the append caches
    model = load_lfm2(ckpt, context_length=64)
    lm = LanguageModel(load_bundle(path), "cpu", variant="float")
    ids = lm.tokenizer.encode("hi")
    seq = lm.new_sequence(ids)
    while not seq.prefill_step():
        pass
    tokens = list(ids)
    for _ in range(20):
        nxt = int(seq.logits.argmax())
        tokens.append(nxt)
        seq.append(nxt)
    assert seq.capacity >= len(tokens) and seq.capacity % 8 == 0
    np.testing.assert_allclose(seq.logits, _reference_logits(model, tokens)[-1], atol=2e-3, rtol=1e-3)


def test_int8_variant_tracks_float(tiny_lfm2):
    _, path = tiny_lfm2
    bundle = load_bundle(path)
    outs = {}
    for variant in ("float", "int8"):
        lm = LanguageModel(bundle, "cpu", variant=variant)
        seq = lm.new_sequence(lm.tokenizer.encode("open the window"))
        while not seq.prefill_step():
            pass
        outs[variant] = seq.logits.copy()
    assert int(outs["float"].argmax()) == int(outs["int8"].argmax())
    assert np.corrcoef(outs["float"], outs["int8"])[0, 1] > 0.99


def test_safetensors_roundtrip_and_bad_config(tmp_path, tiny_lfm2):
    ckpt, _ = tiny_lfm2
    t = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    write_safetensors(tmp_path / "x.safetensors", t)
    back = read_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(back["a"], t["a"])
    assert back["b"].dtype == np.float16
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((ckpt / "config.json").read_text().replace('"full_attention"', '"mamba"'))
    (bad / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="layer_types"):
        load_lfm2(bad, require_tokenizer=False)
