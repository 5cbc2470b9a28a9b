"""Generator core on a tiny LFM2 bundle: bundle refusal, context limits, image embeddings, sampling."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.modelbuild.lm_bundles import tiny_lfm2_bundle_path  # the LM fixtures live with the model builder's tests

from service.runtime.bundle import BundleError, load_bundle  # noqa: E402
from service.runtime.generator import ContextOverflowError, LanguageModel  # noqa: E402
from service.runtime.sampling import Sampler  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_lfm2_bundle_path(tmp_path_factory.mktemp("gen"), variants="float,float_replace")[1]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_wrong_format_version_is_refused(tiny, tmp_path):
    b = _copy(tiny, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m["format_version"] = 2
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format_version 2"):
        load_bundle(b)


def test_tampered_file_is_refused(tiny, tmp_path):
    b = _copy(tiny, tmp_path / "b")
    data = bytearray((b / "decoder.float.data").read_bytes())
    data[100] ^= 0xFF
    (b / "decoder.float.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.float.data sha256"):
        load_bundle(b)


def test_missing_variant_and_manifest_are_named(tiny, tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="no variant 'w4a16'"):
        load_bundle(tiny).variant("decoder_decode", "w4a16")


@pytest.mark.parametrize("variant", ["float", "float_replace"])
def test_context_overflow(tiny, variant):
    lm = LanguageModel(load_bundle(tiny), "cpu", variant=variant)
    with pytest.raises(ContextOverflowError, match="65 tokens exceeds the context length 64"):
        lm.new_sequence([65] * 65)
    seq = lm.new_sequence([65] * 60)
    while not seq.prefill_step():
        pass
    for _ in range(4):
        seq.append(66)
    with pytest.raises(ContextOverflowError, match="65 tokens exceeds the context length 64"):
        seq.append(66)


def test_image_embeddings_replace_image_token_rows(tiny):
    lm = LanguageModel(load_bundle(tiny), "cpu", variant="float")
    lm.image_token_id = 259                                   # the tiny vocabulary's <|pad|> stands in for <image>
    ids = [65, 259, 259, 66]
    rows = np.random.default_rng(0).standard_normal((2, lm.hidden_size)).astype(np.float32)
    seq = lm.new_sequence(ids, image_embeds=[rows])
    np.testing.assert_array_equal(seq._prompt_embeds[1:3], rows)
    with pytest.raises(ValueError, match="2 image tokens but the images give 3"):
        lm.new_sequence(ids, image_embeds=[np.zeros((3, lm.hidden_size), np.float32)])
    while not seq.prefill_step():
        pass
    plain = lm.new_sequence(ids)
    while not plain.prefill_step():
        pass
    assert not np.allclose(seq.logits, plain.logits)


def test_prefill_is_chunked_and_interleavable(tiny):
    lm = LanguageModel(load_bundle(tiny), "cpu", variant="float")
    a, b = lm.new_sequence(list(range(65, 85))), lm.new_sequence(list(range(65, 85)))
    done_a = done_b = False
    while not (done_a and done_b):                          # interleave two sequences chunk by chunk
        done_a = done_a or a.prefill_step()
        done_b = done_b or b.prefill_step()
    np.testing.assert_array_equal(a.logits, b.logits)
    assert a.length == 20


def test_sampler():
    logits = np.array([0.0, 3.0, 1.0, 2.9], np.float32)
    assert Sampler().sample(logits) == 1
    assert Sampler(temperature=1.0, top_k=1).sample(logits) == 1
    draws = [Sampler(temperature=1.0, top_k=2, seed=s).sample(logits) for s in range(50)]
    assert set(draws) == {1, 3}
    assert [Sampler(temperature=0.8, seed=7).sample(logits) for _ in range(3)] == \
           [Sampler(temperature=0.8, seed=7).sample(logits) for _ in range(3)]
    assert {Sampler(temperature=5.0, top_p=0.01, seed=s).sample(logits) for s in range(20)} == {1}
    with pytest.raises(ValueError, match="top_p"):
        Sampler(top_p=0)
