"""Token sampling: greedy, temperature, top-k, top-p, seeded."""
from __future__ import annotations

import math

import numpy as np


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0):
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if not math.isfinite(value):   # NaN passes every comparison below; inf flattens the distribution
                raise ValueError(f"{name}: {value} is not a finite number")
        if temperature < 0:
            raise ValueError(f"temperature: {temperature} must be >= 0")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: {top_p} must be in (0, 1]")
        if top_k < 0:
            raise ValueError(f"top_k: {top_k} must be >= 0")
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self._rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits).reshape(-1)
        if self.temperature == 0 or self.top_k == 1:
            return int(np.argmax(logits))
        candidates = np.arange(logits.size)
        scores = logits.astype(np.float64) / self.temperature
        if self.top_k and self.top_k < logits.size:
            candidates = np.argpartition(-scores, self.top_k - 1)[: self.top_k]
            scores = scores[candidates]
        order = np.argsort(-scores)
        candidates, scores = candidates[order], scores[order]
        probs = np.exp(scores - scores[0])
        probs /= probs.sum()
        if self.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1)
            candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
        return int(candidates[self._rng.choice(len(candidates), p=probs)])
