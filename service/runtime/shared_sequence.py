"""Decoding over a `shared` bundle graph (docs/model-bundle.md): GroupQueryAttention writes each step's K/V rows
into the cache in place (past and present are one bound buffer), so a step copies nothing but its one embedding row.

Decoder state can be snapshotted and restored (`DecoderState`): a cached system prompt or a conversation's
history is prefilled once, and a later sequence starts from it and prefills only what follows.
See /work/notes/lm-graph-api.md for the contract.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:  # pragma: no cover
    from .generator import LanguageModel

# Caches grow in buckets of this many slots (a copy at most context/BUCKET times per sequence); memory follows
# what a sequence holds, not the whole context.
CACHE_BUCKET = 256


class ContextOverflowError(ValueError):
    """The prompt (or the generation) does not fit in the model's context."""


@dataclass(frozen=True)
class DecoderState:
    """An immutable copy of a sequence's decoder state after `length` tokens: restore it any number of times."""
    model_key: tuple              # (bundle path, variant): a state only fits the graphs that made it
    tokens: tuple[int, ...]       # the token ids the state holds, in order (cache slot = position)
    kv: tuple[np.ndarray, ...]    # per state entry: [1, kv_heads, length, head_dim] float32, read-only
    logits: np.ndarray | None     # next-token logits after the last token (None if not computed)
    block: np.ndarray | None = None  # kv as one array [entries, 1, kv_heads, length, head_dim] (kv are its views)

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv) + (0 if self.logits is None else self.logits.nbytes)


def bind_input(binding: ort.IOBinding, name: str, arr: np.ndarray) -> None:
    binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)


def bind_output(binding: ort.IOBinding, name: str, arr: np.ndarray) -> None:
    binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)


_bind_input, _bind_output = bind_input, bind_output


class SequenceBase:
    """What every sequence kind shares: the prompt checks and embeddings, and the logits view."""

    def __init__(self, model: LanguageModel, prompt_ids: list[int], image_embeds: Sequence[np.ndarray]):
        if not prompt_ids:
            raise ValueError("prompt_ids: empty prompt")
        self.model = model
        self.L = model.context_length
        if len(prompt_ids) > self.L:
            raise ContextOverflowError(f"prompt of {len(prompt_ids)} tokens exceeds the context length {self.L}")
        self.prompt_ids = list(prompt_ids)
        self._prompt_embeds = model.embed_prompt(self.prompt_ids, image_embeds)
        self.length = 0                    # tokens in the cache
        self.tokens: list[int] = []        # every token fed so far (prompt, then appended)
        self._logits: np.ndarray | None = None

    @property
    def prefill_done(self) -> bool:
        return self._prefilled >= len(self.prompt_ids)

    def _next_position(self) -> int:
        """The cache slot the next appended token takes (checked: prompt prefilled, context not full)."""
        if not self.prefill_done:
            raise RuntimeError("append() before the prompt is prefilled")
        if self.length >= self.L:
            raise ContextOverflowError(f"sequence of {self.length + 1} tokens exceeds the context length {self.L}")
        return self.length

    @property
    def logits(self) -> np.ndarray:
        """Next-token logits [vocab]: a view of the step's output buffer, valid until the next step or until the
        sequence is dropped (its buffers then serve another sequence): copy to keep."""
        if self._logits is None:
            raise RuntimeError("no logits yet: run prefill_step() until it returns True")
        return self._logits


