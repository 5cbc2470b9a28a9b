"""The language-model core: chunked prefill and one-token decode over a bundle's static graphs.

Architecture-agnostic: the manifest names the graphs and their state tensors; this module gathers
embeddings, builds masks, and feeds each step's state outputs back. The decode step is the hot path:
every buffer is preallocated per sequence and bound once with ORT IO binding, so a step allocates
nothing of context size and copies only the new K/V rows (append mode).
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
import structlog

from .backends import create_session
from .providers import spin_bound_us, spin_us_from_env
from .bundle import Bundle, BundleError
from .qnn_context import context_binary
from .shared_sequence import CacheSlots, ContextOverflowError, DecoderState, SequenceBase, SharedSequence
from .shared_sequence import bind_input as _bind_input
from .shared_sequence import bind_output as _bind_output
from .tokenizer import Tokenizer

MASK_VALUE = np.float32(-1.0e4)
# Append-mode caches grow in buckets of this many slots (reallocated at most L/BUCKET times per sequence),
# so per-step attention costs the tokens held, not the whole context.
CACHE_BUCKET = 256
log = structlog.get_logger(__name__)


__all__ = ["ContextOverflowError", "DecodeSequence", "DecoderState", "LanguageModel", "SharedSequence"]


@dataclass
class _Graph:
    session: ort.InferenceSession
    entry: dict
    tokens: int
    mode: str


def _pick_variant(bundle: Bundle, backend: str, variant: str | None) -> str:
    names = bundle.variants("decoder_decode")
    if variant is not None:
        bundle.variant("decoder_decode", variant)
        bundle.variant("decoder_prefill", variant)
        return variant
    runnable = [n for n in names if backend in bundle.variant("decoder_decode", n).get("backends", [])
                and n in bundle.variants("decoder_prefill")]
    if not runnable:
        raise BundleError(f"{bundle.path}: no decoder variant runs on backend {backend!r} (variants: {names})")
    preference = ["int4", "int8", "float"] if backend == "cpu" else []
    for name in preference:
        if name in runnable:
            return name
    return runnable[0]


class LanguageModel:
    def __init__(self, bundle: Bundle, backend: str = "cpu", variant: str | None = None, threads: int | None = None,
                 disable_cpu_fallback: bool | None = None, target: str | None = None,
                 spin_within_run: bool | int | None = None):
        # On the NPU a graph runs wholly on the HTP or not at all: a silent CPU fallback would break the power and
        # latency budgets, so it is off unless asked for.
        if disable_cpu_fallback is None:
            disable_cpu_fallback = backend != "cpu"
        if spin_within_run is None:
            # Bounded in-run spinning (providers.SPIN_US; INCAR_CPU_SPIN=0 off, INCAR_CPU_SPIN_US the bound): about
            # 1.45x the 2-thread decode speed on quiet cores, and within 5 % of no spinning when the cores are taken.
            spin_within_run = spin_us_from_env()
        self.bundle = bundle
        self.backend = backend
        self.name = bundle.name
        text = bundle.manifest["text"]
        self.context_length: int = int(text["context_length"])
        self.hidden_size: int = int(text["hidden_size"])
        self.vocab_size: int = int(text["vocab_size"])
        self._load_embedding(bundle, text["embedding"])
        tok_cfg = dict(bundle.manifest["tokenizer"])
        self.tokenizer = Tokenizer(bundle.file(tok_cfg.pop("file")), tok_cfg)
        self.image_token_id = tok_cfg.get("image_token_id")
        self.variant = _pick_variant(bundle, backend, variant)
        self._graphs = {}
        self.model_files: dict[str, str] = {}   # component -> the file its session loaded
        opened: dict[str, ort.InferenceSession] = {}   # a shared-mode variant's one graph serves both components
        for component in ("decoder_prefill", "decoder_decode"):
            entry = bundle.variant(component, self.variant)
            path = context_binary(bundle, entry, backend, target) or bundle.file(entry["file"])
            self.model_files[component] = str(path)
            session = opened.get(str(path)) or create_session(
                path, backend, threads=threads, disable_cpu_fallback=disable_cpu_fallback, target=target,
                model_name=entry["file"].rsplit("/", 1)[-1].removesuffix(".onnx"), spin_within_run=spin_within_run)
            opened[str(path)] = session
            tokens = int(bundle.manifest["components"][component]["tokens"])
            self._graphs[component] = _Graph(session, entry, tokens, entry.get("state_update", "append"))
        self.prefill_chunk = self._graphs["decoder_prefill"].tokens
        self.shared_state = self._graphs["decoder_decode"].mode == "shared"
        if self.shared_state:                   # sequences reuse their bound caches (shared_sequence.CacheSlots)
            decode = self._graphs["decoder_decode"]
            self.cache_slots = CacheSlots(decode.session, decode.entry["state"], self.vocab_size, self.hidden_size,
                                          self.context_length)
        self.spin_within_run = bool(spin_within_run) and backend == "cpu"
        self.spin_us = spin_bound_us(spin_within_run) if self.spin_within_run else 0
        self.state_key = (str(bundle.path.resolve()), self.variant)
        log.info("language_model_loaded", name=self.name, variant=self.variant, backend=backend,
                 context_length=self.context_length)

    @property
    def eos_token_ids(self) -> list[int]:
        return self.tokenizer.eos_token_ids

    def sessions(self) -> list:
        """The ONNX Runtime sessions this model runs (the HTP performance-mode knob applies to each)."""
        return list({id(graph.session): graph.session for graph in self._graphs.values()}.values())

    def _load_embedding(self, bundle: Bundle, emb: dict) -> None:
        self._embed_scale = np.float32(emb.get("scale", 1.0))
        self._embed_scales = self._embed_offsets = None
        if emb.get("dtype") == "blocks":
            # The GGUF's own codes and block scales: rows come out exactly as the GGUF dequantizes them.
            with np.load(bundle.file(emb["file"])) as table:
                self._embed = table["codes"]
                self._embed_scales = table["scales"]
                self._embed_offsets = table["offsets"] if "offsets" in table else None
            self._embed_block = int(emb["block_size"])
            self._embed_zero = np.float32(1 << (int(emb["bits"]) - 1))
        else:
            self._embed = np.load(bundle.file(emb["file"]))

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        index = np.asarray(ids, dtype=np.int64)
        if self._embed_scales is not None:
            codes = self._embed[index].astype(np.float32).reshape(len(index), -1, self._embed_block)
            rows = self._embed_scales[index][..., None] * (codes - self._embed_zero)
            if self._embed_offsets is not None:
                rows = rows + self._embed_offsets[index][..., None]
            rows = rows.reshape(len(index), -1)
        else:
            rows = self._embed[index].astype(np.float32)
        return rows * self._embed_scale if self._embed_scale != 1 else rows

    def embed_prompt(self, ids: list[int], image_embeds: Sequence[np.ndarray] = ()) -> np.ndarray:
        """Prompt embeddings [N, hidden] with image-token rows replaced, in order, by the images' rows."""
        embeds = self.embed(ids)
        if image_embeds:
            if self.image_token_id is None:
                raise ValueError("this bundle has no image token; it cannot take images")
            slots = np.flatnonzero(np.asarray(ids) == self.image_token_id)
            rows = np.concatenate([np.asarray(e, np.float32).reshape(-1, self.hidden_size) for e in image_embeds])
            if len(slots) != len(rows):
                raise ValueError(f"prompt holds {len(slots)} image tokens but the images give {len(rows)} embeddings")
            embeds[slots] = rows
        return embeds

    def new_sequence(self, prompt_ids: list[int], image_embeds: Sequence[np.ndarray] = (),
                     prefix: DecoderState | None = None) -> DecodeSequence | SharedSequence:
        """A sequence over `prompt_ids`; with `prefix` (a snapshot whose tokens begin the prompt, shared-state
        bundles only) only the rest of the prompt is prefilled."""
        if self.shared_state:
            return SharedSequence(self, list(prompt_ids), image_embeds, prefix)
        if prefix is not None:
            raise ValueError(f"variant {self.variant!r} ({self._graphs['decoder_decode'].mode} state) cannot "
                             f"restore decoder state; shared-state variants can")
        return DecodeSequence(self, list(prompt_ids), image_embeds)


