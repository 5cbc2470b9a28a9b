"""Pieces of bench/decode.py: the bare session.run loop, llama.cpp drivers, greedy agreement, the cached-prompt
time to first token through the engine, and multi-turn time to first token at the generator level."""
from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np

from service.runtime.prompts import build_prompt

# Greedy agreement prompts (chat questions a cockpit assistant gets, and general ones): 16, since a median over 8
# near-tie-prone continuations moved by several tokens from one prompt's flip.
AGREEMENT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for driving safely in the rain.",
    "Explain what a hybrid car is in two sentences.",
    "What should I do if my tyre pressure warning comes on?",
    "Write a short poem about a long road trip.",
    "How far is the Moon from the Earth?",
    "Why do cars need oil changes?",
    "Name three famous painters and one painting by each.",
    "What is the capital of Italy?",
    "How do I turn on the windscreen wipers?",
    "Tell me a fun fact about electric cars.",
    "What does the check engine light mean?",
    "Suggest a good song for a morning drive.",
    "How can I save fuel on the motorway?",
    "What is the boiling point of water?",
    "Explain how a seat belt protects you in a crash.",
)
CONVERSATION = (
    "Hi! I am planning a drive from Munich to Vienna tomorrow.",
    "How long will it take, roughly?",
    "Should I take a break on the way?",
    "What snacks are good to bring?",
    "Thanks. Any tip for driving at night?",
)


def ban(logits: np.ndarray, eos: np.ndarray) -> int:
    logits = np.array(logits, np.float32)
    logits[eos] = -np.inf
    return int(np.argmax(logits))


