"""The routing head's parts on synthetic data: the hidden state comes back from tied-head logits, and the
softmax regression separates classes it was shown (and says how sure it is)."""
from __future__ import annotations

import numpy as np
import pytest

from service.runtime.routing_head import HiddenState, RoutingHead


def test_the_hidden_state_is_recovered_from_tied_head_logits():
    rng = np.random.default_rng(1)
    embed = rng.normal(size=(512, 32)).astype(np.float32)
    hidden = rng.normal(size=(5, 32)).astype(np.float32)
    logits = hidden @ embed.T + rng.normal(size=(5, 1)).astype(np.float32)   # a softmax shift changes nothing
    state = HiddenState(embed)
    np.testing.assert_allclose(state.raw(logits), hidden, atol=1e-3)


def test_features_are_standardised_unit_vectors_and_need_fitting():
    state = HiddenState(np.eye(8, dtype=np.float32))
    raw = np.arange(24, dtype=np.float32).reshape(3, 8) ** 1.5
    with pytest.raises(RuntimeError):
        state.features(raw)
    state.fit(raw)
    np.testing.assert_allclose(np.linalg.norm(state.features(raw), axis=1), 1.0, rtol=1e-5)


def test_the_head_separates_what_it_was_shown_and_generalises_to_neighbours():
    rng = np.random.default_rng(2)
    centres = {name: rng.normal(size=16) for name in ("car_finder.where_is_my_car", "none", "sentinel.arm")}
    labels = [name for name in centres for _ in range(8)]
    x = np.stack([centres[n] + 0.3 * rng.normal(size=16) for n in labels])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    head = RoutingHead(x, labels)
    assert head.training_accuracy == 1.0
    probe = centres["sentinel.arm"] + 0.3 * rng.normal(size=16)
    probe /= np.linalg.norm(probe)
    assert head.predict(probe) == "sentinel.arm"
    p = head.probabilities(probe)
    assert set(p) == set(centres) and abs(sum(p.values()) - 1) < 1e-5 and p["sentinel.arm"] == max(p.values())


def test_a_head_needs_two_tools():
    with pytest.raises(ValueError, match="two or more"):
        RoutingHead(np.ones((3, 4)), ["none"] * 3)
