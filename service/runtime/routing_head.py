"""A small routing head over the decoder's last hidden state, trained when the tool chooser is prepared.

The bundle graphs give only the next-token logits, but with a tied head (SmolLM2) those are `E @ h`, the
embedding table times the final-norm hidden state `h`. `h` is recovered from the logits of a vocabulary subset
by least squares (`HiddenState`: 576 unknowns from 2048 logits, a 576 x 2048 matrix made once), centred so the
softmax's shift drops out. For an untied head it is a fixed linear projection of those logits instead; the head
learns on it the same way.

`RoutingHead` is a softmax (multinomial logistic) regression over the standardised, unit-length hidden states of
the registry's examples, trained with plain gradient descent in numpy (the set is a few hundred examples; it
trains in well under a second). On bench/route.py it beat the nearest example (cosine, 1-NN or k-NN voting) and
per-tool centroids over the same vectors, and all of them over the full log-probability vector.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SUBSET = 2048          # the first ids of the vocabulary: frequent tokens, enough rows for a 576-wide state
SCALE = 10.0           # unit vectors scaled up: the logistic loss then separates classes within few steps
C = 30.0               # inverse weight decay (decay = 1 / (C * examples)); accuracy was flat for C in 3..100
STEPS = 600
LEARNING_RATE = 0.5


class HiddenState:
    """Logits -> the (recovered) last hidden state, standardised over the training examples once fitted."""

    def __init__(self, embed_rows: np.ndarray):
        rows = np.asarray(embed_rows, np.float32)
        self.subset = rows.shape[0]
        centred = rows - rows.mean(0)
        # The pseudo-inverse of the centred rows: h = pinv @ (logits - mean(logits)).
        self._pinv_t = np.ascontiguousarray(np.linalg.pinv(centred).T, np.float32)    # [subset, hidden]
        self._mean: np.ndarray | None = None
        self._std: np.ndarray | None = None

    @classmethod
    def of_model(cls, model, subset: int = SUBSET) -> HiddenState:
        return cls(model.embed(list(range(min(subset, model.vocab_size)))))

    def raw(self, logits: np.ndarray) -> np.ndarray:
        part = np.asarray(logits, np.float32)[..., :self.subset]
        return (part - part.mean(-1, keepdims=True)) @ self._pinv_t

    def fit(self, raw: np.ndarray) -> None:
        self._mean, self._std = raw.mean(0), raw.std(0) + 1e-6

    def features(self, raw: np.ndarray) -> np.ndarray:
        """Standardised with the training examples' statistics, then unit length."""
        if self._mean is None:
            raise RuntimeError("HiddenState.features before fit()")
        x = (raw - self._mean) / self._std
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)


class RoutingHead:
    """Softmax regression from feature vectors to tool names (including "none")."""

    def __init__(self, features: np.ndarray, labels: Sequence[str], *, c: float = C, steps: int = STEPS):
        self.names = sorted(set(labels))
        if len(self.names) < 2:
            raise ValueError(f"a routing head needs examples of two or more tools, got {self.names}")
        index = {n: i for i, n in enumerate(self.names)}
        x = np.asarray(features, np.float32) * SCALE
        target = np.eye(len(self.names), dtype=np.float32)[[index[n] for n in labels]]
        n = len(x)
        self.weights = np.zeros((x.shape[1], len(self.names)), np.float32)
        self.bias = np.zeros(len(self.names), np.float32)
        for _ in range(steps):
            error = self._softmax(x @ self.weights + self.bias) - target
            self.weights -= LEARNING_RATE * (x.T @ error / n + self.weights / (c * n))
            self.bias -= LEARNING_RATE * error.mean(0)
        self.training_accuracy = float(np.mean(np.argmax(self._scores(features), 1) == target.argmax(1)))

    def _scores(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float32) * SCALE @ self.weights + self.bias

    @staticmethod
    def _softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)

    def probabilities(self, features: np.ndarray) -> dict[str, float]:
        p = self._softmax(self._scores(features))
        return dict(zip(self.names, map(float, p)))

    def predict(self, features: np.ndarray) -> str:
        return self.names[int(np.argmax(self._scores(features)))]