class BareLoop:
    """The shared-state graph driven by plain `session.run` (numpy feeds and fresh outputs, no IO binding)."""

    def __init__(self, model):
        self.model = model
        graph = model._graphs["decoder_decode"]
        if graph.mode != "shared":
            raise SystemExit(f"the bare loop drives shared-state variants; {model.variant} is {graph.mode}")
        self.session, self.state = graph.session, graph.entry["state"]

    def run(self, prompt_ids: list[int], tokens: int, eos: np.ndarray) -> tuple[float, float, list[int]]:
        m = self.model
        t0 = time.perf_counter()
        cap = -(-(len(prompt_ids) + tokens + 1) // 256) * 256
        cache = {}
        for s in self.state:
            shape = list(s["shape"])
            shape[2] = cap
            cache[s["input"]] = np.zeros(shape, np.float32)
        outputs = ["logits"] + [s["output"] for s in self.state]
        done = 0
        for c in range(0, len(prompt_ids), m.prefill_chunk):
            chunk = prompt_ids[c:c + m.prefill_chunk]
            logits = self._step(m.embed(chunk)[None], done, cache, outputs)
            done += len(chunk)
        token = ban(logits, eos)
        ttft = time.perf_counter() - t0
        generated = [token]
        t1 = time.perf_counter()
        for _ in range(tokens - 1):
            logits = self._step(m.embed([token])[None], done, cache, outputs)
            done += 1
            token = ban(logits, eos)
            generated.append(token)
        return ttft, (tokens - 1) / (time.perf_counter() - t1), generated

    def _step(self, embeds, start, cache, outputs):
        n = embeds.shape[1]
        feeds = {"inputs_embeds": embeds.astype(np.float32), "seqlens_k": np.array([start + n - 1], np.int32),
                 "total_sequence_length": np.array(start + n, np.int32), **cache}
        result = self.session.run(outputs, feeds)
        for s, out in zip(self.state, result[1:]):
            cache[s["input"]] = out                 # a fresh array each step: the copy IO binding avoids
        return result[0][0, -1]


def generator_loop(model, prompt_ids: list[int], tokens: int, eos: np.ndarray,
                   clock=time.perf_counter) -> tuple[float, float, list[int]]:
    """The generator's own path (IO binding, in-place caches), nothing of the engine around it."""
    t0 = clock()
    seq = model.new_sequence(prompt_ids)
    while not seq.prefill_step():
        pass
    token = ban(seq.logits, eos)
    ttft = clock() - t0
    generated = [token]
    t1 = clock()
    for _ in range(tokens - 1):
        seq.append(token)
        token = ban(seq.logits, eos)
        generated.append(token)
    return ttft, (tokens - 1) / (clock() - t1), generated


def llama_run(llm, prompt_ids: list[int], tokens: int, eos: np.ndarray,
              clock=time.perf_counter) -> tuple[float, float, list[int]]:
    """llama.cpp from the same token ids: whole prompt every run (no prefix reuse), greedy, EOS banned."""
    llm.reset()
    t0 = clock()
    llm.eval(prompt_ids)
    token = ban(llm.scores[llm.n_tokens - 1], eos)
    ttft = clock() - t0
    generated = [token]
    t1 = clock()
    for _ in range(tokens - 1):
        llm.eval([token])
        token = ban(llm.scores[llm.n_tokens - 1], eos)
        generated.append(token)
    return ttft, (tokens - 1) / (clock() - t1), generated


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def greedy_agreement(models: dict, llm, tokenizer, eos: np.ndarray, tokens: int = 48,
                     prompts: tuple[str, ...] = AGREEMENT_PROMPTS) -> dict[str, list[int]]:
    """Per variant: common prefix (tokens) of its greedy continuation and llama.cpp's, per prompt."""
    out: dict[str, list[int]] = {name: [] for name in models}
    for prompt in prompts:
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
        reference = llama_run(llm, ids, tokens, eos)[2]
        for name, model in models.items():
            out[name].append(common_prefix(generator_loop(model, ids, tokens, eos)[2], reference))
    return out


def cached_prefix_ttft(model, question: str, repeats: int = 7) -> dict:
    """Time to first token of a short question through the engine (chat template, tokenization, admission, the
    scheduler's executor thread and back to the event loop: the request path), with the system prompt's state
    restored from the prompt cache and, alternately, with the cache off (whole prompt prefilled); medians. Also the
    generator alone restoring the same state and prefilling the same suffix (what the engine adds is the rest), and
    the CPU seconds a cached request costs (all threads; one token, so about its TTFT's work)."""
    from service.runtime.engine import Done, EngineConfig, GenerationEngine, GenerationRequest
    from service.runtime.scheduler import NpuScheduler

    scheduler = NpuScheduler()
    engines = {True: GenerationEngine(model, None, scheduler),
               False: GenerationEngine(model, None, scheduler, config=EngineConfig(prompt_cache_bytes=0))}

    async def ask(engine):
        done = None
        async for item in engine.stream(GenerationRequest(question, max_tokens=1)):
            if isinstance(item, Done):
                done = item
        return done.timings

    loop = asyncio.new_event_loop()
    try:
        first = loop.run_until_complete(ask(engines[True]))          # prefills the system prompt, keeps its state
        runs, cpu = {True: [], False: []}, []
        for _ in range(repeats):
            for cached in (True, False):
                c0 = time.process_time()
                runs[cached].append(loop.run_until_complete(ask(engines[cached])))
                if cached:          # every thread of this process: the request's own CPU work, whatever the load
                    cpu.append(time.process_time() - c0)
    finally:
        scheduler.close()
        loop.close()
    (head, state), = engines[True].prefixes._states.items()
    ids = build_prompt(model.tokenizer, engines[True].config.system_prompt, question).ids
    bare = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        seq = model.new_sequence(ids, prefix=state)
        while not seq.prefill_step():
            pass
        int(np.argmax(seq.logits))
        bare.append(time.perf_counter() - t0)
    last = runs[True][-1]
    assert last.cached_prompt_tokens == len(head) == first.cached_prompt_tokens and ids[:len(head)] == list(head)
    return {"cached": statistics.median(t.time_to_first_token_s for t in runs[True]),
            "uncached": statistics.median(t.time_to_first_token_s for t in runs[False]),
            "generator": statistics.median(bare), "cpu": statistics.median(cpu),
            "cached_tokens": last.cached_prompt_tokens,
            "prefilled_tokens": last.prompt_tokens - last.cached_prompt_tokens}


def multi_turn_ttft(model, system: str, reply_tokens: int = 32) -> list[float]:
    """TTFT of each turn of CONVERSATION when every turn starts from the previous turn's snapshot (only the new
    user turn is prefilled); turn 1 starts from the cached system prompt."""
    tok = model.tokenizer
    eos = model.eos_token_ids
    messages = [{"role": "system", "content": system}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    seq = model.new_sequence(tok.encode(text))
    while not seq.prefill_step():
        pass
    state, ttfts = seq.snapshot(), []
    for user in CONVERSATION:
        messages.append({"role": "user", "content": user})
        full = tok.apply_chat_template(messages)
        if not full.startswith(text):
            raise SystemExit("the chat template re-renders earlier turns; per-turn state cannot be reused")
        ids = list(state.tokens) + tok.encode(full[len(text):])
        t0 = time.perf_counter()
        seq = model.new_sequence(ids, prefix=state)
        while not seq.prefill_step():
            pass
        token = int(np.argmax(seq.logits))
        ttfts.append(time.perf_counter() - t0)
        reply = []
        while token not in eos and len(reply) < reply_tokens:
            reply.append(token)
            seq.append(token)
            token = int(np.argmax(seq.logits))
        seq.append(eos[0])                            # the end-of-turn token closes the assistant turn in the cache
        answer = tok.decode(reply)
        messages.append({"role": "assistant", "content": answer})
        text = full + answer + tok.decode([eos[0]], skip_special_tokens=False)
        state = seq.snapshot()
    return ttfts
