"""Prompts as token ids with a reusable head, and the decoder states of those heads.

A prompt is the chat template rendered over [system, user]. Its head, everything before the user's text (the
system turn and the user turn's opening, "<|im_start|>user\n" in ChatML), is the same for every request with that
system prompt (the Assistant's, each skill's), so its decoder state is prefilled once per loaded model and restored
per request, as llama.cpp's prompt cache and vLLM's prefix caching do; only the user's text and the template's
closing are prefilled. The prompt is tokenized whole, and a head is used only when those ids begin with the
head's own ids, so a restored state always holds exactly the prompt's first tokens.
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


# Stands for the user's text while the template is rendered once to find where that text begins.
_PROBE = "\x00incar-user-text\x00"


def build_prompt(tokenizer, system: str, content: str) -> Prompt:
    """[system, user] through the chat template. The cacheable head is everything the template renders before the
    user's text (the system turn and the user turn's opening), when the whole prompt's own tokenization begins
    with that head's; else the system turn alone, on the same condition; else none."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(full)
    probe = tokenizer.apply_chat_template(messages[:-1] + [{"role": "user", "content": _PROBE}],
                                          add_generation_prompt=True)
    heads = []
    if probe.count(_PROBE) == 1 and probe.replace(_PROBE, content) == full:
        heads.append(probe[:probe.index(_PROBE)])
    if system:
        heads.append(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=False))
    for head_text in heads:
        head = tokenizer.encode(head_text)
        if full.startswith(head_text) and ids[:len(head)] == head:
            return Prompt(ids, head_len=len(head))
    return Prompt(ids)


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
