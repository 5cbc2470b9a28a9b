"""JSON-schema-constrained decoding with llguidance: a skill always gets JSON that parses and validates.

llguidance compiles the schema to a grammar and, per step, gives the set of tokens that keep the output a
valid prefix; the engine masks every other token's logit before sampling. Whitespace is not free (compact
JSON), so a small model cannot wander into endless blank lines.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import OrderedDict
from pathlib import Path

import llguidance
import numpy as np

# The tokenizer wrapper costs ~1 s to build (it indexes the whole vocabulary): one per tokenizer file.
_TOKENIZERS: dict[tuple[str, int, tuple[int, ...]], llguidance.LLTokenizer] = {}
_LOCK = threading.Lock()

# A schema is a request field: bounded before it is parsed (a 100k-deep one overflows the parser's recursion, a
# 7 MB one took seconds and hundreds of MiB to compile). Real output schemas are a few KiB and a few levels deep.
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
COMPILED_CACHE = 64    # recently compiled grammars, by schema text (skills ask with the same few schemas)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')


class SchemaError(ValueError):
    """The JSON schema is not valid JSON or not supported by the grammar compiler."""


class JsonConstraint:
    """One request's constraint state: `mask(logits)` before sampling, `advance(token)` after."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, eos_token_ids: list[int]):
        self._matcher = llguidance.LLMatcher(tokenizer, grammar)
        self._tokenizer = tokenizer
        if self._matcher.is_error():
            raise SchemaError(f"json_schema: {self._matcher.get_error()}")
        self._words = (tokenizer.vocab_size + 31) // 32
        self._bitmask = np.zeros(self._words, np.int32)
        self._vocab = tokenizer.vocab_size
        self._eos = eos_token_ids

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """Disallowed tokens' logits to -inf (a copy: the input may be an ORT-bound buffer)."""
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little").astype(bool)
        out = np.full(logits.shape, -np.inf, np.float32)
        n = min(logits.shape[-1], self._vocab, allowed.size)
        keep = np.flatnonzero(allowed[:n])
        out[keep] = logits[keep]
        if self._matcher.is_stopped():
            # Grammar complete: only end-of-sequence may follow.
            out[:] = -np.inf
            out[self._eos] = 0.0
        return out

    def advance(self, token_id: int) -> None:
        if token_id in self._eos and self._matcher.is_accepting():
            return
        if not self._matcher.consume_token(int(token_id)):
            raise SchemaError(f"constrained decoding rejected token {token_id}: {self._matcher.get_error()}")

    def is_complete(self) -> bool:
        return self._matcher.is_accepting()

    def forced(self) -> list[int]:
        """The tokens the grammar allows only one way from here (e.g. `{"name`), consumed: a caller feeds them
        to the model in one chunk instead of one decode step each."""
        out: list[int] = []
        while not self._matcher.is_stopped():
            tokens = self._matcher.compute_ff_tokens()
            if not tokens:
                # Forced bytes that are one token of their own (`":"` after a key) are forced too; a single
                # byte (`{`) is left to the model, which may merge it with what follows (`{}`, `{"`).
                forced = self._matcher.compute_ff_bytes()
                tokens = self._tokenizer.tokenize_bytes(forced) if len(forced) > 1 else []
                if len(tokens) != 1 or self._matcher.try_consume_tokens(tokens) != 1:
                    break
            elif not self._matcher.consume_tokens(tokens):
                break
            out += tokens
        return out


class JsonConstraintFactory:
    """Per model: compiles schemas against the model's tokenizer."""

    def __init__(self, tokenizer_file: str | Path, vocab_size: int, eos_token_ids: list[int]):
        key = (str(Path(tokenizer_file).resolve()), int(vocab_size), tuple(eos_token_ids))
        with _LOCK:
            tok = _TOKENIZERS.get(key)
            if tok is None:
                text = Path(tokenizer_file).read_text(encoding="utf-8")
                tok = llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=list(eos_token_ids))
                _TOKENIZERS[key] = tok
        self._tokenizer = tok
        self._eos = list(eos_token_ids)

        self._compiled: OrderedDict[str, str] = OrderedDict()
        self._compiled_lock = threading.Lock()

    async def for_schema_async(self, schema: str) -> JsonConstraint:
        """As for_schema, compiled in a worker thread so the event loop keeps serving."""
        check_schema_bounds(schema)       # cheap: refuse the oversized before taking a thread
        return await asyncio.to_thread(self.for_schema, schema)

    def for_schema(self, schema: str) -> JsonConstraint:
        check_schema_bounds(schema)
        with self._compiled_lock:
            grammar = self._compiled.get(schema)
            if grammar is not None:
                self._compiled.move_to_end(schema)
        if grammar is None:
            grammar = self._compile(schema)
            with self._compiled_lock:
                self._compiled[schema] = grammar
                while len(self._compiled) > COMPILED_CACHE:
                    self._compiled.popitem(last=False)
        return JsonConstraint(self._tokenizer, grammar, self._eos)

    def _compile(self, schema: str) -> str:
        try:
            parsed = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise SchemaError(f"json_schema: not valid JSON ({exc})") from exc
        if not isinstance(parsed, dict):
            raise SchemaError("json_schema: must be a JSON object")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                parsed, overrides={"whitespace_flexible": False})
        except Exception as exc:  # llguidance raises ValueError/RuntimeError with the compiler's message
            raise SchemaError(f"json_schema: {exc}") from exc
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise SchemaError(f"json_schema: {messages[0] if messages else 'unsupported schema'}")
        return grammar


def check_schema_bounds(schema: str) -> None:
    """SchemaError when the schema text is over MAX_SCHEMA_BYTES or nests deeper than MAX_SCHEMA_DEPTH (counted
    on the text, outside strings, so nothing recursive ever sees it)."""
    size = len(schema.encode("utf-8")) if len(schema) <= MAX_SCHEMA_BYTES else len(schema)
    if size > MAX_SCHEMA_BYTES:
        raise SchemaError(f"json_schema: {size} bytes, the limit is {MAX_SCHEMA_BYTES}")
    depth = deepest = 0
    for ch in _STRINGS.sub("", schema):
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_SCHEMA_DEPTH:
                    raise SchemaError(f"json_schema: nested deeper than {MAX_SCHEMA_DEPTH} levels")
        elif ch in "]}":
            depth -= 1