class CacheSlot:
    """One sequence's bound buffers: the K/V cache, the step counters, the logits row and the IO binding over them."""

    def __init__(self, session: ort.InferenceSession, state: list[dict], capacity: int, vocab: int, hidden: int):
        self.state, self.capacity = state, capacity
        self.block: np.ndarray | None = None      # every entry's buffer in one array when they share a shape
        self._allocate(capacity)
        self.seqlens = np.zeros(1, np.int32)
        self.total = np.zeros((), np.int32)
        self.logits = np.zeros((1, 1, vocab), np.float32)
        self.one = np.zeros((1, 1, hidden), np.float32)
        self.binding = session.io_binding()
        _bind_input(self.binding, "seqlens_k", self.seqlens)
        _bind_input(self.binding, "total_sequence_length", self.total)
        _bind_output(self.binding, "logits", self.logits)
        self._bind_cache()

    def grow(self, capacity: int, keep: int) -> None:
        """Larger cache buffers holding the first `keep` rows of the old ones."""
        old = self.cache
        self._allocate(capacity)
        for s in self.state:
            self.cache[s["input"]][:, :, :keep] = old[s["input"]][:, :, :keep]
        self.capacity = capacity
        self._bind_cache()

    def _allocate(self, capacity: int) -> None:
        shapes = {tuple(s["shape"]) for s in self.state}
        if len(shapes) == 1 and all(s.get("axis", 2) == 2 for s in self.state):
            # One array: a snapshot or a restore is one copy, not one per entry.
            shape = list(shapes.pop())
            shape[2] = capacity
            self.block = np.zeros([len(self.state), *shape], np.float32)
            self.cache = {s["input"]: self.block[i] for i, s in enumerate(self.state)}
        else:
            self.block = None
            self.cache = {s["input"]: _zeros(s, capacity) for s in self.state}

    def _bind_cache(self) -> None:
        for s in self.state:
            buf = self.cache[s["input"]]
            _bind_input(self.binding, s["input"], buf)
            _bind_output(self.binding, s["output"], buf)     # the same memory: the kernel appends in place