class _Step:
    """One graph's preallocated inputs/outputs for one sequence, bound once."""

    def __init__(self, graph: _Graph, seq: DecodeSequence):
        self.graph = graph
        self.binding = graph.session.io_binding()
        T, L, H = graph.tokens, seq.L, seq.model.hidden_size
        self.embeds = np.zeros((1, T, H), np.float32)
        self.position_ids = np.zeros((1, T), np.int64)
        self.token_mask = np.zeros((1, T), np.float32)
        width = seq.capacity + T if graph.mode == "append" else L
        self.attention_mask = np.full((1, 1, T, width), MASK_VALUE, np.float32)
        self.cache_write = np.zeros((1, 1, L, T), np.float32) if graph.mode == "replace" else None
        out_shapes = {o["name"]: o["shape"] for o in graph.entry["outputs"]}
        self.logits = np.zeros(out_shapes["logits"], np.float32)
        # Append-mode KV outputs are the T new rows; replace-mode outputs are whole states (ping-pong).
        self.outputs = {s["output"]: np.zeros(out_shapes[s["output"]], np.float32) for s in graph.entry["state"]
                        if graph.mode == "append" and s["kind"] != "conv"}
        for name, arr in (("inputs_embeds", self.embeds), ("position_ids", self.position_ids),
                          ("token_mask", self.token_mask), ("attention_mask", self.attention_mask)):
            _bind_input(self.binding, name, arr)
        if self.cache_write is not None:
            _bind_input(self.binding, "cache_write", self.cache_write)
        _bind_output(self.binding, "logits", self.logits)
        for name, arr in self.outputs.items():
            _bind_output(self.binding, name, arr)


