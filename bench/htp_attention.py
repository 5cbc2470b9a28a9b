"""SmolLM2-135M's attention on the HTP emulator: the first `--layers` layers and the head (real weights from the
bundled GGUF), in the NPU graph form (`replace`: a 16-token prefill into a 32-slot cache, one-hot cache writes),
W8A16 per-channel after the recipe's rotation of the residual stream (`--no-rotation`: without), ranges from 64
chunks of the calibration text. Logits on held-out chunks against the float graph: CPU QDQ, the emulator compiling
the file as it is, and the emulator through the run-time lowering, which splits every MatMul of two 16-bit
activations (service/runtime/htp_matmul.py: the HTP reads the second input of such a MatMul at 8 bits). CPU
fallback off. The last line is JSON.

    .venv/bin/python bench/htp_attention.py [--layers 2] [--held 4] [--no-rotation]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.modelbuild import calibration_text, qdq, rotation  # noqa: E402
from service.modelbuild.decoder import build_decoder, empty_cache_feeds  # noqa: E402
from service.modelbuild.gguf_llama import default_gguf, load_gguf  # noqa: E402
from service.runtime.backends import create_session  # noqa: E402
from service.runtime.providers import qnn_session_options  # noqa: E402

TOKENS, SLOTS = 16, 32


def score(ref: list, got: list) -> tuple[float, float]:
    a = np.concatenate([r.ravel() for r in ref]).astype(np.float64)
    b = np.concatenate([g.ravel() for g in got]).astype(np.float64)
    top1 = float(np.mean([np.mean(r[0].argmax(-1) == g[0].argmax(-1)) for r, g in zip(ref, got)]))
    return round(float(10 * np.log10((a * a).sum() / ((a - b) ** 2).sum())), 2), round(top1, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--held", type=int, default=4, help="held-out chunks of 16 tokens")
    ap.add_argument("--rotation", action=argparse.BooleanOptionalAction, default=True,
                    help="rotate the residual stream first, as the W8A16 recipe does (rotation.py)")
    args = ap.parse_args()
    from tokenizers import Tokenizer
    model = load_gguf(default_gguf(), context_length=SLOTS)
    spec = dataclasses.replace(model.spec, layer_kinds=model.spec.layer_kinds[:args.layers])
    tok = Tokenizer.from_str(json.dumps(model.tokenizer_json))
    cal_docs, held_docs = calibration_text.split()
    cal = calibration_text.token_chunks(lambda s: tok.encode(s).ids, cal_docs, TOKENS, 64, per_document=4)
    held = calibration_text.token_chunks(lambda s: tok.encode(s).ids, held_docs, TOKENS, args.held, per_document=1)
    weights = model.weights
    if args.rotation:        # the float function is unchanged (to ~1e-5), so the float reference is either graph
        spec, weights, _ = rotation.rotate_residual(spec, weights, seed=0)
    table = weights["embed"]
    with tempfile.TemporaryDirectory() as tmp:
        plain, quantized = Path(tmp) / "float.onnx", Path(tmp) / "w8a16.onnx"
        build_decoder(spec, weights, TOKENS, "replace", name="smollm2_htp").save(plain, external_data="f.data")
        qdq.quantize_qdq(plain, quantized, empty_cache_feeds(spec, table, cal, TOKENS), "w8a16", calib_stride=8)
        held_feeds = empty_cache_feeds(spec, table, held, TOKENS)
        float_session = create_session(plain, "cpu")
        ref = [float_session.run(["logits"], f)[0] for f in held_feeds]
        runs = {"cpu": create_session(quantized, "cpu"),
                "htp_as_compiled": ort.InferenceSession(str(quantized), sess_options=qnn_session_options(
                    "qnn-emulator", disable_cpu_fallback=True)),
                "htp": create_session(quantized, "qnn-emulator", disable_cpu_fallback=True, context_cache=False)}
        logits, seconds = {}, {}
        for name, session in runs.items():
            t0 = time.perf_counter()
            logits[name] = [session.run(["logits"], f)[0] for f in held_feeds]
            seconds[name] = round(time.perf_counter() - t0, 1)
    result = {"bench": "htp_attention", "lm_htp_layers": args.layers, "held_tokens": len(held) * TOKENS,
              "lm_htp_rotation": args.rotation}
    for name, got in logits.items():
        sqnr, top1 = score(ref, got)
        result.update({f"lm_w8a16_{name}_sqnr_db": sqnr, f"lm_w8a16_{name}_top1_agree": top1})
        print(f"{name:16s}: logits {sqnr:6.2f} dB against float, top-1 {top1:.3f} ({seconds[name]} s)")
    for name in ("htp_as_compiled", "htp"):
        result[f"lm_w8a16_{name}_vs_cpu_db"] = score(logits["cpu"], logits[name])[0]
    print(f"from CPU QDQ: as compiled {result['lm_w8a16_htp_as_compiled_vs_cpu_db']} dB, "
          f"through the lowering {result['lm_w8a16_htp_vs_cpu_db']} dB")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
