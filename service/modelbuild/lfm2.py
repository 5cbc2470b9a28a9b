"""LFM2 hybrid decoders (gated short-conv + GQA attention) from a Hugging Face checkpoint folder.

Reads `config.json` + `*.safetensors` in the `Lfm2ForCausalLM` layout (also the text tower of LFM2-VL,
under `model.language_model.`), plus `tokenizer.json` / `tokenizer_config.json` when present.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from .decoder import DecoderSpec
from .gguf_llama import LoadedModel

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}
_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """A dependency-free safetensors reader (the format is a JSON header and raw little-endian data)."""
    raw = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = raw[base + start:base + end]
        if info["dtype"] == "BF16":
            arr = (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _DTYPES:
            arr = np.frombuffer(buf, _DTYPES[info["dtype"]])
        else:
            raise ValueError(f"{Path(path).name}: tensor {name} has unsupported dtype {info['dtype']}")
        out[name] = arr.reshape(info["shape"])
    return out


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray]) -> None:
    """Write float32/float16 tensors in safetensors layout (used by tests and tooling)."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        data = arr.tobytes()
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def lfm2_inputs_sha256(folder: str | Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(folder).iterdir()):
        if p.suffix in (".json", ".safetensors", ".jinja"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _layer_kinds(cfg: dict) -> list[str]:
    n = int(cfg["num_hidden_layers"])
    if "layer_types" in cfg and cfg["layer_types"]:
        kinds = cfg["layer_types"]
        if len(kinds) != n:
            raise ValueError(f"config.json: layer_types has {len(kinds)} entries for {n} layers")
        mapping = {"full_attention": "attention", "attention": "attention", "conv": "conv", "short_conv": "conv"}
        bad = [k for k in kinds if k not in mapping]
        if bad:
            raise ValueError(f"config.json: unknown layer_types {sorted(set(bad))}")
        return [mapping[k] for k in kinds]
    if "full_attn_idxs" in cfg:
        idx = set(cfg["full_attn_idxs"])
        return ["attention" if i in idx else "conv" for i in range(n)]
    raise ValueError("config.json: needs layer_types (or full_attn_idxs)")


def load_lfm2(folder: str | Path, context_length: int = 4096, require_tokenizer: bool = True) -> LoadedModel:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json")
    cfg = json.loads(cfg_path.read_text())
    cfg = cfg.get("text_config", cfg)          # LFM2-VL nests the decoder config
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(read_safetensors(f))
    prefix = next((p for p in _PREFIXES if p + "embed_tokens.weight" in tensors), None)
    if prefix is None:
        raise ValueError(f"{folder}: no embed_tokens.weight under any of {_PREFIXES}")

    def get(name: str, optional: bool = False):
        key = prefix + name
        if key not in tensors:
            if optional:
                return None
            raise ValueError(f"{folder}: tensor {key!r} is missing")
        return np.asarray(tensors[key], np.float32)

    H = int(cfg["hidden_size"])
    n_heads = int(cfg["num_attention_heads"])
    kinds = _layer_kinds(cfg)
    K = int(cfg.get("conv_L_cache", 3))
    layers = []
    for i, kind in enumerate(kinds):
        p = f"layers.{i}."
        lw = {"input_norm": get(p + "operator_norm.weight"), "ffn_norm": get(p + "ffn_norm.weight"),
              "gate": get(p + "feed_forward.w1.weight"), "down": get(p + "feed_forward.w2.weight"),
              "up": get(p + "feed_forward.w3.weight")}
        if kind == "attention":
            lw.update(q=get(p + "self_attn.q_proj.weight"), k=get(p + "self_attn.k_proj.weight"),
                      v=get(p + "self_attn.v_proj.weight"), o=get(p + "self_attn.out_proj.weight"),
                      q_norm=get(p + "self_attn.q_layernorm.weight"), k_norm=get(p + "self_attn.k_layernorm.weight"))
        else:
            lw.update(in_proj=get(p + "conv.in_proj.weight"), in_proj_bias=get(p + "conv.in_proj.bias", True),
                      conv=get(p + "conv.conv.weight").reshape(H, K), conv_bias=get(p + "conv.conv.bias", True),
                      out_proj=get(p + "conv.out_proj.weight"), out_proj_bias=get(p + "conv.out_proj.bias", True))
        layers.append(lw)
    embed = get("embed_tokens.weight")
    norm = get("embedding_norm.weight", True)
    if norm is None:
        norm = get("norm.weight")
    lm_head = tensors.get("lm_head.weight")
    tied = lm_head is None or bool(cfg.get("tie_embedding", cfg.get("tie_word_embeddings", False)))
    head_dim = int(cfg.get("head_dim") or H // n_heads)
    spec = DecoderSpec(
        architecture="lfm2", vocab_size=embed.shape[0], hidden_size=H, num_heads=n_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads", n_heads)), head_dim=head_dim,
        intermediate_size=layers[0]["gate"].shape[0], rms_eps=float(cfg.get("norm_eps", 1e-5)),
        rope_theta=float(cfg.get("rope_theta", 1000000.0)),
        context_length=min(context_length, int(cfg.get("max_position_embeddings", context_length))),
        layer_kinds=kinds, conv_kernel=K, qk_norm=True, tied_head=tied)
    weights = {"embed": embed, "norm": norm, "layers": layers}
    if not tied:
        weights["lm_head"] = np.asarray(lm_head, np.float32)
    tok_json, tok_cfg = _hf_tokenizer(folder, require_tokenizer)
    return LoadedModel(spec, weights, tok_json, tok_cfg, cfg.get("_name_or_path", folder.name).split("/")[-1].lower())


def _hf_tokenizer(folder: Path, required: bool) -> tuple[dict, dict]:
    tok_path, cfg_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not tok_path.is_file():
        if required:
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        return {}, {}
    tok_json = json.loads(tok_path.read_text())
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    vocab = {**tok_json.get("model", {}).get("vocab", {}),
             **{t["content"]: t["id"] for t in tok_json.get("added_tokens", [])}}

    def tid(key: str):
        tok = tcfg.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return vocab.get(tok) if tok is not None else None

    template = tcfg.get("chat_template") or ""
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    eos = tid("eos_token")
    eos_ids = [eos] if eos is not None else []
    if "<|im_end|>" in vocab and vocab["<|im_end|>"] not in eos_ids:
        eos_ids.append(vocab["<|im_end|>"])
    image_token = "<image>" if "<image>" in vocab else None
    cfg = {"chat_template": template, "bos_token_id": tid("bos_token"), "eos_token_ids": eos_ids,
           "pad_token_id": tid("pad_token"), "add_bos_token": bool(tcfg.get("add_bos_token", False)),
           "image_token": image_token, "image_token_id": vocab.get(image_token) if image_token else None,
           "image_tokens_per_image": 256 if image_token else 0}
    return tok_json, cfg
