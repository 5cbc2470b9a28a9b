"""Prompts as token ids with a reusable head, and the decoder states of those heads.

A prompt is the chat template rendered over [system, user]. Its head, the system turn, is the same for every
request that uses that system prompt (the Assistant's, each skill's), so its decoder state is prefilled once per
loaded model and restored per request, as llama.cpp's prompt cache and vLLM's prefix caching do; only the user
turn is prefilled. The head is tokenized on its own and the rest appended, so the head's ids are exactly the ids
the state was made from (a chat template's turns end on a special token, where tokenization splits anyway).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from service.runtime import metrics
from service.runtime.shared_sequence import DecoderState


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    head_len: int = 0                        # ids[:head_len] is a cacheable head (0: none)
    history: DecoderState | None = None      # a conversation's state: its tokens begin ids (None: none)
    messages: tuple[dict, ...] = ()          # a conversation turn: the messages this prompt renders


def build_prompt(tokenizer, system: str, content: str) -> Prompt:
    """[system, user] through the chat template, with the system turn as the cacheable head."""
    user = {"role": "user", "content": content}
    if not system:
        return Prompt(tokenizer.encode(tokenizer.apply_chat_template([user], add_generation_prompt=True)))
    messages = [{"role": "system", "content": system}, user]
    head_text = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=False)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if not full.startswith(head_text):      # a template that renders the system turn differently with a user turn
        return Prompt(tokenizer.encode(full))
    head = tokenizer.encode(head_text)
    return Prompt(head + tokenizer.encode(full[len(head_text):], add_bos=False), head_len=len(head))


class PrefixStates:
    """Decoder states of prompt heads, least recently used dropped past a byte budget; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._states: OrderedDict[tuple[int, ...], DecoderState] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, head: tuple[int, ...]) -> DecoderState | None:
        with self._lock:
            state = self._states.get(head)
            if state is not None:
                self._states.move_to_end(head)
        metrics.PROMPT_CACHE.labels("hit" if state is not None else "miss").inc()
        return state

    def put(self, state: DecoderState) -> None:
        if state.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._states.pop(state.tokens, None)
            self._bytes -= old.nbytes if old is not None else 0
            self._states[state.tokens] = state
            self._bytes += state.nbytes
            while self._bytes > self.max_bytes:
                _, dropped = self._states.popitem(last=False)
                self._bytes -= dropped.nbytes
            metrics.PROMPT_CACHE_BYTES.set(self._bytes)

    def __len__(self) -> int:
        return len(self._states)
