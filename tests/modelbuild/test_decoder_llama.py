"""SmolLM2-135M (real GGUF weights): graphs against the numpy reference, Paris, fed-back state vs recomputation."""
from __future__ import annotations

import numpy as np
import pytest

from service.modelbuild import reference
from service.modelbuild.gguf_llama import default_gguf, load_gguf, unpermute_rope_rows
from service.runtime.bundle import load_bundle
from service.runtime.generator import LanguageModel

from service.runtime.engine import EngineConfig

# The engine's system prompt: with it the float weights, the int4 transcode and llama.cpp answer alike.
QUESTION = [{"role": "system", "content": EngineConfig().system_prompt},
            {"role": "user", "content": "What is the capital of France?"}]


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
    embed = smollm2.weights["embed"]          # the bundle gathers the GGUF's Q8_0 rows exactly
    np.testing.assert_array_equal(lm.embed(ids), embed[ids])
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
    # MatMulNBits (accuracy level 4) quantizes activations per row block, and the kernels for one row and many
    # differ, so int4 logits agree to that noise rather than bit for bit; a wrong state feed would decorrelate them.
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
    assert m["text"]["embedding"]["dtype"] == "blocks" and m["text"]["embedding"]["source_type"] == "Q8_0"
    for component in ("decoder_prefill", "decoder_decode"):
        for variant, precision in (("float", "float"), ("int4", "int4")):
            v = bundle.variant(component, variant)
            assert v["precision"] == precision and v["state_update"] == "shared"
            assert v["file"] == f"decoder.{variant}.onnx"          # one graph for prefill and decode
            assert len(v["state"]) == 60 and v["state"][0]["input"] == "past_key.0"
    assert m["tokenizer"]["eos_token_ids"][0] == 2


def test_quantization_section_says_what_int4_is(bundle):
    q = bundle.manifest["quantization"]["int4"]
    assert q["method"] == "gguf-transcode" and q["source_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert q["weights"]["exact"] and q["weights"]["max_abs_diff"] == 0.0
    assert q["weights"]["layouts"]["Q4_1"] == "MatMulNBits bits 4 block 32 + block-sum offsets"
    assert q["heldout_tokens"] > 200 and q["top1_agreement"] >= 0.94 and q["logits_sqnr_db"] > 20


def test_graphs_use_the_fused_contrib_ops(bundle):
    import onnx
    ops = {n.op_type for n in onnx.load(str(bundle.file("decoder.int4.onnx")), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMulNBits"} <= ops
    assert "Softmax" not in ops and "Transpose" not in ops


@pytest.mark.parametrize("variant", ["float", "int4"])
def test_restored_prefix_continues_like_a_full_prefill(bundle, variant):
    lm = LanguageModel(bundle, "cpu", variant=variant)
    system = lm.tokenizer.encode(lm.tokenizer.apply_chat_template([QUESTION[0]], add_generation_prompt=False))
    ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(QUESTION))
    assert ids[:len(system)] == system
    cached = lm.new_sequence(system)
    while not cached.prefill_step():
        pass
    state = cached.snapshot()
    assert state.length == len(system) and state.nbytes > 0
    full, restored = lm.new_sequence(ids), lm.new_sequence(ids, prefix=state)
    assert restored.length == len(system)          # only the question is left to prefill
    for seq in (full, restored):
        while not seq.prefill_step():
            pass
    np.testing.assert_allclose(restored.logits, full.logits, atol=1e-3 if variant == "float" else 0.3)
    again = lm.new_sequence(system, prefix=state)  # the whole prompt cached: logits at once, nothing run
    assert again.prefill_done and int(again.logits.argmax()) == int(state.logits.argmax())
    with pytest.raises(ValueError, match="not a prefix of the prompt"):
        lm.new_sequence(ids[1:], prefix=state)
