"""SmolLM2-135M (real GGUF weights): graphs against the numpy reference, Paris, fed-back state vs recomputation."""
from __future__ import annotations

import numpy as np
import pytest

from service.modelbuild import reference
from service.modelbuild.gguf_llama import default_gguf, load_gguf, unpermute_rope_rows
from service.runtime.bundle import load_bundle
from service.runtime.generator import LanguageModel

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    return load_gguf(default_gguf())


@pytest.fixture(scope="module")
def bundle(default_bundle):
    return load_bundle(default_bundle)


def _greedy(lm: LanguageModel, ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    seq = lm.new_sequence(ids)
    while not seq.prefill_step():
        pass
    out, logits = [], []
    for _ in range(steps):
        logits.append(seq.logits.copy())
        tok = int(seq.logits.argmax())
        out.append(tok)
        if tok in lm.eos_token_ids:
            break
        seq.append(tok)
    return out, logits


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * 8, 5)).astype(np.float32)
    # llama.cpp's converter: reshape(n_head, 2, rows/n_head/2, in).swapaxes(1, 2)
    permuted = w.reshape(3, 2, 4, 5).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, 3), w)


def test_float_bundle_matches_reference_token_for_token(smollm2, bundle):
    lm = LanguageModel(bundle, "cpu", variant="float")
    ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(QUESTION))
    out, logits = _greedy(lm, ids, 6)
    embed = smollm2.weights["embed"].astype(np.float16).astype(np.float32)
    ref = reference.forward(smollm2.spec, smollm2.weights, embed[ids + out[:-1]])
    for k, step_logits in enumerate(logits):
        expected = ref[len(ids) - 1 + k]
        assert int(step_logits.argmax()) == int(expected.argmax()) == out[k]
        assert np.abs(step_logits - expected).max() < 0.05 * max(1.0, np.abs(expected).max() / 10)


@pytest.mark.parametrize("variant", ["float", "int4"])
def test_answers_paris_through_the_chat_template(bundle, variant):
    lm = LanguageModel(bundle, "cpu", variant=variant)
    ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(QUESTION))
    out, _ = _greedy(lm, ids, 16)
    assert "Paris" in lm.tokenizer.decode(out)


def test_float_fed_back_state_equals_prefill_recomputation(bundle):
    lm = LanguageModel(bundle, "cpu", variant="float")
    ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template([{"role": "user", "content": "Name a color."}]))
    out, logits = _greedy(lm, ids, 6)
    for k in range(len(out)):
        seq = lm.new_sequence(ids + out[:k])                # whole prefix recomputed by the prefill graph
        while not seq.prefill_step():
            pass
        assert int(seq.logits.argmax()) == out[k]
        np.testing.assert_allclose(seq.logits, logits[k], atol=2e-3, rtol=1e-3)


def test_int4_fed_back_state_tracks_prefill_recomputation(bundle):
    # MatMulNBits rounds differently for one row (decode) and 64 rows (prefill), so int4 logits agree to
    # quantization noise rather than bit for bit; a wrong state feed would decorrelate them entirely.
    lm = LanguageModel(bundle, "cpu", variant="int4")
    ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template([{"role": "user", "content": "Name a color."}]))
    out, logits = _greedy(lm, ids, 6)
    for k in range(len(out)):
        seq = lm.new_sequence(ids + out[:k])
        while not seq.prefill_step():
            pass
        assert np.corrcoef(seq.logits, logits[k])[0, 1] > 0.99
        top2 = np.sort(logits[k])[-2:]
        if top2[1] - top2[0] > 1.0:                          # clear winners must agree
            assert int(seq.logits.argmax()) == out[k]


def test_manifest_describes_both_variants(bundle):
    m = bundle.manifest
    assert m["text"]["context_length"] == 2048 and m["text"]["prefill_chunk"] == 64
    for component in ("decoder_prefill", "decoder_decode"):
        for variant, precision in (("float", "float"), ("int4", "int4")):
            v = bundle.variant(component, variant)
            assert v["precision"] == precision and v["state_update"] == "append"
            assert len(v["state"]) == 60 and v["state"][0]["input"] == "past_key.0"
    assert m["tokenizer"]["eos_token_ids"][0] == 2
