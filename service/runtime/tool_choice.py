"""The model chooses the tool: the question's last hidden state goes through a routing head trained on examples.

Mode `head` (the default): the fixed prefix, the chat template's system turn listing every tool's one-line
description, is prefilled once when the chooser is prepared; a question then costs one chunked prefill of its
own ~15 tokens (the user turn and the assistant turn's opening). The decoder's last hidden state there
(recovered from the logits: `routing_head.HiddenState`) goes through a softmax-regression head trained at
prepare time on the registry's examples, "none" being one of its classes (`routing_head.RoutingHead`).
`mode="nearest"` takes the tool of the nearest example (cosine) over the same vectors instead. `mode="greedy"`
and `mode="likelihood"` decode or score the tools' names after a few-shot prompt: only tokens that continue
some tool's name (or "none") are allowed, as an llguidance enum grammar would allow (worse on SmolLM2-135M:
bench/route.py has the figures of every mode).
Arguments (a name to enrol, a clip count) are then decoded with the llguidance JSON-schema constraint; the
tool's name, `Args:` and the tokens the grammar forces (`{"name`) go in as one chunk, not one step each.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import zip_longest
from dataclasses import dataclass

import numpy as np
import structlog

from service.runtime.constrained import JsonConstraintFactory
from service.runtime.rewindable import RewindableSequence
from service.runtime.routing_head import HiddenState, RoutingHead
from service.runtime.scheduler import NpuScheduler
from service.runtime.tooling import NONE, ToolCall, ToolSpec

log = structlog.get_logger(__name__)

MODES = ("head", "nearest", "greedy", "likelihood")
REPRESENTED = ("head", "nearest")        # the modes that classify the question's hidden state
MAX_ARGUMENT_TOKENS = 32
# `prior`: the log-score bonus of the tool a caller's prior names (the keyword router's choice, when the
# Assistant is configured with `keyword_prior`); 4 was the best of 0..10 in 5-fold cross-validation on the
# training examples (bench/route.py), not chosen on the evaluation set.
PRIOR_WEIGHT = 4.0
FEW_SHOT_PER_TOOL = 3                    # greedy/likelihood: the first examples of each tool make the prompt
CONTENT_FREE = "N/A"
CHAT_SYSTEM = "You are the in-car assistant. Pick the car tool for the driver's request, or none."
NONE_DESCRIPTION = ("anything else: navigation, charging stations, restaurants, music, alarm clocks, weather, "
                    "phone calls, general knowledge")

@dataclass
class Choice:
    call: ToolCall
    seconds: float
    steps: int
    confidence: float | None = None      # the head's probability of its choice (mode "head")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    top = float(np.max(logits))
    return logits - top - np.log(np.sum(np.exp(logits - top)))


class ToolChooser:
    def __init__(self, model, scheduler: NpuScheduler, specs: Sequence[ToolSpec],
                 examples: Sequence[tuple[str, str, dict]], *, mode: str = "head", priority: str = "chat",
                 calibrate: bool = False, prior: Callable[[str], str | None] | None = None,
                 prior_weight: float = PRIOR_WEIGHT):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        self.model, self.scheduler, self.mode, self.priority = model, scheduler, mode, priority
        self.calibrate = calibrate
        if prior is not None and mode != "head":
            raise ValueError(f"prior: only mode 'head' weighs a prior, not {mode!r}")
        self.prior, self.prior_weight = prior, prior_weight
        self._priors: dict[tuple[int, ...], np.ndarray] = {}
        self.specs = {s.name: s for s in specs}
        self.tokenizer = model.tokenizer
        self.examples = list(examples)
        self.names = [*self.specs, NONE]
        unknown = sorted({name for _, name, _ in self.examples} - set(self.names))
        if unknown:
            raise ValueError(f"examples: unknown tools {unknown}")
        self.system = "\n".join([CHAT_SYSTEM, "Tools:", *(f"- {s.name}: {s.description}" for s in specs),
                                 f"- {NONE}: {NONE_DESCRIPTION}"])
        self.prefix = self._chat_prefix() if mode in REPRESENTED else self._prefix_text(specs, self._few_shot())
        self._hidden: HiddenState | None = None
        self._head: RoutingHead | None = None
        self._vectors: np.ndarray | None = None      # one unit vector per example (mode "nearest")
        self._candidates = {name: self.tokenizer.encode(f" {name}\n") for name in self.names}
        self._newline = self.tokenizer.encode("\n")
        self._json: JsonConstraintFactory | None = None
        self._argument_contexts: dict[str, tuple[RewindableSequence, object]] = {}
        self._seq: RewindableSequence | None = None
        self._base = None
        self._lock = asyncio.Lock()

    def _few_shot(self) -> list[tuple[str, str, dict]]:
        taken: Counter[str] = Counter()
        shots = []
        for example in self.examples:
            if taken[example[1]] < FEW_SHOT_PER_TOOL:
                taken[example[1]] += 1
                shots.append(example)
        return shots

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

    @property
    def training_accuracy(self) -> float | None:
        return self._head.training_accuracy if self._head is not None else None

    async def prepare(self) -> None:
        """Prefill the fixed prefix once and, for the head, learn from every example: one short prefill each,
        each its own admission, so a chat waits for at most one of them (seconds in all on a CPU; the server
        does it in the background)."""
        async with self._lock:
            if self._seq is not None:
                return
            ids = self.tokenizer.encode(self.prefix)
            async with self.scheduler.admit(self.priority) as ticket:
                seq = await ticket.step(RewindableSequence, self.model, ids, kind="prefill")
                while not await ticket.step(seq.prefill_step, kind="prefill"):
                    pass
                base = await ticket.step(seq.mark, kind="prefill")
                if self.calibrate:
                    # Contextual calibration: the names' log-probabilities for a content-free question are
                    # the prompt's own bias (a small model favours some names whatever is asked); choices
                    # subtract them.
                    logits = await ticket.step(seq.logits, kind="prefill")
                    for token in self.tokenizer.encode(f"Q: {CONTENT_FREE}\nA:", add_bos=False):
                        logits = await ticket.step(seq.append, token, kind="prefill")
                    self._priors, _ = await self._trie_logps(ticket, seq, logits)
            if self.mode in REPRESENTED:
                await self._learn(seq, base)
            for spec in self.specs.values():
                if spec.takes_arguments:
                    async with self.scheduler.admit(self.priority) as ticket:
                        self._argument_contexts[spec.name] = await self._argument_context(ticket, seq, spec)
            self._seq, self._base = seq, base
            log.info("tool_choice.ready", prefix_tokens=len(ids), tools=len(self.specs), mode=self.mode,
                     examples=len(self.examples), training_accuracy=self.training_accuracy)

    async def _learn(self, seq: RewindableSequence, base) -> None:
        hidden = await asyncio.to_thread(HiddenState.of_model, self.model)
        raw = []
        for question, _, _ in self.examples:
            async with self.scheduler.admit(self.priority) as ticket:
                logits = await ticket.step(seq.feed, self._query(" ".join(question.split())), base,
                                           kind="prefill")
            raw.append(hidden.raw(logits))
        hidden.fit(np.stack(raw))
        features = hidden.features(np.stack(raw))
        if self.mode == "head":
            labels = [name for _, name, _ in self.examples]
            self._head = await asyncio.to_thread(RoutingHead, features, labels)
        self._vectors = features        # kept for "nearest", and for bench/route.py's cross-validation
        self._hidden = hidden

    @property
    def example_vectors(self) -> np.ndarray | None:
        """The examples' feature vectors, in order (once prepared, modes head and nearest)."""
        return self._vectors

    async def choose(self, question: str) -> Choice:
        await self.prepare()
        started = time.perf_counter()
        question = " ".join(question.split())
        query = self._query(question)
        confidence = None
        async with self._lock:
            seq = self._seq
            async with self.scheduler.admit(self.priority) as ticket:
                # Every question starts from the prefix's mark (`feed`): nothing to rewind afterwards.
                logits = await ticket.step(seq.feed, query, self._base, kind="prefill")
                steps = 1
                if self.mode in REPRESENTED:
                    features = self._hidden.features(self._hidden.raw(logits))
                    if self.mode == "head":
                        name, confidence = self._weigh(self._head.probabilities(features), question)
                    else:
                        name = self.examples[int(np.argmax(self._vectors @ features))][1]
                    used = 0
                elif self.mode == "greedy":
                    name, used = await self._greedy(ticket, seq, logits)
                else:
                    name, used = await self._likelihood(ticket, seq, logits)
                steps += used
                arguments = {}
                spec = self.specs.get(name)
                if spec is not None and spec.takes_arguments:
                    arguments, used = await self._arguments(ticket, spec, question)
                    steps += used
        return Choice(ToolCall(name, arguments, "model"), time.perf_counter() - started, steps, confidence)

    def _weigh(self, probabilities: dict[str, float], question: str) -> tuple[str, float]:
        """The head's choice, with the prior's tool (if any, and not "none") raised by `prior_weight` in log
        space; the confidence stays the head's own probability of the choice."""
        named = self.prior(question) if self.prior is not None else None
        scores = {n: np.log(max(p, 1e-12)) + (self.prior_weight if n == named and n != NONE else 0.0)
                  for n, p in probabilities.items()}
        name = max(scores, key=scores.get)
        return name, probabilities[name]

    def _chat(self, question: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "system", "content": self.system},
                                                   {"role": "user", "content": question}])

    def _chat_prefix(self) -> str:
        """The chat template's text before the question (the same for every question)."""
        a, b = self._chat("a"), self._chat("b")
        return a[:next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)]

    def _query(self, question: str) -> list[int]:
        if self.mode in REPRESENTED:
            return self.tokenizer.encode(self._chat(question)[len(self.prefix):], add_bos=False)
        return self.tokenizer.encode(f"Q: {question}\nA:", add_bos=False)

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

    def _argument_prompt(self, spec: ToolSpec) -> str:
        """A few-shot prompt of the tool's own examples (with `{}` where they give no argument). No space after
        `Args:`: the JSON's first token is then `{"` both here and under the constraint."""
        given = [(q, a) for q, name, a in self.examples if name == spec.name and a]
        plain = [(q, a) for q, name, a in self.examples if name == spec.name and not a][:max(len(given), 1)]
        # As many without arguments as with, alternating: a run of `{}` would teach the model to write only that.
        shots = [s for pair in zip_longest(given, plain) for s in pair if s is not None]
        lines = [f"Write the arguments of {spec.name} ({spec.description}) as JSON.", ""]
        for question, args in shots:
            lines += [f"Request: {question}", "Args:" + json.dumps(args, separators=(",", ":"))]
        return "\n".join(lines) + "\n"

    async def _argument_context(self, ticket, seq: RewindableSequence, spec: ToolSpec):
        """The tool's argument prompt, prefilled once. Where the graph restores state its mark serves on the
        chooser's one sequence (a feed starts from any mark); otherwise it keeps a sequence of its own."""
        ids = self.tokenizer.encode(self._argument_prompt(spec))
        own = await ticket.step(RewindableSequence, self.model, ids, kind="prefill")
        while not await ticket.step(own.prefill_step, kind="prefill"):
            pass
        return (seq if own.snapshots else own), await ticket.step(own.mark, kind="prefill")

    async def _arguments(self, ticket, spec: ToolSpec, question: str) -> tuple[dict, int]:
        """`Request: <question>` after the tool's argument prompt, then `Args: {...}` under its JSON schema;
        the question, `Args:` and what the grammar forces (`{"name`) go in as one chunk."""
        if self._json is None:
            manifest = self.model.bundle.manifest
            self._json = JsonConstraintFactory(self.model.bundle.file(manifest["tokenizer"]["file"]),
                                               int(manifest["text"]["vocab_size"]),
                                               sorted(self.model.eos_token_ids))
        constraint = self._json.for_schema(json.dumps(spec.parameters))
        seq, mark = self._argument_contexts[spec.name]
        out = constraint.forced()
        lead = self.tokenizer.encode(f"Request: {question}\nArgs:", add_bos=False)
        logits = await ticket.step(seq.feed, [*lead, *out], mark, kind="decode")
        steps = 1
        for _ in range(MAX_ARGUMENT_TOKENS):
            token = int(np.argmax(constraint.mask(logits)))
            if token in self.model.eos_token_ids or token in self._newline:
                break
            constraint.advance(token)
            forced = constraint.forced()
            out += [token, *forced]
            if constraint.is_complete() and self.tokenizer.decode(out).rstrip().endswith("}"):
                break
            logits = await ticket.step(seq.extend, [token, *forced], kind="decode")
            steps += 1
        try:
            value = json.loads(self.tokenizer.decode(out))
        except json.JSONDecodeError:
            value = {}
        return (value if isinstance(value, dict) else {}), steps