class DecodeSequence(SequenceBase):
    """A sequence over `append` / `replace` graphs (static prefill chunks, masks built here)."""

    def __init__(self, model: LanguageModel, prompt_ids: list[int], image_embeds: Sequence[np.ndarray] = ()):
        super().__init__(model, prompt_ids, image_embeds)
        self._prefilled = 0
        T = model.prefill_chunk
        self._pad = (-len(prompt_ids)) % T
        decode = model._graphs["decoder_decode"]
        self._append = decode.mode == "append"
        self.capacity = self._bucket(len(prompt_ids) + 1) if self._append else self.L
        # State buffers: current ("front") values per state input; replace-kind states get a back buffer.
        self._state = decode.entry["state"]
        self._front: dict[str, np.ndarray] = {}
        self._back: dict[str, np.ndarray] = {}
        for s in self._state:
            shape = list(s["shape"])
            if self._append and s["kind"] != "conv":
                shape[s.get("axis", 2)] = self.capacity
            self._front[s["input"]] = np.zeros(shape, np.float32)
            if not self._append or s["kind"] == "conv":
                self._back[s["input"]] = np.zeros(shape, np.float32)
        self._prefill = _Step(model._graphs["decoder_prefill"], self)
        self._decode = _Step(decode, self)
        self._decode.token_mask[:] = 1.0
        if decode.mode == "append":
            self._decode.attention_mask[..., -1] = 0.0   # the new token sees itself; past slots open as written
        for step in (self._prefill, self._decode):
            for s in self._state:
                _bind_input(step.binding, s["input"], self._front[s["input"]])
                if s["input"] in self._back:
                    _bind_output(step.binding, s["output"], self._back[s["input"]])

    # -- public API -----------------------------------------------------------------------------
    def prefill_step(self) -> bool:
        """Run the next prefill chunk; True when the whole prompt is in the cache."""
        if self.prefill_done:
            return True
        step, T, L = self._prefill, self._prefill.graph.tokens, self.L
        first = self._prefilled == 0
        pad = self._pad if first else 0
        n = T - pad
        start = self._prefilled
        step.embeds[0, :pad] = 0.0
        step.embeds[0, pad:] = self._prompt_embeds[start:start + n]
        step.position_ids[0, :pad] = 0
        step.position_ids[0, pad:] = np.arange(start, start + n)
        step.token_mask[0, :pad] = 0.0
        step.token_mask[0, pad:] = 1.0
        if step.graph.mode == "append":
            self._ensure_capacity(start + n + 1)
        mask = step.attention_mask
        mask.fill(MASK_VALUE)
        rows = np.arange(pad, T)
        if step.graph.mode == "append":
            P = self.capacity
            mask[0, 0, :, :start] = 0.0                                   # the cache written so far
            causal = np.tril(np.ones((n, n), bool))
            block = mask[0, 0, pad:, P + pad:]
            block[causal] = 0.0
            mask[0, 0, np.arange(pad), P + np.arange(pad)] = 0.0          # padding rows see only themselves
        else:
            step.cache_write.fill(0.0)
            step.cache_write[0, 0, start + np.arange(n), rows] = 1.0
            visible = np.arange(L)[None, :] <= (start + np.arange(n))[:, None]
            mask[0, 0, pad:][visible] = 0.0
            mask[0, 0, :pad, 0] = 0.0
        self._run(step)
        if step.graph.mode == "append":
            self._write_rows(step, start, slice(pad, T))
        self._prefilled += n
        self.length = self._prefilled
        self.tokens.extend(self.prompt_ids[start:start + n])
        if self._decode.graph.mode == "append":
            self._decode.attention_mask[0, 0, 0, start:start + n] = 0.0
        if self.prefill_done:
            self._logits = step.logits[0, -1]
            return True
        return False

    def append(self, token_id: int) -> None:
        """Feed one token (run one decode step); `.logits` then predicts the next one."""
        pos = self._next_position()
        if self._append:
            self._ensure_capacity(pos + 1)
        step = self._decode
        step.embeds[0, 0] = self.model.embed([token_id])[0]
        step.position_ids[0, 0] = pos
        if step.graph.mode == "replace":
            if pos > 0:
                step.cache_write[0, 0, pos - 1, 0] = 0.0
            step.cache_write[0, 0, pos, 0] = 1.0
            step.attention_mask[0, 0, 0, :pos + 1] = 0.0
        self._run(step)
        if step.graph.mode == "append":
            self._write_rows(step, pos, slice(0, 1))
            step.attention_mask[0, 0, 0, pos] = 0.0
        self.length = pos + 1
        self.tokens.append(int(token_id))
        self._logits = step.logits[0, -1]

    # -- internals ------------------------------------------------------------------------------
    def _bucket(self, slots: int) -> int:
        return min(self.L, -(-slots // CACHE_BUCKET) * CACHE_BUCKET)

    def _ensure_capacity(self, slots: int) -> None:
        """Grow the append-mode caches (and the masks that span them) to hold `slots` slots."""
        if slots <= self.capacity:
            return
        old, new = self.capacity, self._bucket(slots)
        for s in self._state:
            if s["kind"] == "conv":
                continue
            buf = self._front[s["input"]]
            grown = np.zeros(buf.shape[:2] + (new,) + buf.shape[3:], np.float32)
            grown[:, :, :old] = buf
            self._front[s["input"]] = grown
            for step in (self._prefill, self._decode):
                _bind_input(step.binding, s["input"], grown)
        for step in (self._prefill, self._decode):
            T = step.graph.tokens
            mask = np.full((1, 1, T, new + T), MASK_VALUE, np.float32)
            mask[..., :old] = step.attention_mask[..., :old]
            mask[..., new:] = step.attention_mask[..., old:]
            step.attention_mask = mask
            _bind_input(step.binding, "attention_mask", mask)
        self.capacity = new

    def _run(self, step: _Step) -> None:
        step.graph.session.run_with_iobinding(step.binding)
        if self._back:
            # Replaced states: swap front/back and rebind both graphs to the new roles.
            for s in self._state:
                name = s["input"]
                if name in self._back:
                    self._front[name], self._back[name] = self._back[name], self._front[name]
                    for other in (self._prefill, self._decode):
                        _bind_input(other.binding, name, self._front[name])
                        _bind_output(other.binding, s["output"], self._back[name])

    def _write_rows(self, step: _Step, pos: int, rows: slice) -> None:
        count = rows.stop - rows.start
        for s in self._state:
            if s["kind"] == "conv":
                continue
            self._front[s["input"]][:, :, pos:pos + count, :] = step.outputs[s["output"]][:, :, rows, :]
