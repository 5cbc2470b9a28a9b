"""Accuracy of a CPU decoder variant against the float (dequantized-GGUF) model, measured at build time and by the
benchmarks: teacher-forced top-1 agreement and logits SQNR on held-out text, and how exactly the weights are held.

`variant_agreement` is the function other reports call (bench/quant.py's transcoded row).
"""
from __future__ import annotations

import json

import numpy as np

from .decoder import DecoderSpec
from .gguf_blocks import NBitsWeight
from .gqa_decoder import ACCURACY_LEVEL, build_gqa_decoder
from .heldout_text import PASSAGES

_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")


def heldout_ids(tokenizer_json: dict) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    return [tok.encode(p, add_special_tokens=False).ids for p in PASSAGES]


def all_logits_session(spec: DecoderSpec, weights: dict, threads: int | None = None):
    """An in-memory evaluation graph (logits at every position) on the CPU EP."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    model = build_gqa_decoder(spec, weights, name="eval", all_logits=True).model()
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_all_logits(session, spec: DecoderSpec, embeds: np.ndarray) -> np.ndarray:
    """Logits [N, vocab] of one sequence of embeddings [N, hidden], prefilled in one run."""
    n = len(embeds)
    cache = np.zeros((1, spec.num_kv_heads, n, spec.head_dim), np.float32)
    feeds = {"inputs_embeds": np.asarray(embeds, np.float32)[None], "seqlens_k": np.array([n - 1], np.int32),
             "total_sequence_length": np.array(n, np.int32)}
    for i in range(spec.num_layers):
        feeds[f"past_key.{i}"] = feeds[f"past_value.{i}"] = cache
    return session.run(["logits"], feeds)[0][0]


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float | None:
    """10 log10(signal / error) in dB; None when the two are identical (infinite)."""
    err = float(np.sum((np.asarray(reference, np.float64) - test) ** 2))
    return None if err == 0 else round(10 * np.log10(float(np.sum(np.asarray(reference, np.float64) ** 2)) / err), 2)


def variant_agreement(spec: DecoderSpec, float_weights: dict, variant_weights: dict, sequences: list[list[int]],
                      threads: int | None = None, float_session=None) -> dict:
    """Teacher-forced top-1 agreement and logits SQNR of `variant_weights` against `float_weights`."""
    reference = float_session or all_logits_session(spec, float_weights, threads)
    variant = all_logits_session(spec, variant_weights, threads)
    agree = total = 0
    ref_all, test_all = [], []
    for ids in sequences:
        embeds = np.asarray(float_weights["embed"], np.float32)[np.asarray(ids)]
        a, b = run_all_logits(reference, spec, embeds), run_all_logits(variant, spec, embeds)
        agree += int(np.sum(a.argmax(-1) == b.argmax(-1)))
        total += len(ids)
        ref_all.append(a)
        test_all.append(b)
    return {"top1_agreement": round(agree / total, 4), "logits_sqnr_db": sqnr_db(np.concatenate(ref_all),
                                                                                 np.concatenate(test_all)),
            "heldout_tokens": total}


def weight_fidelity(spec: DecoderSpec, float_weights: dict, variant_weights: dict) -> dict:
    """How the variant's matrices reconstruct the float (dequantized-GGUF) ones: exact, or their SQNR."""
    signal = noise = 0.0
    max_diff = 0.0
    layouts: dict[str, str] = {}
    pairs = [(lw_f[k], lw_v[k]) for lw_f, lw_v in zip(float_weights["layers"], variant_weights["layers"])
             for k in _MATRICES]
    head = "embed" if spec.tied_head else "lm_head"
    pairs.append((float_weights[head], variant_weights[head]))
    for ref, held in pairs:
        if isinstance(held, NBitsWeight):
            offsets = " + block-sum offsets" if held.offsets is not None else ""
            layouts[held.source_type] = f"MatMulNBits bits {held.bits} block {held.block_size}{offsets}"
            held = held.dequantize()
        ref = np.asarray(ref, np.float64)
        diff = ref - held
        signal += float(np.sum(ref * ref))
        noise += float(np.sum(diff * diff))
        max_diff = max(max_diff, float(np.abs(diff).max()))
    return {"exact": noise == 0, "max_abs_diff": max_diff,
            "sqnr_db": None if noise == 0 else round(10 * np.log10(signal / noise), 2), "layouts": layouts}


def quantization_report(spec: DecoderSpec, float_weights: dict, variants: dict[str, dict], tokenizer_json: dict,
                        source_types: dict[str, int]) -> dict:
    """The manifest's `quantization` section for the CPU variants (measured now, on held-out text)."""
    sequences = heldout_ids(tokenizer_json)
    reference = all_logits_session(spec, float_weights)
    report = {}
    for name, weights in variants.items():
        fidelity = weight_fidelity(spec, float_weights, weights)
        method = "gguf-transcode" if fidelity["exact"] and source_types else "requantized-symmetric"
        report[name] = {"method": method, "source_types": dict(sorted(source_types.items())),
                        "accuracy_level": ACCURACY_LEVEL, "weights": fidelity,
                        "reference": "float variant (GGUF dequantized)",
                        **variant_agreement(spec, float_weights, weights, sequences, float_session=reference)}
    return report


def transcoded_row(gguf_path=None, threads: int | None = None) -> dict:
    """The transcoded int4 variant against float, as flat report keys (bench/quant.py's row for what ships):
    the default GGUF unless `gguf_path`."""
    from .gguf_llama import default_gguf, load_gguf

    loaded = load_gguf(gguf_path or default_gguf(), transcode_blocks=True)
    fidelity = weight_fidelity(loaded.spec, loaded.weights, loaded.transcoded)
    agreement = variant_agreement(loaded.spec, loaded.weights, loaded.transcoded, heldout_ids(loaded.tokenizer_json),
                                  threads=threads)
    return {"int4_transcode_top1_agree": agreement["top1_agreement"],
            "int4_transcode_logits_sqnr_db": agreement["logits_sqnr_db"],
            "int4_transcode_weights_exact": fidelity["exact"],
            "int4_transcode_weight_sqnr_db": fidelity["sqnr_db"],
            "int4_transcode_heldout_tokens": agreement["heldout_tokens"],
            "int4_transcode_accuracy_level": ACCURACY_LEVEL}
