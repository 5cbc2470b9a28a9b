"""The residual rotation keeps the float function and spreads an outlier channel; the calibration text is real,
varied and disjoint from its held-out half."""
from __future__ import annotations

import numpy as np

from service.modelbuild import calibration_text, reference, rotation
from service.modelbuild.lfm2 import load_lfm2
from service.modelbuild.tiny import write_tiny_lfm2


def test_rotation_is_exact_in_float_and_spreads_the_outlier_channel(tmp_path):
    model = load_lfm2(write_tiny_lfm2(tmp_path / "ckpt"), context_length=32)
    spec, weights = model.spec, model.weights
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, 12)
    plain = reference.forward(spec, weights, weights["embed"][ids])
    r_spec, r_weights, q = rotation.rotate_residual(spec, weights, seed=3)
    assert np.allclose(q @ q.T, np.eye(spec.hidden_size), atol=1e-10)
    rotated = reference.forward(r_spec, r_weights, r_weights["embed"][ids])
    assert np.max(np.abs(rotated - plain)) < 1e-4 * np.max(np.abs(plain))
    assert all(np.all(lw["input_norm"] == 1) and np.all(lw["ffn_norm"] == 1) for lw in r_weights["layers"])
    stream = np.random.default_rng(1).standard_normal((12, spec.hidden_size))
    stream[0, 5] = 2000.0                                             # an attention-sink-like outlier
    assert rotation.residual_peak_ratio(stream @ q) < rotation.residual_peak_ratio(stream) / 3


def test_calibration_text_is_real_varied_and_disjoint_from_held_out():
    cal, held = calibration_text.split()
    assert {d.source for d in cal} >= {"python-reference", "package-readme"}
    assert {d.source for d in held} >= {"python-reference", "package-readme"}
    assert not {d.name for d in cal} & {d.name for d in held}
    assert sum(len(d.text) for d in cal) > 400_000                   # >> 20k tokens at ~4 characters a token
    words = lambda text: text.split()                                # noqa: E731
    chunks = calibration_text.token_chunks(lambda t: list(range(len(words(t)))), cal, 64, 40)
    assert len(chunks) == 40 and all(len(c) == 64 for c in chunks)
    assert len({d.source for d in cal[:6]}) >= 2                     # interleaved: any prefix mixes sources
