"""The model chooses the tool: a few-shot prompt of tool descriptions and examples, prefilled once and reused.

The fixed prefix (every tool's one-line description and the examples) is prefilled once when the chooser is
prepared; a question then costs only its own ~20 tokens plus the few tokens of a tool name, because the
sequence is rewound to the end of the prefix after each question. The choice is decoded under a constraint:
only tokens that continue some tool's name (or "none") are allowed, as an llguidance enum grammar would allow,
and the choice ends as soon as one name is left (`mode="greedy"`). `mode="likelihood"` instead scores every
name's whole token sequence by the model's log-probability and takes the best (costs one step per trie node).
Arguments (a name to enrol, a clip count) are then decoded with the llguidance JSON-schema constraint.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from service.runtime.constrained import JsonConstraintFactory
from service.runtime.generator import MASK_VALUE
from service.runtime.scheduler import NpuScheduler
from service.runtime.tooling import NONE, ToolCall, ToolSpec

log = structlog.get_logger(__name__)

MODES = ("nearest", "greedy", "likelihood")
MAX_ARGUMENT_TOKENS = 32
CONTENT_FREE = "N/A"
# `nearest`: a short chat-template context; the question's representation is the model's next-token
# log-probabilities where its answer would start (on bench/route.py the chat form beat a plain-text one).
# (A worked example in it, for the arguments, cost 5 points of accuracy: 0.80 -> 0.75.)
NEAREST_SYSTEM = "You are the in-car assistant. Pick the car tool for the driver's request."
NONE_DESCRIPTION = ("anything else: navigation, charging stations, restaurants, music, alarm clocks, weather, "
                    "phone calls, general knowledge")


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
        self._snapshots = hasattr(self.seq, "snapshot")
        if not self._snapshots and any(s["kind"] == "conv" for s in model._graphs["decoder_decode"].entry["state"]):
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
        if not self._snapshots:
            self.rewind(start)
            for token in ids:
                self.seq.append(token)
            return np.array(self.seq.logits, np.float32)
        self.seq = self.model.new_sequence(list(start.tokens) + list(ids), prefix=start)
        while not self.seq.prefill_step():
            pass
        return np.array(self.seq.logits, np.float32)

    def mark(self):
        return self.seq.snapshot() if self._snapshots else self.seq.length

    def rewind(self, mark) -> None:
        if self._snapshots:
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


@dataclass
class Choice:
    call: ToolCall
    seconds: float
    steps: int


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    top = float(np.max(logits))
    return logits - top - np.log(np.sum(np.exp(logits - top)))


class ToolChooser:
    def __init__(self, model, scheduler: NpuScheduler, specs: Sequence[ToolSpec],
                 examples: Sequence[tuple[str, str, dict]], *, mode: str = "nearest", priority: str = "chat",
                 calibrate: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        self.model, self.scheduler, self.mode, self.priority = model, scheduler, mode, priority
        self.calibrate = calibrate
        self._priors: dict[tuple[int, ...], np.ndarray] = {}
        self.specs = {s.name: s for s in specs}
        self.tokenizer = model.tokenizer
        self.examples = list(examples)
        self.prefix = self._chat_prefix() if mode == "nearest" else self._prefix_text(specs, examples)
        self._nearest: np.ndarray | None = None      # one unit vector per example (mode "nearest")
        self.names = [*self.specs, NONE]
        self._candidates = {name: self.tokenizer.encode(f" {name}\n") for name in self.names}
        self._newline = self.tokenizer.encode("\n")
        self._json: JsonConstraintFactory | None = None
        self._seq: RewindableSequence | None = None
        self._base = 0
        self._base_logits: np.ndarray | None = None
        self._lock = asyncio.Lock()

    @staticmethod
    def _prefix_text(specs: Sequence[ToolSpec], examples: Sequence[tuple[str, str, dict]]) -> str:
        lines = ["Pick the car tool that answers the driver's question, or none.", "Tools:"]
        lines += [f"- {s.name}: {s.description}" for s in specs]
        lines += [f"- {NONE}: {NONE_DESCRIPTION}", ""]
        for question, name, args in examples:
            lines += [f"Q: {question}", f"A: {name}"]
            if args:
                lines.append("Args: " + json.dumps(args, separators=(",", ":")))
        return "\n".join(lines) + "\n"

    @property
    def prefix_tokens(self) -> int:
        return len(self.tokenizer.encode(self.prefix))

    async def prepare(self) -> None:
        """Prefill the fixed prefix once (seconds on a CPU; the server does it in the background)."""
        async with self._lock:
            if self._seq is not None:
                return
            ids = self.tokenizer.encode(self.prefix)
            async with self.scheduler.admit(self.priority) as ticket:
                seq = await ticket.step(RewindableSequence, self.model, ids, kind="prefill")
                while not await ticket.step(seq.prefill_step, kind="prefill"):
                    pass
                self._base_logits = await ticket.step(seq.logits, kind="prefill")
                if self.calibrate:
                    # Contextual calibration: the names' log-probabilities for a content-free question are
                    # the prompt's own bias (a small model favours some names whatever is asked); choices
                    # subtract them.
                    base = await ticket.step(seq.mark, kind="prefill")
                    logits = self._base_logits
                    for token in self.tokenizer.encode(f"Q: {CONTENT_FREE}\nA:"):
                        logits = await ticket.step(seq.append, token, kind="prefill")
                    self._priors, _ = await self._trie_logps(ticket, seq, logits)
                    await ticket.step(seq.rewind, base, kind="prefill")
                if self.mode == "nearest":
                    self._nearest = np.stack([await self._represent(ticket, seq, q) for q, _, _ in self.examples])
            self._seq, self._base = seq, await self._marked(seq)
            log.info("tool_choice.ready", prefix_tokens=len(ids), tools=len(self.specs), mode=self.mode)

    async def choose(self, question: str) -> Choice:
        await self.prepare()
        started = time.perf_counter()
        question = " ".join(question.split())
        query = self._query(question)
        async with self._lock:
            seq = self._seq
            async with self.scheduler.admit(self.priority) as ticket:
                steps = 0
                try:
                    logits = await ticket.step(seq.feed, query, self._base, kind="prefill")
                    steps += 1
                    query_end = seq.length
                    if self.mode == "nearest":
                        name, used = self._closest(logits), 0
                    elif self.mode == "greedy":
                        name, used = await self._greedy(ticket, seq, logits)
                    else:
                        name, used = await self._likelihood(ticket, seq, logits)
                    steps += used
                    arguments = {}
                    spec = self.specs.get(name)
                    if spec is not None and spec.takes_arguments:
                        arguments, used = await self._arguments(ticket, seq, name, spec, query_end)
                        steps += used
                finally:
                    await ticket.step(seq.rewind, self._base, kind="decode")
        return Choice(ToolCall(name, arguments, "model"), time.perf_counter() - started, steps)

    async def _marked(self, seq: RewindableSequence):
        async with self.scheduler.admit(self.priority) as ticket:
            return await ticket.step(seq.mark, kind="prefill")

    def _chat(self, question: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "system", "content": NEAREST_SYSTEM},
                                                   {"role": "user", "content": question}])

    def _chat_prefix(self) -> str:
        """The chat template's text before the question (the same for every question)."""
        a, b = self._chat("a"), self._chat("b")
        return a[:next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)]

    def _query(self, question: str) -> list[int]:
        if self.mode == "nearest":
            return self.tokenizer.encode(self._chat(question)[len(self.prefix):])
        return self.tokenizer.encode(f"Q: {question}\nA:")

    @staticmethod
    def _unit(logits: np.ndarray) -> np.ndarray:
        x = _log_softmax(logits)
        x = x - x.mean()
        return x / max(float(np.linalg.norm(x)), 1e-9)

    async def _represent(self, ticket, seq: RewindableSequence, question: str) -> np.ndarray:
        """An example question's representation (the sequence is rewound after it)."""
        mark = await ticket.step(seq.mark, kind="prefill")
        logits = await ticket.step(seq.feed, self._query(" ".join(question.split())), mark, kind="prefill")
        await ticket.step(seq.rewind, mark, kind="prefill")
        return self._unit(logits)

    def _closest(self, logits: np.ndarray) -> str:
        """The tool of the example whose representation is nearest (cosine) to the question's."""
        return self.examples[int(np.argmax(self._nearest @ self._unit(logits)))][1]

    def _prior(self, prefix: tuple[int, ...]) -> np.ndarray | float:
        return self._priors.get(prefix, 0.0) if self.calibrate else 0.0

    async def _greedy(self, ticket, seq: RewindableSequence, logits: np.ndarray) -> tuple[str, int]:
        """Constrained greedy decoding over the names; stops once one name is left."""
        alive = dict(self._candidates)
        path: tuple[int, ...] = ()
        steps = 0
        while len(alive) > 1:
            depth = len(path)
            allowed = sorted({ids[depth] for ids in alive.values() if len(ids) > depth})
            adjusted = _log_softmax(logits) - self._prior(path)
            token = max(allowed, key=lambda t: adjusted[t])
            alive = {n: ids for n, ids in alive.items() if len(ids) > depth and ids[depth] == token}
            path += (token,)
            if len(alive) > 1:
                logits = await ticket.step(seq.append, token, kind="decode")
                steps += 1
        return next(iter(alive)), steps

    async def _trie_logps(self, ticket, seq: RewindableSequence, logits: np.ndarray
                          ) -> tuple[dict[tuple[int, ...], np.ndarray], int]:
        """Log-probabilities at every inner node of the names' token trie (shared prefixes computed once)."""
        nodes: dict[tuple[int, ...], np.ndarray] = {}
        steps = 0

        async def walk(path: tuple[int, ...], node_logits: np.ndarray):
            nonlocal steps
            nodes[path] = _log_softmax(node_logits)
            depth = len(path)
            children = sorted({ids[depth] for ids in self._candidates.values()
                               if len(ids) > depth + 1 and tuple(ids[:depth]) == path})
            for token in children:
                mark = await ticket.step(seq.mark, kind="decode")
                child = await ticket.step(seq.append, token, kind="decode")
                steps += 1
                await walk(path + (token,), child)
                await ticket.step(seq.rewind, mark, kind="decode")

        await walk((), logits)
        return nodes, steps

    async def _likelihood(self, ticket, seq: RewindableSequence, logits: np.ndarray) -> tuple[str, int]:
        """Every name's total log-probability (less its prior for a content-free question, when calibrated)."""
        nodes, steps = await self._trie_logps(ticket, seq, logits)
        scores = {}
        for name, ids in self._candidates.items():
            scores[name] = sum(float(nodes[tuple(ids[:d])][t] - (self._prior(tuple(ids[:d]))[t]
                                                                 if self.calibrate else 0.0))
                               for d, t in enumerate(ids))
        return max(scores, key=scores.get), steps

    async def _arguments(self, ticket, seq: RewindableSequence, name: str, spec: ToolSpec,
                         query_end: int) -> tuple[dict, int]:
        """The chosen name is written out, then `Args: {...}` under the tool's JSON schema."""
        if self._json is None:
            manifest = self.model.bundle.manifest
            self._json = JsonConstraintFactory(self.model.bundle.file(manifest["tokenizer"]["file"]),
                                               int(manifest["text"]["vocab_size"]),
                                               sorted(self.model.eos_token_ids))
        constraint = self._json.for_schema(json.dumps(spec.parameters))
        # The choice left the sequence at the end of the question plus the first tokens of the name (greedy);
        # the rest of the name, then the argument line's opening.
        name_ids = self._candidates[name]
        fed = seq.length - query_end
        logits, steps = None, 0
        for token in [*name_ids[fed:], *self.tokenizer.encode("Args:")]:
            logits = await ticket.step(seq.append, token, kind="decode")
            steps += 1
        out: list[int] = []
        for _ in range(MAX_ARGUMENT_TOKENS):
            token = int(np.argmax(constraint.mask(logits)))
            if token in self.model.eos_token_ids or token in self._newline:
                break
            constraint.advance(token)
            out.append(token)
            if constraint.is_complete() and self.tokenizer.decode(out).rstrip().endswith("}"):
                break
            logits = await ticket.step(seq.append, token, kind="decode")
            steps += 1
        try:
            value = json.loads(self.tokenizer.decode(out))
        except json.JSONDecodeError:
            value = {}
        return (value if isinstance(value, dict) else {}), steps
