"""System prompts prefilled once per loaded model; conversations that prefill only their new turn; both give
the same tokens as prefilling everything (the restored state is the state)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from service.runtime.conversations import ConversationConfig, ConversationNotFound, ConversationStore
from service.runtime.engine import Done, EngineConfig, GenerationEngine, GenerationRequest, InvalidRequestError
from service.runtime.prompts import build_prompt
from service.runtime.scheduler import NpuScheduler
from service.runtime.shared_sequence import CacheSlots
from tests.runtime.serving_support import language_model

QUESTION = "What is the capital of France?"


def engine_with(**config) -> GenerationEngine:
    return GenerationEngine(language_model(), None, NpuScheduler(), config=EngineConfig(**config))


async def answer(engine, request: GenerationRequest) -> Done:
    done = None
    async for item in engine.stream(request):
        if isinstance(item, Done):
            done = item
    return done


async def test_system_prompt_is_prefilled_once_and_changes_nothing():
    cached, uncached = engine_with(), engine_with(prompt_cache_bytes=0)
    first = await answer(cached, GenerationRequest(QUESTION, max_tokens=12))
    assert first.timings.cached_prompt_tokens > 0 and len(cached.prefixes) == 1       # made on the first use
    again = await answer(cached, GenerationRequest("What is the capital of Italy?", max_tokens=12))
    assert again.timings.cached_prompt_tokens == first.timings.cached_prompt_tokens  # restored, not refilled
    plain = await answer(uncached, GenerationRequest("What is the capital of Italy?", max_tokens=12))
    assert plain.timings.cached_prompt_tokens == 0
    assert again.text == plain.text and "Rome" in again.text            # same tokens either way
    other = await answer(cached, GenerationRequest(QUESTION, system="You answer in one word.", max_tokens=4))
    assert other.timings.cached_prompt_tokens > 0 and len(cached.prefixes) == 2       # one state per system prompt


async def test_a_conversation_prefills_only_its_new_turn_and_remembers():
    engine = engine_with()
    store = ConversationStore()
    talk = store.start(engine.config.system_prompt)
    turns = ["My name is Ana and my car is a red hatchback.", "What colour is my car?", "What is my name?"]
    dones = []
    for text in turns:
        dones.append(await answer(engine, GenerationRequest(text, max_tokens=24, conversation=talk)))
        store.kept(talk)
    assert talk.turns == 3 and [m["role"] for m in talk.messages] == ["user", "assistant"] * 3
    # The first turn starts from the system prompt's cached head, as a single Ask does.
    assert dones[0].timings.cached_prompt_tokens > 0 and len(engine.prefixes) == 1
    for previous, done in zip(dones, dones[1:]):
        # Everything before the new user turn came from the kept state: the history grows, the prefill does not.
        assert done.timings.cached_prompt_tokens >= previous.timings.prompt_tokens
        assert done.timings.prompt_tokens - done.timings.cached_prompt_tokens < 40
    assert "red" in dones[1].text.lower()
    assert "ana" in dones[2].text.lower()

    # The same history prefilled from scratch gives the same answer: the restored state is exact.
    fresh = store.start(engine.config.system_prompt)
    fresh.messages = [dict(m) for m in talk.messages[:4]]
    replay = await answer(engine, GenerationRequest(turns[2], max_tokens=24, conversation=fresh))
    assert replay.timings.cached_prompt_tokens == 0 and replay.text == dones[2].text


async def test_memory_and_context_policies():
    engine = engine_with()
    store = ConversationStore(ConversationConfig(max_sessions=2, max_state_bytes=1))
    a, b = store.start(""), store.start("")
    await answer(engine, GenerationRequest("Hello.", max_tokens=4, conversation=a))
    store.kept(a)
    await answer(engine, GenerationRequest("Hi.", max_tokens=4, conversation=b))
    store.kept(b)
    assert a.state is None and a.pending_reprefill == "evicted" and b.state is not None   # LRU state dropped
    again = await answer(engine, GenerationRequest("And again?", max_tokens=4, conversation=a))
    assert again.timings.cached_prompt_tokens == 0 and a.turns == 2                          # re-prefilled, kept going
    store.start("")                                                                           # a third: a ends
    with pytest.raises(ConversationNotFound, match="least recently used"):
        store.get(a.session_id)

    long = store.start("")
    for i in range(6):
        await answer(engine, GenerationRequest(f"Tell me fact number {i} about cars. " * 12, max_tokens=8,
                                               conversation=long))
    context = engine.model.context_length
    with pytest.raises(InvalidRequestError, match="does not fit"):
        await answer(engine, GenerationRequest("word " * context, max_tokens=8, conversation=long))
    squeezed = await answer(engine, GenerationRequest("Last question?", max_tokens=context - 300, conversation=long))
    assert squeezed.timings.prompt_tokens <= 300 and long.turns == 7    # old turns dropped to leave the room


async def test_a_conversation_outlives_a_bundle_swap():
    """A state made by the bundle before a swap does not fit the new one: the history is prefilled, not lost."""
    engine = engine_with()
    store = ConversationStore()
    talk = store.start(engine.config.system_prompt)
    await answer(engine, GenerationRequest("My car is red.", max_tokens=8, conversation=talk))
    talk.state = dataclasses.replace(talk.state, model_key=("another bundle", "int4"))
    done = await answer(engine, GenerationRequest("What colour is my car?", max_tokens=16, conversation=talk))
    assert done.finish_reason in ("stop", "length") and done.timings.cached_prompt_tokens < 20   # system head only
    assert talk.turns == 2 and talk.state.model_key == engine.model.state_key


@pytest.mark.parametrize("content", ["Is the boot open?", " \n\nleading blank lines", "x"])
def test_the_cached_head_ends_where_the_users_text_begins(content):
    """The head is the template up to the user's text (system turn and the user turn's opening), and only when the
    prompt's own tokenization begins with it: a restored head always holds exactly the prompt's first ids."""
    tok = language_model().tokenizer
    system = EngineConfig().system_prompt
    prompt = build_prompt(tok, system, content)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": content}]
    assert prompt.ids == tok.encode(tok.apply_chat_template(messages))
    head_text = tok.apply_chat_template(messages[:1], add_generation_prompt=False) + "<|im_start|>user\n"
    assert prompt.ids[:prompt.head_len] == tok.encode(head_text)
    plain = build_prompt(tok, "", content)         # the template's own default system turn is a head too
    assert plain.head_len > 0 and plain.ids == tok.encode(tok.apply_chat_template(messages[1:]))


def test_a_dropped_sequence_lends_its_buffers_to_the_next_unchanged():
    """Cache buffers are reused unzeroed: what an earlier, longer sequence left there changes nothing."""
    model = language_model()
    tok = model.tokenizer
    long_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me about cars. " * 20}]))
    short_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTION}]))

    def first_logits(seq):
        while not seq.prefill_step():
            pass
        seq.append(int(np.argmax(seq.logits)))
        return seq.logits.copy()

    old = model.new_sequence(long_ids)
    first_logits(old)
    slot = old._slot
    del old                                        # its buffers go back to the model's free slots
    reused = model.new_sequence(short_ids)
    assert reused._slot is slot
    got = first_logits(reused)
    model.cache_slots = CacheSlots(model._graphs["decoder_decode"].session, model._graphs["decoder_decode"].entry[
        "state"], model.vocab_size, model.hidden_size, model.context_length)
    try:
        fresh = model.new_sequence(short_ids)
        assert fresh._slot is not slot
        np.testing.assert_array_equal(got, first_logits(fresh))
    finally:
        model.cache_slots.give(slot)
