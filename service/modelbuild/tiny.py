"""Tiny seeded LFM2 checkpoints in the Hugging Face layout, for tests and smoke runs (built in well under a second).

`write_tiny_lfm2(folder)` writes config.json, model.safetensors, tokenizer.json (byte-level, no merges) and
tokenizer_config.json with a ChatML template: everything `incar model build --lfm2 DIR` reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .lfm2 import write_safetensors

TINY_LAYERS = ["conv", "full_attention", "conv", "full_attention"]
_SPECIALS = ["<|startoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (what the ByteLevel pre-tokenizer emits)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_tokenizer_json() -> dict:
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    added = []
    for tok in _SPECIALS:
        vocab[tok] = len(vocab)
        added.append({"id": vocab[tok], "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": []}}


def write_tiny_lfm2(folder: str | Path, seed: int = 0, hidden: int = 64, layers: list[str] | None = None,
                    heads: int = 4, kv_heads: int = 2, intermediate: int = 128, conv_kernel: int = 3,
                    max_positions: int = 128, vocab: int | None = None, embedding_norm_noise: float = 0.1) -> Path:
    """`vocab`: a bare checkpoint of that many token ids, without tokenizer files (graph-level tests);
    `embedding_norm_noise` 0: a plain all-ones embedding norm."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = layers or TINY_LAYERS
    rng = np.random.default_rng(seed)
    tok = tiny_tokenizer_json() if vocab is None else None
    vocab = len(tok["model"]["vocab"]) if tok is not None else vocab
    H, hd = hidden, hidden // heads

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

    t = {"model.embed_tokens.weight": w(vocab, H, scale=1.0),
         "model.embedding_norm.weight": 1 + w(H, scale=embedding_norm_noise) if embedding_norm_noise
         else np.ones(H, np.float32)}
    for i, kind in enumerate(layers):
        p = f"model.layers.{i}."
        t.update({p + "operator_norm.weight": 1 + w(H, scale=0.1), p + "ffn_norm.weight": 1 + w(H, scale=0.1),
                  p + "feed_forward.w1.weight": w(intermediate, H), p + "feed_forward.w3.weight": w(intermediate, H),
                  p + "feed_forward.w2.weight": w(H, intermediate)})
        if kind == "conv":
            t.update({p + "conv.in_proj.weight": w(3 * H, H), p + "conv.conv.weight": w(H, 1, conv_kernel, scale=0.5),
                      p + "conv.out_proj.weight": w(H, H)})
        else:
            t.update({p + "self_attn.q_proj.weight": w(heads * hd, H),
                      p + "self_attn.k_proj.weight": w(kv_heads * hd, H),
                      p + "self_attn.v_proj.weight": w(kv_heads * hd, H),
                      p + "self_attn.out_proj.weight": w(H, heads * hd),
                      p + "self_attn.q_layernorm.weight": 1 + w(hd, scale=0.1),
                      p + "self_attn.k_layernorm.weight": 1 + w(hd, scale=0.1)})
    write_safetensors(folder / "model.safetensors", t)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "lfm2", "hidden_size": H, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": len(layers), "layer_types": layers, "conv_L_cache": conv_kernel, "norm_eps": 1e-5,
        "rope_theta": 1e6, "max_position_embeddings": max_positions, "vocab_size": vocab, "tie_embedding": True}))
    if tok is None:
        return folder
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
        "add_bos_token": False, "chat_template": CHATML}))
    return folder
