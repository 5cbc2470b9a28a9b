"""Assistant conversations that keep their decoder state between turns, so a follow-up prefills only itself.

A conversation holds its messages, the chat-template text and token ids of its history (through the last
end-of-turn token), and the decoder state after them. A turn's prompt is that history plus the new user turn;
when the state is restored only the new turn is prefilled. The tokens of the history are the ids the model was
fed and generated, never a re-tokenization of decoded text (BPE of decoded text can differ from sampled ids).

Memory policy (documented in docs/conversations.md):
- at most `max_sessions` conversations; starting one more ends the least recently used;
- a conversation idle for `idle_seconds` ends; its id then answers NOT_FOUND, saying why;
- decoder states are held within `max_state_bytes`: past it the least recently used conversation's state is
  dropped (its messages stay) and its next turn prefills its history again (counted as `evicted`);
- context overflow: when history + the new turn + the answer's room pass the context, the oldest user/assistant
  turns are dropped (the system prompt stays) and the rest prefilled again (counted as `truncated`); a single
  turn that does not fit on its own is INVALID_ARGUMENT.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from service.rpc_errors import NotFoundError
from service.runtime import metrics
from service.runtime.prompts import Prompt, build_prompt
from service.runtime.shared_sequence import DecoderState


class ConversationNotFound(NotFoundError):
    pass


@dataclass
class ConversationConfig:
    max_sessions: int = 8                    # open conversations; one more ends the least recently used
    idle_seconds: float = 900.0              # a conversation idle this long ends
    max_state_bytes: int = 256 * 1024 * 1024  # decoder states kept across conversations (SmolLM2: ~46 KB a token)
    max_turns: int = 64                      # user turns per conversation; older turns are dropped past it

    def validate(self) -> None:
        if self.max_sessions < 1 or self.max_turns < 1:
            raise ValueError("max_sessions, max_turns: must be >= 1")
        if self.idle_seconds <= 0 or self.max_state_bytes < 0:
            raise ValueError("idle_seconds: must be > 0; max_state_bytes >= 0")


@dataclass
class Conversation:
    session_id: str
    system: str
    messages: list[dict] = field(default_factory=list)     # user/assistant turns, system excluded
    text: str = ""                 # the rendered history the state holds (through the last end-of-turn token)
    tokens: list[int] = field(default_factory=list)        # its ids
    state: DecoderState | None = None
    last_used: float = 0.0
    turns: int = 0
    max_turns: int = ConversationConfig.max_turns
    pending_reprefill: str = ""    # why the next turn prefills its history again ("" when it need not)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # --- the next turn's prompt ---------------------------------------------------------------------------
    def prompt_for(self, tokenizer, content: str, fits) -> Prompt:
        """The prompt for a new user turn; `fits(n_ids)` says whether a prompt of n ids leaves the answer room."""
        user = {"role": "user", "content": content}
        head_len = 0
        while True:
            head = self._head()
            messages = head + self.messages + [user]
            full = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            if self.tokens and full.startswith(self.text):
                ids = self.tokens + tokenizer.encode(full[len(self.text):], add_bos=False)
                history = self.state
            elif not self.messages:    # the first turn is a plain [system, user] prompt: its head is cached
                first = build_prompt(tokenizer, self.system, content)
                ids, history, head_len = first.ids, None, first.head_len
            else:                      # no state kept, or the template re-rendered earlier turns
                ids, history = tokenizer.encode(full), None
            if fits(len(ids)):
                break
            if not self.messages:
                raise ValueError(f"this turn does not fit the context on its own ({len(ids)} prompt tokens)")
            self._drop_oldest_turn("truncated")
        if history is None and self.pending_reprefill:
            metrics.CONVERSATION_REPREFILLS.labels(self.pending_reprefill).inc()
        self.pending_reprefill = ""
        return Prompt(ids, head_len=head_len, history=history, messages=tuple(messages))

    def close_turn(self, tokenizer, prompt: Prompt, generated: list[int], answer: str, state: DecoderState | None,
                   eos: int) -> None:
        """Record the finished turn: the history now ends with the answer and its end-of-turn token."""
        history = list(prompt.messages) + [{"role": "assistant", "content": answer}]
        rendered = tokenizer.apply_chat_template(history, add_generation_prompt=False)
        eos_text = tokenizer.decode([eos], skip_special_tokens=False)
        cut = rendered.rfind(eos_text)
        self.messages = history[len(self._head()):]
        self.turns += 1
        if cut < 0:                          # a template without a visible end-of-turn: keep messages only
            self.text, self.tokens, self.state = "", [], None
            return
        self.text = rendered[:cut + len(eos_text)]
        ids = list(prompt.ids) + [t for t in generated if t != eos] + [eos]
        if state is not None and tuple(ids[:state.length]) != state.tokens:
            state = None                     # the cache does not hold exactly this history: prefill it next time
        self.tokens, self.state = ids, state
        while sum(1 for m in self.messages if m["role"] == "user") > self.max_turns:
            self._drop_oldest_turn("truncated")

    # --- internals ------------------------------------------------------------------------------------------
    def _head(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def _drop_oldest_turn(self, reason: str) -> None:
        first_user = next(i for i, m in enumerate(self.messages) if m["role"] == "user")
        rest = self.messages[first_user + 1:]
        next_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), len(rest))
        self.messages = rest[next_user:]
        self.forget_state(reason)

    def forget_state(self, reason: str) -> None:
        self.text, self.tokens, self.state = "", [], None
        self.pending_reprefill = reason


class ConversationStore:
    def __init__(self, config: ConversationConfig | None = None, clock=time.monotonic):
        self.config = config or ConversationConfig()
        self.config.validate()
        self.clock = clock
        self._open: OrderedDict[str, Conversation] = OrderedDict()
        self._ended: OrderedDict[str, str] = OrderedDict()       # id -> why it ended (bounded)
        self._lock = threading.Lock()

    def start(self, system: str) -> Conversation:
        with self._lock:
            self._expire()
            while len(self._open) >= self.config.max_sessions:
                old_id, _ = self._open.popitem(last=False)
                self._ended_because(old_id, f"ended to make room: at most {self.config.max_sessions} conversations "
                                            f"are kept, and it was the least recently used")
            conversation = Conversation(secrets.token_urlsafe(12), system, last_used=self.clock(),
                                        max_turns=self.config.max_turns)
            self._open[conversation.session_id] = conversation
            self._gauges()
            return conversation

    def get(self, session_id: str) -> Conversation:
        with self._lock:
            self._expire()
            conversation = self._open.get(session_id)
            if conversation is None:
                why = self._ended.get(session_id, "no such conversation")
                raise ConversationNotFound(f"session_id {session_id!r}: {why}; start a new conversation")
            conversation.last_used = self.clock()
            self._open.move_to_end(session_id)
            return conversation

    def end(self, session_id: str) -> None:
        with self._lock:
            if self._open.pop(session_id, None) is None:
                raise ConversationNotFound(f"session_id {session_id!r}: no such conversation")
            self._ended_because(session_id, "ended by the client")
            self._gauges()

    def kept(self, conversation: Conversation) -> None:
        """After a turn stored a state: hold all states within the byte budget (least recently used first)."""
        with self._lock:
            total = sum(c.state.nbytes for c in self._open.values() if c.state is not None)
            for other in list(self._open.values()):
                if total <= self.config.max_state_bytes:
                    break
                if other.state is not None and other is not conversation:
                    total -= other.state.nbytes
                    other.forget_state("evicted")
            self._gauges()

    def __len__(self) -> int:
        return len(self._open)

    def _expire(self) -> None:
        now = self.clock()
        for session_id, conversation in list(self._open.items()):
            if now - conversation.last_used > self.config.idle_seconds:
                del self._open[session_id]
                self._ended_because(session_id, f"ended after {self.config.idle_seconds:g} s without a turn")

    def _ended_because(self, session_id: str, why: str) -> None:
        self._ended[session_id] = why
        while len(self._ended) > 1024:
            self._ended.popitem(last=False)

    def _gauges(self) -> None:
        metrics.CONVERSATIONS.set(len(self._open))
        metrics.CONVERSATION_STATE_BYTES.set(sum(c.state.nbytes for c in self._open.values() if c.state is not None))
