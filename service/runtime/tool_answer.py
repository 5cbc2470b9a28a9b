"""A question answered through a tool: the model chooses (keywords while no model is loaded), the tool runs
for the caller's role, and the model words the result, kept only when its words hold every fact and add none.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from service.runtime.tool_choice import ToolChooser
from service.runtime.tooling import NONE, ToolCall, ToolRefused, ToolRegistry, ToolResult, dropped, ungrounded

log = structlog.get_logger(__name__)

WORDING_SYSTEM = ("You are the in-car assistant. Answer the driver's question in one or two short sentences, "
                  "using only the tool result. Keep every name, number and time exactly as written.")
WORDING_MAX_TOKENS = 64


@dataclass
class Answered:
    call: ToolCall
    skill: str
    result: ToolResult | None = None
    text: str = ""
    refused: ToolRefused | None = None


class ToolAnswerer:
    def __init__(self, registry: ToolRegistry, config):
        self.registry = registry
        self.config = config
        self.engine = None
        self.chooser: ToolChooser | None = None
        self._ready = False
        self._preparing: asyncio.Task | None = None

    def use(self, engine) -> None:
        """A loaded engine (None: no model): the model chooses once its tool prefix is prefilled."""
        self.engine, self.chooser, self._ready = engine, None, False
        if engine is None:
            return
        try:
            # keyword_prior: the keyword router's choice weighs in the head's scores (docs/tool-routing.md).
            prior = self._keyword_tool if self.config.keyword_prior else None
            self.chooser = ToolChooser(engine.model, engine.scheduler, self.registry.specs(),
                                       self.registry.examples(), mode=self.config.tool_choice, prior=prior)
        except ValueError as exc:     # e.g. a decoder whose state cannot be rewound: keywords stay
            log.warning("tool_choice.unavailable", reason=str(exc))
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return                    # prepared on first use
        self._preparing = loop.create_task(self._prepare(self.chooser))

    def _keyword_tool(self, question: str) -> str | None:
        call = self.registry.keyword_call(question)
        return call.name if call is not None else None

    async def _prepare(self, chooser: ToolChooser) -> None:
        try:
            await chooser.prepare()
            self._ready = chooser is self.chooser
        except Exception:
            log.exception("tool_choice.prepare_failed")

    async def choose(self, question: str) -> ToolCall | None:
        chooser = self.chooser
        if chooser is not None and not self._ready and self._preparing is None:
            await self._prepare(chooser)
        if chooser is not None and self._ready:
            return (await chooser.choose(question)).call
        # No model yet (or its prefix is still being prefilled): the keyword router.
        return self.registry.keyword_call(question)

    async def answer(self, question: str, role: str) -> Answered | None:
        """None when no tool owns the question (the general model answers it)."""
        call = await self.choose(question)
        if call is None or call.name == NONE:
            return None
        spec = next((s for s in self.registry.specs() if s.name == call.name), None)
        skill = spec.skill if spec else call.name.split(".")[0]
        if spec is not None and spec.changes_state and call.chosen_by == "model":
            # A model's choice alone never changes the car: the words must ask for it too.
            confirmed = self.registry.keyword_call(question)
            if confirmed is None or confirmed.name != call.name:
                log.info("tool.unconfirmed", tool=call.name)
                result = ToolResult(f"Nothing was changed: I was not sure you asked me to {spec.description}. "
                                    "Please say it plainly.", data={"unconfirmed": call.name})
                return Answered(call, skill, result, result.text)
            call = ToolCall(call.name, {**confirmed.arguments, **call.arguments}, call.chosen_by)
        try:
            result = await self.registry.run(call, role)
        except ToolRefused as exc:
            log.info("tool.refused", tool=call.name, role=role, code=exc.code, reason=str(exc))
            return Answered(call, skill, refused=exc)
        log.info("tool.ran", tool=call.name, chosen_by=call.chosen_by, acted=result.acted)
        return Answered(call, skill, result, await self.word(question, result))

    async def word(self, question: str, result: ToolResult) -> str:
        """What a state-changing tool did is said exactly as the tool said it."""
        if result.acted or not self.config.word_tool_results:
            return result.text
        return await word_result(self.engine, question, result)


async def word_result(engine, question: str, result: ToolResult) -> str:
    """The model's words for `result` when they keep every fact and invent none; otherwise the result as it is."""
    if engine is None or not result.facts:
        return result.text      # nothing to check the words against: the result says it as it is
    try:
        words = await engine.complete(f"Question: {question}\nTool result: {result.text}", priority="chat",
                                      max_tokens=WORDING_MAX_TOKENS, system=WORDING_SYSTEM)
    except Exception as exc:      # the facts still go out
        log.warning("tool.wording_failed", error=str(exc))
        return result.text
    words = words.strip().split("\n\n")[0].strip()
    if not words or dropped(words, result) or ungrounded(words, result):
        return result.text
    return words