class CacheSlots:
    """A model's free CacheSlots, handed to the next sequence: allocating and binding a fresh cache (60 buffers for
    SmolLM2) cost ~5 ms per request here, more than restoring a cached system prompt. Rows past a sequence's length
    are never read (GroupQueryAttention attends to `total_sequence_length` slots), so a slot is reused unzeroed.
    At most `keep` slots of up to `keep_capacity` cache slots each are kept; thread-safe."""

    def __init__(self, session: ort.InferenceSession, state: list[dict], vocab: int, hidden: int, context: int,
                 keep: int = 4, keep_capacity: int = 512):
        self._new = lambda capacity: CacheSlot(session, state, capacity, vocab, hidden)
        self.context, self.keep, self.keep_capacity = context, keep, keep_capacity
        self._free: list[CacheSlot] = []
        self._lock = threading.Lock()

    def bucket(self, slots: int) -> int:
        return min(self.context, -(-slots // CACHE_BUCKET) * CACHE_BUCKET)

    def take(self, slots: int) -> CacheSlot:
        """A slot holding at least `slots` cache rows: the smallest free one that does, else a new one."""
        with self._lock:
            fitting = [s for s in self._free if s.capacity >= slots]
            if fitting:
                slot = min(fitting, key=lambda s: s.capacity)
                self._free.remove(slot)
                return slot
        return self._new(self.bucket(slots))

    def give(self, slot: CacheSlot) -> None:
        with self._lock:
            if slot.capacity <= self.keep_capacity and len(self._free) < self.keep:
                self._free.append(slot)

    def __len__(self) -> int:
        return len(self._free)


class SharedSequence(SequenceBase):
    """One sequence: prefill in chunks (`prefill_step`), then one token per `append`; same API as DecodeSequence.
    Its buffers come from the model's CacheSlots and go back there when the sequence is dropped."""

    def __init__(self, model: LanguageModel, prompt_ids: list[int], image_embeds: Sequence[np.ndarray] = (),
                 prefix: DecoderState | None = None):
        super().__init__(model, prompt_ids, image_embeds)
        graph = model._graphs["decoder_decode"]
        self._session, self._state = graph.session, graph.entry["state"]
        self._chunk = model.prefill_chunk
        slots = model.cache_slots
        self._slot = slot = slots.take(len(prompt_ids) + 1)
        weakref.finalize(self, slots.give, slot)
        self._binding, self._cache = slot.binding, slot.cache
        self._seqlens, self._total, self._out_logits, self._one = slot.seqlens, slot.total, slot.logits, slot.one
        if prefix is not None:
            self._restore(prefix)

    @property
    def capacity(self) -> int:
        return self._slot.capacity

    # -- public API (as DecodeSequence) ---------------------------------------------------------
    @property
    def _prefilled(self) -> int:           # every cached token is a prompt token until the prompt is done
        return self.length

    def prefill_step(self) -> bool:
        """Run the next chunk of the prompt; True when the whole prompt is in the cache."""
        if self.prefill_done:
            return True
        start = self.length
        n = min(self._chunk, len(self.prompt_ids) - start)
        self._ensure_capacity(start + n + 1)
        rows = np.ascontiguousarray(self._prompt_embeds[None, start:start + n])
        self._run(rows, start, n)
        self.tokens.extend(self.prompt_ids[start:start + n])
        return self.prefill_done

    def append(self, token_id: int) -> None:
        """Feed one token (one decode step); `.logits` then predicts the next one."""
        pos = self._next_position()
        self._ensure_capacity(pos + 1)
        self._one[0, 0] = self.model.embed([token_id])[0]
        self._run(self._one, pos, 1)
        self.tokens.append(int(token_id))

    # -- state ----------------------------------------------------------------------------------
    def snapshot(self) -> DecoderState:
        """A copy of the state after every token fed so far (the prompt must be prefilled up to here)."""
        block = None
        if self._slot.block is not None:
            block = self._slot.block[:, :, :, :self.length].copy()
            block.flags.writeable = False
            kv = list(block)
        else:
            kv = [self._cache[s["input"]][:, :, :self.length].copy() for s in self._state]
            for rows in kv:
                rows.flags.writeable = False
        logits = None if self._logits is None else self._logits.copy()
        return DecoderState(self.model.state_key, tuple(self.tokens), tuple(kv), logits, block)

    def _restore(self, state: DecoderState) -> None:
        if state.model_key != self.model.state_key:
            raise ValueError(f"prefix state was made by {state.model_key}, not {self.model.state_key}")
        n = state.length
        if n > len(self.prompt_ids) or tuple(self.prompt_ids[:n]) != state.tokens:
            raise ValueError(f"prefix state of {n} tokens is not a prefix of the prompt")
        if n == len(self.prompt_ids) and state.logits is None:
            n -= 1                           # the last token must run again to give logits
        self._ensure_capacity(max(n, 1) + 1)
        if state.block is not None and self._slot.block is not None:
            self._slot.block[:, :, :, :n] = state.block[:, :, :, :n]
        else:
            for s, rows in zip(self._state, state.kv):
                self._cache[s["input"]][:, :, :n] = rows[:, :, :n]
        self.length = n
        self.tokens = list(state.tokens[:n])
        if n == len(self.prompt_ids):
            self._out_logits[0, 0] = state.logits
            self._logits = self._out_logits[0, -1]

    # -- internals ------------------------------------------------------------------------------
    def _run(self, embeds: np.ndarray, start: int, n: int) -> None:
        self._seqlens[0] = start + n - 1
        self._total[()] = start + n
        _bind_input(self._binding, "inputs_embeds", embeds)
        self._session.run_with_iobinding(self._binding)
        self.length = start + n
        self._logits = self._out_logits[0, -1]

    def _ensure_capacity(self, slots: int) -> None:
        if slots > self._slot.capacity:
            self._slot.grow(self.model.cache_slots.bucket(slots), self.length)
            self._cache = self._slot.cache


def _zeros(entry: dict, slots: int) -> np.ndarray:
    shape = list(entry["shape"])
    shape[entry.get("axis", 2)] = slots
    return np.zeros(shape, np.float32)
