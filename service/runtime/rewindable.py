"""A prefilled sequence that can go back to an earlier point, so a fixed prefix is computed once (tool choice)."""
from __future__ import annotations

import numpy as np

from service.runtime.generator import MASK_VALUE


class RewindableSequence:
    """A prefilled sequence that can go back to an earlier point: the prefix is computed once.

    `mark()` names the current point and `rewind(mark)` returns to it. On the CPU's shared graphs a mark is a
    decoder-state snapshot (`SharedSequence.snapshot`, a copy of the filled cache rows) and rewinding starts a
    new sequence from it; on append/replace graphs a mark is a length, and rows past it are masked off and
    overwritten by the next append. A convolution state (LFM2) can be neither, so such bundles are refused.
    """

    def __init__(self, model, prompt_ids: list[int]):
        self.model = model
        self.seq = model.new_sequence(prompt_ids)
        self.snapshots = hasattr(self.seq, "snapshot")
        if not self.snapshots and any(s["kind"] == "conv" for s in model._graphs["decoder_decode"].entry["state"]):
            raise ValueError("tool choice needs an attention-only decoder (convolution states cannot be rewound)")

    def prefill_step(self) -> bool:
        return self.seq.prefill_step()

    @property
    def length(self) -> int:
        return self.seq.length

    def logits(self) -> np.ndarray:
        return np.array(self.seq.logits, np.float32)

    def append(self, token: int) -> np.ndarray:
        self.seq.append(token)
        return np.array(self.seq.logits, np.float32)

    def feed(self, ids: list[int], start) -> np.ndarray:
        """From mark `start`, the tokens `ids` (a question): prefilled in chunks on graphs that restore state
        (one graph run instead of one per token), appended one by one otherwise. Returns the next logits."""
        if not self.snapshots:
            self.rewind(start)
            for token in ids:
                self.seq.append(token)
            return np.array(self.seq.logits, np.float32)
        self.seq = self.model.new_sequence(list(start.tokens) + list(ids), prefix=start)
        while not self.seq.prefill_step():
            pass
        return np.array(self.seq.logits, np.float32)

    def extend(self, ids: list[int]) -> np.ndarray:
        """The tokens `ids` after the current point: one chunk where the graph restores state (a snapshot and
        a restore cost less than a second decode step), one append per token otherwise."""
        if len(ids) > 1 and self.snapshots:
            return self.feed(ids, self.mark())
        for token in ids:
            self.seq.append(token)
        return np.array(self.seq.logits, np.float32)

    def mark(self):
        return self.seq.snapshot() if self.snapshots else self.seq.length

    def rewind(self, mark) -> None:
        if self.snapshots:
            if self.seq.length != mark.length or tuple(self.seq.tokens) != tuple(mark.tokens):
                self.seq = self.model.new_sequence(list(mark.tokens), prefix=mark)
            return
        seq, length = self.seq, mark
        if not 0 < length <= seq.length:
            raise ValueError(f"rewind: {length} is outside 1..{seq.length}")
        if length == seq.length:
            return
        step = seq._decode
        if step.graph.mode == "replace":
            step.cache_write[0, 0, seq.length - 1, 0] = 0.0
            step.attention_mask[0, 0, 0, length:] = MASK_VALUE
        else:
            step.attention_mask[0, 0, 0, length:seq.capacity] = MASK_VALUE
        seq.length = length
        del seq.tokens[length:]
