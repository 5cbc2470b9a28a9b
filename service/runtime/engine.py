"""The generation engine: prompt building, chunked prefill and decode as scheduler steps, sampling, stop
strings, JSON-schema constraints, streaming detokenization, cancellation.

Every model call (vision encode, prefill chunk, decode step + sampling) is one step on the NPU scheduler, so
a higher-priority request overtakes at the next step boundary and a cancelled request stops within one step:
the coroutine checks for cancellation and the deadline before it submits each step, and an asyncio
cancellation (the gRPC client went away) lands while it awaits the step in flight.

Context policy: a prompt that leaves no room to generate is refused (InvalidRequestError naming the token
counts); otherwise generation is capped at the room left and ends with finish_reason "length" there.
Nothing is truncated silently.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog

from service.rpc_errors import InvalidRequestError, UnavailableError
from service.runtime import metrics
from service.runtime.constrained import JsonConstraint, JsonConstraintFactory, SchemaError
from service.runtime.conversations import Conversation
from service.runtime.decoding import IncrementalDetokenizer, StopStringFilter, Decoder
from service.runtime.frame_cache import FrameCache
from service.runtime.prompts import PrefixStates, Prompt, build_prompt
from service.runtime.sampling import Sampler
from service.runtime.scheduler import PRIORITIES, NpuScheduler, QueueFullError, Ticket

log = structlog.get_logger(__name__)

# describe_images(images) -> str, sync or async: the perception stage's words for images, used with
# text-only bundles. The default below says only what is known without perception.
DescribeImages = Callable[[Sequence[np.ndarray]], "str | asyncio.Future[str]"]


class ModelFailure(UnavailableError, RuntimeError):
    """A model step raised (a driver or session fault): this request fails, the engine keeps serving."""


@dataclass
class EngineConfig:
    # An answer on a cockpit screen is a few sentences: 160 tokens (~120 words) ends a runaway answer early.
    default_max_tokens: int = 160
    max_tokens_limit: int = 2048
    # A JSON answer may run past max_tokens by this much to close its value: a skill must get parseable JSON.
    json_extra_tokens: int = 128
    # Chosen on the faithful int4 transcode: with it SmolLM2-135M, its float weights and llama.cpp on the same GGUF
    # all answer capital-city questions right; "You are the in-car assistant. Answer briefly and factually." made
    # all three answer in French ("La femme au France...").
    system_prompt: str = "You are a helpful assistant in the car. Give short, factual answers in English."
    # Against degenerate loops of greedy small models ("cars, cars, cars"): the generated tokens' logits are
    # divided by this (multiplied when negative), as in CTRL / HF `repetition_penalty`; 1 turns it off.
    repetition_penalty: float = 1.15
    # No n-gram of generated tokens is produced twice (HF `no_repeat_ngram_size`); 0 turns it off.
    no_repeat_ngram: int = 4
    # System-prompt decoder states kept per loaded model (prefilled once, restored per request); 0 turns it off.
    prompt_cache_bytes: int = 64 * 1024 * 1024

    def validate(self) -> None:
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens: must be >= 1, got {self.default_max_tokens}")
        if self.max_tokens_limit < self.default_max_tokens:
            raise ValueError(f"max_tokens_limit: {self.max_tokens_limit} is below default_max_tokens "
                             f"{self.default_max_tokens}")
        if self.repetition_penalty < 1.0:
            raise ValueError(f"repetition_penalty: must be >= 1 (1 is off), got {self.repetition_penalty}")
        if self.no_repeat_ngram < 0 or self.no_repeat_ngram == 1:
            raise ValueError(f"no_repeat_ngram: must be 0 (off) or >= 2, got {self.no_repeat_ngram}")
        if self.json_extra_tokens < 0:
            raise ValueError(f"json_extra_tokens: must be >= 0, got {self.json_extra_tokens}")
        if self.prompt_cache_bytes < 0:
            raise ValueError(f"prompt_cache_bytes: must be >= 0, got {self.prompt_cache_bytes}")


@dataclass
class GenerationRequest:
    prompt: str
    images: Sequence[np.ndarray] = ()          # BGR frames
    system: str | None = None                  # None: the engine's system prompt
    max_tokens: int = 0                        # 0: the engine default
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: Sequence[str] = ()
    json_schema: str | None = None
    priority: str = "chat"
    deadline: float | None = None              # time.monotonic() instant
    is_cancelled: Callable[[], bool] | None = None
    request_id: str = ""
    ignore_eos: bool = False                   # benchmarks: always generate max_tokens (as vLLM's ignore_eos)
    conversation: Conversation | None = None   # a turn of this conversation (its history comes first)


@dataclass
class Timings:
    queue_s: float = 0.0
    preprocess_s: float = 0.0
    vision_encode_s: float = 0.0
    time_to_first_token_s: float = 0.0
    tokens_per_second: float = 0.0
    end_to_end_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_prompt_tokens: int = 0              # of prompt_tokens, restored from a kept decoder state


@dataclass
class TextDelta:
    text: str


@dataclass
class Done:
    text: str
    finish_reason: str                         # "stop" | "length" | "cancelled" | "deadline"
    timings: Timings = field(default_factory=Timings)


def default_describe_images(images: Sequence[np.ndarray]) -> str:
    """Without a perception stage the engine knows only that images came, and their sizes."""
    sizes = ", ".join(f"{img.shape[1]}x{img.shape[0]}" for img in images)
    count = "an image was" if len(images) == 1 else f"{len(images)} images were"
    return f"{count} provided ({sizes}) but no perception stage is configured"


class GenerationEngine:
    def __init__(self, model, vision, scheduler: NpuScheduler, *, config: EngineConfig | None = None,
                 describe_images: DescribeImages | None = None):
        self.model = model
        self.vision = vision
        self.scheduler = scheduler
        self.config = config or EngineConfig()
        self.config.validate()
        self.describe_images = describe_images or default_describe_images
        self.prefixes = PrefixStates(self.config.prompt_cache_bytes)
        self.frames = FrameCache()                 # a frame asked about twice is encoded once
        self.tokenizer = model.tokenizer
        self._eos = set(model.eos_token_ids)
        manifest = model.bundle.manifest
        tok_cfg = manifest["tokenizer"]
        self._image_token: str | None = tok_cfg.get("image_token")
        self._image_tokens_per_image = int(tok_cfg.get("image_tokens_per_image") or 0)
        self._json = JsonConstraintFactory(model.bundle.file(tok_cfg["file"]),
                                           int(manifest["text"]["vocab_size"]), sorted(self._eos))

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def backend(self) -> str:
        return self.model.backend

    # ---- public API ------------------------------------------------------------------------------
    async def complete(self, prompt: str, *, priority: str = "chat", max_tokens: int = 64,
                       json_schema: str | None = None, images: Sequence[np.ndarray] = (),
                       system: str | None = None) -> str:
        """The whole answer as one string (what skills call). With json_schema, the string parses as JSON."""
        request = GenerationRequest(prompt=prompt, priority=priority, max_tokens=max_tokens,
                                    json_schema=json_schema, images=images, system=system)
        done = None
        # Iterate to the end (no early return): the generator must exit its `async with` to free the slot.
        async for item in self.stream(request):
            if isinstance(item, Done):
                done = item
        if done is None:  # pragma: no cover - stream always ends with Done or raises
            raise RuntimeError("generation ended without a result")
        if json_schema:
            json.loads(done.text)  # guaranteed by the constraint; a failure here is a bug, not input
        return done.text

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Done]:
        started = time.monotonic()
        priority = request.priority
        if priority not in PRIORITIES:
            raise InvalidRequestError(f"priority: {priority!r} is not one of {', '.join(PRIORITIES)}")
        sampler, constraint = await self._sampling(request)
        outcome: str | None = "error"
        try:
            # Preprocessing runs before admission: queue time is pure waiting for the NPU.
            requested = request.max_tokens or self.config.default_max_tokens
            if requested > self.config.max_tokens_limit:
                raise InvalidRequestError(f"max_tokens: {requested} exceeds the limit {self.config.max_tokens_limit}")
            prompt, images_for_vision, preprocess_s = await self._prepare(request, requested)
            prompt_ids = prompt.ids
            timings = Timings(preprocess_s=preprocess_s, prompt_tokens=len(prompt_ids))
            metrics.PREPROCESS.labels(priority).observe(preprocess_s)
            room = self.model.context_length - len(prompt_ids)
            if room < 1:
                raise InvalidRequestError(
                    f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.model.context_length} "
                    f"tokens (at least one token must be left to generate)")
            budget = min(requested, room)
            hard_budget = min(budget + self.config.json_extra_tokens, room) if constraint else budget

            async with self.scheduler.admit(priority, request.request_id) as ticket:
                async for item in self._generate(request, ticket, prompt, images_for_vision, sampler,
                                                 constraint, budget, hard_budget, timings, started):
                    if isinstance(item, Done):
                        outcome = item.finish_reason
                    yield item
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except InvalidRequestError:
            outcome = "invalid"
            raise
        except QueueFullError:
            outcome = None  # the scheduler counts rejections itself
            raise
        except Exception as exc:
            # A model session that throws fails this request only; the scheduler and the sessions serve the next.
            log.exception("engine.model_failed", priority=priority)
            raise ModelFailure(f"the model failed while answering ({type(exc).__name__}: {exc}); "
                               f"the request was abandoned") from exc
        finally:
            if outcome is not None:
                metrics.REQUESTS.labels(priority, outcome).inc()
                metrics.REQUEST_DURATION.labels(priority).observe(time.monotonic() - started)

    # ---- internals -------------------------------------------------------------------------------
    async def _sampling(self, request: GenerationRequest) -> tuple[Sampler, JsonConstraint | None]:
        try:
            sampler = Sampler(temperature=request.temperature, top_p=request.top_p or 1.0,
                              top_k=request.top_k, seed=request.seed)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        if request.max_tokens < 0:
            raise InvalidRequestError(f"max_tokens: {request.max_tokens} must be >= 0")
        constraint = None
        if request.json_schema:
            try:
                constraint = await self._json.for_schema_async(request.json_schema)   # compiled off the loop
            except SchemaError as exc:
                raise InvalidRequestError(str(exc)) from exc
        return sampler, constraint

    async def _prepare(self, request: GenerationRequest, answer_room: int
                       ) -> tuple[Prompt, list[np.ndarray], float]:
        t0 = time.perf_counter()
        system = self.config.system_prompt if request.system is None else request.system
        if request.json_schema:
            system = (system + "\n" if system else "") + \
                f"Reply with JSON only, matching this JSON schema: {request.json_schema}"
        content = request.prompt
        images = list(request.images)
        for i, img in enumerate(images):
            if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise InvalidRequestError(f"images[{i}]: expected a BGR uint8 array [H, W, 3], got "
                                          f"{getattr(img, 'shape', type(img).__name__)}")
        for_vision: list[np.ndarray] = []
        if images and self.vision is not None:
            placeholder = (self._image_token or "") * self._image_tokens_per_image
            content = "".join(placeholder + "\n" for _ in images) + content
            for_vision = images
        elif images:
            if inspect.iscoroutinefunction(self.describe_images):
                description = await self.describe_images(images)
            else:  # a synchronous describer may be slow (models, OCR): keep it off the event loop
                description = await asyncio.to_thread(self.describe_images, images)
                if inspect.isawaitable(description):
                    description = await description
            # The question first: with the facts first SmolLM2-135M recited them and answered nothing else ("What
            # is the capital of France?" beside "1 person, 1 horse, 1 dog" -> "1. The cameras show a person...");
            # after the question it answers Paris and still describes the scene when asked about it.
            content = f"{content}\n\nWhat the cameras show: {description}"
        try:
            if request.conversation is not None:    # old turns dropped until the answer has its room
                prompt = request.conversation.prompt_for(
                    self.tokenizer, content, lambda n: self.model.context_length - n >= answer_room)
            else:
                prompt = build_prompt(self.tokenizer, system, content)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        return prompt, for_vision, time.perf_counter() - t0

    async def _sequence(self, ticket: Ticket, prompt: Prompt, image_embeds: list) -> tuple[object, int]:
        """A sequence over the prompt that starts from a kept decoder state where one fits: a conversation's
        history, or the system prompt's head (prefilled once per loaded model). Returns it and the tokens restored."""
        if not getattr(self.model, "shared_state", False):     # this bundle's graphs cannot restore state
            return self.model.new_sequence(prompt.ids, image_embeds), 0
        state = prompt.history
        if state is not None and state.model_key != self.model.state_key:
            state = None          # made by the bundle before a swap: this model prefills the history itself
            metrics.CONVERSATION_REPREFILLS.labels("swapped").inc()
        if state is None and prompt.head_len and self.config.prompt_cache_bytes:
            head = tuple(prompt.ids[:prompt.head_len])
            state = self.prefixes.get(head)
            if state is None:
                state = await ticket.step(self._prefilled_state, list(head), kind="prefill")
                self.prefixes.put(state)
        return self.model.new_sequence(prompt.ids, image_embeds, prefix=state), state.length if state else 0

    def _prefilled_state(self, ids: list[int]):
        seq = self.model.new_sequence(ids)
        while not seq.prefill_step():
            pass
        return seq.snapshot()

    def _stop_reason(self, request: GenerationRequest) -> str | None:
        if request.is_cancelled is not None and request.is_cancelled():
            return "cancelled"
        if request.deadline is not None and time.monotonic() >= request.deadline:
            return "deadline"
        return None

    async def _generate(self, request: GenerationRequest, ticket: Ticket, prompt: Prompt,
                        images: list[np.ndarray], sampler: Sampler, constraint: JsonConstraint | None,
                        budget: int, hard_budget: int, timings: Timings, started: float
                        ) -> AsyncIterator[TextDelta | Done]:
        priority = request.priority
        prompt_ids = prompt.ids
        text_parts: list[str] = []
        generated_ids: list[int] = []
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopStringFilter(request.stop)
        generated = 0
        first_token_at = last_token_at = None

        def finish(reason: str) -> Done:
            now = time.monotonic()
            timings.queue_s = ticket.queue_seconds
            timings.generated_tokens = generated
            timings.end_to_end_s = now - started
            if first_token_at is not None and last_token_at is not None and generated > 1:
                timings.tokens_per_second = (generated - 1) / max(last_token_at - first_token_at, 1e-9)
            return Done("".join(text_parts), reason, timings)

        image_embeds = []
        for img in images:
            if (reason := self._stop_reason(request)):
                yield finish(reason)
                return
            encoded: list[np.ndarray] = []

            def encode(image, encoded=encoded):
                encoded.append(image)
                return self.vision.encode(image)
            embeds = await ticket.step(self.frames.get_or_compute, "vision_encode", img, encode, kind="vision")
            image_embeds.append(embeds)
            if encoded:                            # not reused from an earlier question about this frame
                timings.preprocess_s += self.vision.preprocess_seconds
                timings.vision_encode_s += self.vision.encode_seconds
                metrics.VISION_ENCODE.observe(self.vision.encode_seconds)

        seq, timings.cached_prompt_tokens = await self._sequence(ticket, prompt, image_embeds)
        decoder = Decoder(seq, sampler, constraint, self._eos, request.ignore_eos and constraint is None,
                           self.config.repetition_penalty, self.config.no_repeat_ngram)
        token = None
        while token is None:
            if (reason := self._stop_reason(request)):
                yield finish(reason)
                return
            token = await ticket.step(decoder.prefill, kind="prefill")
        metrics.PROMPT_TOKENS.labels(priority).inc(len(prompt_ids))
        reason = None
        ahead: asyncio.Future | None = None
        try:
            while True:
                now = time.monotonic()
                if token in self._eos:
                    reason = "stop"
                    break
                generated += 1
                generated_ids.append(token)
                if constraint is None and generated < budget and not self._stop_reason(request):
                    # Run ahead: the next decode step goes to the NPU now and overlaps this token's
                    # detokenization and delivery; dropped (never started, or at most the one in flight)
                    # if this token ends the answer or the request is cancelled. Not with a JSON constraint:
                    # its matcher must not be read here while the executor advances it.
                    ahead = ticket.submit(decoder.decode, token, kind="decode")
                metrics.GENERATION_TOKENS.labels(priority).inc()
                if first_token_at is None:
                    first_token_at = now
                    timings.time_to_first_token_s = now - started
                    metrics.TIME_TO_FIRST_TOKEN.labels(priority).observe(now - started)
                else:
                    metrics.INTER_TOKEN_LATENCY.labels(priority).observe(now - last_token_at)
                last_token_at = now
                piece = stops.feed(detok.push(token))
                if piece:
                    text_parts.append(piece)
                    yield TextDelta(piece)
                if stops.stopped:
                    reason = "stop"
                    break
                if generated >= budget:
                    if constraint is None or constraint.is_complete():
                        reason = "length"
                        break
                    if generated >= hard_budget:
                        raise InvalidRequestError(
                            f"the JSON answer did not complete within {hard_budget} tokens; raise max_tokens "
                            f"or simplify the schema")
                    decoder.force_greedy = True  # closing the JSON value: no more exploration
                if (reason := self._stop_reason(request)):
                    break
                if ahead is None:
                    ahead = ticket.submit(decoder.decode, token, kind="decode")
                token, ahead = await ahead, None
        finally:
            if ahead is not None:
                ahead.cancel()
        tail = ""
        if not stops.stopped:
            tail = stops.feed(detok.flush())
            if not stops.stopped:
                tail += stops.flush()
        if tail:
            text_parts.append(tail)
            yield TextDelta(tail)
        if request.conversation is not None and reason in ("stop", "length"):
            # The cache holds the turn (after any step still in flight): kept, the next turn prefills only itself.
            state = await ticket.step(seq.snapshot, kind="snapshot") if hasattr(seq, "snapshot") else None
            request.conversation.close_turn(self.tokenizer, prompt, generated_ids, "".join(text_parts), state,
                                            self.model.eos_token_ids[0])
        yield finish(reason)
