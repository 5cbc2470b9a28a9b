"""Token-level pieces of generation: streaming detokenization, stop strings, and the per-request decoder
(sampling, JSON constraint, repetition control) that runs on the scheduler's executor thread."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.runtime.constrained import JsonConstraint
from service.runtime.sampling import Sampler


class IncrementalDetokenizer:
    """Token ids in, whole UTF-8 text out: a byte-level token may end mid-character, so text is released only
    once the decoded tail is no longer a replacement character (the approach of HF text-generation-inference)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        new_text = self._tok.decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """What is left at the end; an incomplete character at the very end is dropped, never sent broken."""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        new_text = self._tok.decode(self._ids[self._prefix:]).rstrip("\ufffd")
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


class StopStringFilter:
    """Holds back text that might be the start of a stop string; cuts the output at the first full match."""

    def __init__(self, stops: Sequence[str]):
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self._stops:
            return text
        buf = self._held + text
        hits = [(buf.find(s), s) for s in self._stops if s in buf]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[:min(i for i, _ in hits)]
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class Decoder:
    """The per-request state the executor thread touches (sequence, sampler, constraint)."""

    def __init__(self, seq, sampler: Sampler, constraint: JsonConstraint | None, eos: set[int], ban_eos: bool,
                 repetition_penalty: float = 1.0, no_repeat_ngram: int = 0):
        self.seq = seq
        self.generated: list[int] = []
        # A JSON answer repeats its punctuation and keys by design: repetition control is for free text only.
        self.penalty = repetition_penalty if constraint is None else 1.0
        self.ngram = no_repeat_ngram if constraint is None else 0
        self.ban = np.fromiter(sorted(eos), np.int64) if ban_eos else None
        self.sampler = sampler
        self.constraint = constraint
        self.eos = eos
        self.force_greedy = False

    def _choose(self) -> int:
        logits = self.seq.logits
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        elif self.ban is not None:
            logits = logits.copy()
            logits[self.ban] = -np.inf
        if self.generated and (self.penalty != 1.0 or self.ngram):
            logits = self._discourage_repeats(logits)
        token = int(np.argmax(logits)) if self.force_greedy else self.sampler.sample(logits)
        if self.constraint is not None:
            self.constraint.advance(token)
        self.generated.append(token)
        return token

    def _discourage_repeats(self, logits: np.ndarray) -> np.ndarray:
        logits = np.array(logits, np.float32)   # a copy: the input may be an ORT-bound buffer
        seen = np.fromiter(set(self.generated), np.int64)
        if self.penalty != 1.0:
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / self.penalty, values * self.penalty)
        n = self.ngram
        if n and len(self.generated) >= n:
            tail = self.generated[-(n - 1):]
            g = self.generated
            banned = [g[i + n - 1] for i in range(len(g) - n + 1) if g[i:i + n - 1] == tail]
            if banned:
                logits[np.asarray(banned, np.int64)] = -np.inf
        return logits

    def prefill(self) -> int | None:
        """One prefill chunk; on the last one, also the first token (saves a scheduler hop on TTFT)."""
        return self._choose() if self.seq.prefill_step() else None

    def decode(self, token: int) -> int:
        self.seq.append(token)
        return self._choose()
