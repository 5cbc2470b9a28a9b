"""bench/quant.py's language-model half: SmolLM2-135M-Instruct (the default bundle's GGUF) as one full-sequence
chunk graph, teacher-forced on held-out real text; logits against the float model.

Rows: W8A16 with per-channel weights only (the old recipe's best), then the recipe: residual rotation folded
into the weights (`rotation.py`), W8A16 per-channel, ranges from >= 20k calibration tokens of real text
(`calibration_text.py`); W4A16 from the GGUF's own Q4_1 codes (`gguf_lpbq.py`: LPBQ/32 + block-sum offsets,
no rotation; `lm_w4a16` with GPTQ-refined codes, `lm_w4a16_copied` without), and the older rotated LPBQ-64
re-rounding (`lm_w4a16_rerounded*`); and the CPU EP int4/int8 variants exactly as the bundle makes them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from service.modelbuild import calibration_text, gguf_lpbq, qdq, rotation
from service.runtime.backends import create_session

CPU_PRECISIONS = ("int4", "int8")


def _feeds(spec, table, chunks, tokens):
    from service.modelbuild.decoder import MASK_VALUE, state_entries
    L = spec.context_length
    mask = np.full((1, 1, tokens, L + tokens), MASK_VALUE, np.float32)
    mask[0, 0, :, L:] = np.triu(np.full((tokens, tokens), MASK_VALUE, np.float32), 1)   # causal, no past
    states = {e["input"]: np.zeros(e["shape"], np.float32) for e in state_entries(spec, tokens, "append")}
    return [{"inputs_embeds": table[np.asarray(ids)][None].astype(np.float32),
             "position_ids": np.arange(tokens, dtype=np.int64)[None], "token_mask": np.ones((1, tokens), np.float32),
             "attention_mask": mask, **states} for ids in chunks]


def _score(ref, got) -> dict:
    rep = qdq.compare(ref, got, component="lm", precision="", backend="cpu", output="logits")
    agree = float(np.mean([np.mean(r[0].argmax(-1) == q[0].argmax(-1)) for r, q in zip(ref, got)]))
    return {"sqnr_db": round(rep.sqnr_db, 2), "rms_pct": round(rep.rms_pct, 3), "top1_agree": round(agree, 3)}


def lm_component(work: Path, tokens: int, calib_tokens: int, held_chunks: int, with_cpu: bool = True,
                 baseline_tokens: int = 2560, gptq_tokens: int = 2048,
                 keys: tuple[str, ...] = ()) -> list[dict]:
    from tokenizers import Tokenizer

    from service.modelbuild.decoder import build_decoder
    from service.modelbuild.gguf_llama import default_gguf, load_gguf

    model = load_gguf(default_gguf(), context_length=tokens, transcode_blocks=True)
    spec, weights = model.spec, model.weights
    model_types = ", ".join(f"{k} x{v}" for k, v in sorted(model.source_types.items()))
    tok = Tokenizer.from_str(json.dumps(model.tokenizer_json))
    encode = lambda text: tok.encode(text).ids                                        # noqa: E731
    cal_docs, held_docs = calibration_text.split()
    cal_chunks = calibration_text.token_chunks(encode, cal_docs, tokens, calib_tokens // tokens, per_document=4)
    held_chunks_ids = calibration_text.token_chunks(encode, held_docs, tokens, held_chunks, per_document=1)
    print(f"lm: SmolLM2-135M ({spec.num_layers} layers, d={spec.hidden_size}); {len(cal_chunks) * tokens} "
          f"calibration tokens from {len(cal_docs)} documents, {len(held_chunks_ids) * tokens} held-out tokens "
          f"from other documents; {tokens}-token teacher-forced chunks", flush=True)
    plain = work / "smollm2.float.onnx"
    build_decoder(spec, weights, tokens, "append", name="smollm2_chunk").save(plain, external_data="smollm2.float.data")
    r_spec, r_weights, _ = rotation.rotate_residual(spec, weights, seed=0)
    rotated = work / "smollm2.rotated.onnx"
    build_decoder(r_spec, r_weights, tokens, "append", name="smollm2_rot").save(
        rotated, external_data="smollm2.rot.data")
    plain_table, rot_table = weights["embed"], r_weights["embed"]
    del weights, r_weights
    blocks = gguf_lpbq.decoder_blocks(model.transcoded)
    del model
    split = _gguf_split_graph(plain, work, blocks)
    float_sess = create_session(plain, "cpu")
    held_plain = _feeds(spec, plain_table, held_chunks_ids, tokens)
    held_rot = _feeds(r_spec, rot_table, held_chunks_ids, tokens)
    ref = [float_sess.run(["logits"], f)[0] for f in held_plain]
    rot_float = create_session(rotated, "cpu")
    rot_ref = [rot_float.run(["logits"], f)[0] for f in held_rot]
    stream_peak = _residual_peaks(plain, rotated, held_plain[0], held_rot[0])
    print(f"  rotation is exact in float: {_score(ref, rot_ref)}; residual max/median |x| {stream_peak}", flush=True)
    split_float = create_session(split, "cpu")
    print(f"  offsets split off the GGUF weights, exact in float: "
          f"{_score(ref, [split_float.run(['logits'], f)[0] for f in held_plain])}", flush=True)
    del float_sess, rot_float, split_float
    rows = []
    # The rotated rows share one activation-range cache (ranges depend on the float graph only); the
    # unrotated baseline is calibrated on the first `baseline_tokens` only, to bound the bench's time.
    from service.modelbuild.sequential import linear_hessians
    hessians = {}
    if not keys or {"lm_w8a16", "lm_w4a16_rerounded"} & set(keys):
        hess_feeds = _feeds(r_spec, rot_table, cal_chunks[:max(1, gptq_tokens // tokens)], tokens)
        started = time.monotonic()
        hessians = linear_hessians(rotated, hess_feeds)
        print(f"  input second moments of {len(hessians)} weights from {len(hess_feeds) * tokens} tokens "
              f"({time.monotonic() - started:.0f} s)", flush=True)
        del hess_feeds
    gptq = f"GPTQ rounding ({min(gptq_tokens, len(cal_chunks) * tokens)} tokens)"
    gguf_w4 = {}
    for key, with_gptq in (("lm_w4a16_copied", False), ("lm_w4a16", True)):
        if keys and key not in keys:
            continue
        hess = None
        if with_gptq:
            started = time.monotonic()
            hess = linear_hessians(split, _feeds(spec, plain_table, cal_chunks[:max(1, gptq_tokens // tokens)], tokens))
            print(f"  split graph: input second moments of {len(hess)} weights ({time.monotonic() - started:.0f} s)",
                  flush=True)
        gguf_w4[key] = enc = gguf_lpbq.encode(blocks, hess)
        db = list(enc.weight_db.values())
        print(f"  {key}: GGUF codes into LPBQ/32 for {len(db)} weights ({model_types}); weight SQNR against the "
              f"GGUF's own (block scales on the 16-level grid, int8 offsets{', GPTQ codes' if hess else ''}): "
              f"median {np.median(db):.1f} dB, min {min(db):.1f} dB", flush=True)
        del hess
    gguf_recipe = (f"{gguf_lpbq.RECIPE}: the GGUF's Q4_1 codes in LPBQ int4 blocks of 32 (block scales on the "
                   "4-bit x per-channel grid), block offsets as (block sums of x) @ int8 C, no rotation, "
                   "lm_head int8, uint16 activations")
    cases = [("lm_w8a16_rtn", "w8a16", rotated, "rotation + per-channel int8 (nearest), uint16 activations", {}),
             ("lm_w8a16", "w8a16", rotated, f"rotation + per-channel int8, {gptq}, uint16 activations",
              {"hessians": hessians}),
             ("lm_w4a16_copied", "w4a16", split, f"{gguf_recipe}; codes copied",
              _gguf_options(gguf_w4, "lm_w4a16_copied")),
             ("lm_w4a16", "w4a16", split, f"{gguf_recipe}; codes refined by {gptq}",
              _gguf_options(gguf_w4, "lm_w4a16")),
             ("lm_w4a16_rerounded_rtn", "w4a16", rotated, "rotation + LPBQ int4 blocks of 64 re-rounded from the "
              "dequantized GGUF (nearest), lm_head int8, uint16 activations", {}),
             ("lm_w4a16_rerounded", "w4a16", rotated, f"rotation + LPBQ int4/64 re-rounded, {gptq}, lm_head int8, "
              "uint16 activations", {"hessians": hessians}),
             ("lm_w8a16_baseline", "w8a16", plain, "per-channel int8 weights (nearest), uint16 activations, "
              "no rotation", {})]
    for key, precision, float_path, recipe, options in cases:
        if keys and key not in keys:
            continue
        is_rot = float_path == rotated
        chunks = cal_chunks if float_path != plain else cal_chunks[:max(1, baseline_tokens // tokens)]
        cal = _feeds(r_spec if is_rot else spec, rot_table if is_rot else plain_table, chunks, tokens)
        out = work / f"smollm2.{key}.onnx"
        started = time.monotonic()
        row = {"component": "language_model (SmolLM2-135M)", "precision": precision, "key": key, "recipe": recipe,
               "recipe_name": options.get("recipe") or qdq.recipe_name(precision, **options),
               "calibration_tokens": len(cal) * tokens}
        try:
            qdq.quantize_qdq(float_path, out, cal, precision, calib_stride=8,
                             **{k: v for k, v in options.items() if k != "recipe"},
                             range_cache=work / f"ranges.{float_path.stem}.json")
            sess = create_session(out, "cpu")
            got = [sess.run(["logits"], f)[0] for f in (held_rot if is_rot else held_plain)]
        except Exception as exc:  # one recipe failing must not end the table
            rows.append({**row, "note": f"failed: {type(exc).__name__}: {str(exc)[:160]}"})
            print("  ", rows[-1], flush=True)
            continue
        rows.append({**row, **_score(ref, got), "seconds": round(time.monotonic() - started, 1)})
        print("  ", rows[-1], flush=True)
        del sess, cal
        for p in work.glob(out.name + "*"):
            p.unlink()
    for precision in CPU_PRECISIONS if with_cpu else ():
        out = work / f"smollm2.{precision}.onnx"
        started = time.monotonic()
        qdq.quantize_cpu(plain, out, precision)
        sess = create_session(out, "cpu")
        got = [sess.run(["logits"], f)[0] for f in held_plain]
        rows.append({"component": "language_model (SmolLM2-135M)", "precision": precision, "key": f"lm_{precision}",
                     "recipe": "CPU EP MatMulNBits as the bundle ships it (cpu_quant)", **_score(ref, got),
                     "seconds": round(time.monotonic() - started, 1)})
        print("  ", rows[-1], flush=True)
    return rows


def _gguf_options(encodings: dict, key: str) -> dict:
    enc = encodings.get(key)
    return {} if enc is None else {"lpbq_codes": enc.codes, "integers": enc.offset_ints,
                                   "recipe": enc.recipe()}


def _gguf_split_graph(plain: Path, work: Path, blocks: dict) -> Path:
    """The float graph with each 4-bit GGUF weight split into its symmetric part and block offsets
    (`gguf_lpbq.split_offsets`, exact in float)."""
    import onnx

    split = work / "smollm2.gguf_split.onnx"
    model = gguf_lpbq.split_offsets(onnx.load(str(plain)), blocks)
    onnx.save_model(model, str(split), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="smollm2.gguf_split.data")
    return split


def _residual_peaks(plain: Path, rotated: Path, feed_plain: dict, feed_rot: dict) -> dict:
    """max/median |x| of the residual stream entering a middle layer, before and after rotation."""
    import onnx
    out = {}
    for tag, path, feed in (("plain", plain, feed_plain), ("rotated", rotated, feed_rot)):
        m = onnx.load(str(path), load_external_data=False)
        norms = [n.input[0] for n in m.graph.node if n.op_type == "RMSNormalization"]
        probe = norms[len(norms) // 2]                     # the stream entering a middle layer
        m.graph.output.append(onnx.helper.make_tensor_value_info(probe, onnx.TensorProto.FLOAT, None))
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        path_tmp = path.with_name(path.stem + ".probe.onnx")
        onnx.save(m, str(path_tmp))
        sess = ort.InferenceSession(str(path_tmp), so, providers=["CPUExecutionProvider"])
        out[tag] = round(rotation.residual_peak_ratio(sess.run([probe], feed)[0]), 1)
        path_tmp.unlink()
    return out
