"""Quantization accuracy per component, precision and recipe, on real weights, beside the AutoNeural paper.

- Vision (bench/quant_vision.py): EfficientNet-Lite0's feature map and classifier at W8A16, round-to-nearest
  per-channel against the recipe of service/modelbuild/cnn_ptq.py (post-training: `vision_w8a16`; with the
  quantization-aware fine-tuning step of cnn_qat.py: `vision_w8a16_qat`), on held-out photos.
- Language (bench/quant_lm.py): SmolLM2-135M logits, teacher-forced on held-out real text, at W8A16 and
  W4A16 (LPBQ) with the residual rotation of service/modelbuild/rotation.py, and the CPU int4/int8 variants.
QDQ graphs run through ORT's CPU EP (the HTP emulator is far too slow for these sizes; on the tiny graphs of
tests/modelbuild/test_qnn_recipes.py it lands within 1 dB of CPU QDQ). Prints a table, then one JSON line of
flat keys (`vision_w8a16_sqnr_db`, `lm_w8a16_top1_agree`, `lm_w4a16_top1_agree`, ...) and the rows.

    .venv/bin/python bench/quant.py [--components vision,lm] [--calib 200] [--qat-steps 300] [--htp-inputs 0]
                                    [--vision-keys vision_w8a16,vision_w8a16_qat] [--lm-tokens 64]
                                    [--lm-calib-tokens 20480] [--lm-held-chunks 16]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PAPER = {"cnn_vision_encoder": {"sqnr_db": 45.0, "rms_pct": 0.562},
         "vit_baseline": {"sqnr_db": 28.0, "rms_pct": 3.98}}


def flat_keys(rows: list[dict]) -> dict:
    """Each row's `key` (e.g. `lm_w8a16`: the recipe; `lm_w8a16_baseline`: per-channel only) x metric."""
    out = {}
    for r in rows:
        if "sqnr_db" not in r:
            continue
        base = r["key"]
        for k in ("sqnr_db", "rms_pct", "top1_agree"):
            out[f"{base}_{k}"] = r[k]
        if "bytes_above_8bit_pct" in r:
            out[f"{base}_bytes_above_8bit_pct"] = r["bytes_above_8bit_pct"]
        if "recipe_name" in r:
            out[f"{base}_recipe"] = r["recipe_name"]
        if "qat_steps" in r:
            out[f"{base}_qat_steps"] = r["qat_steps"]
        if "htp_truncation_units" in r:                 # the compensation the HTP compile applies (htp_lowering)
            out[f"{base}_htp_truncation_units"] = r["htp_truncation_units"]
        out.update({k: v for k, v in r.items() if k.startswith(f"{base}_htp")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--components", default="vision,lm")
    ap.add_argument("--calib", type=int, default=200, help="augmented calibration crops (vision)")
    ap.add_argument("--held-crops", type=int, default=16, help="crops of each held-out photo (vision)")
    ap.add_argument("--image-size", type=int, default=224, help="EfficientNet-Lite0 was trained at 224")
    ap.add_argument("--qat-steps", type=int, default=300, help="quantization-aware fine-tuning steps (vision)")
    ap.add_argument("--qat-batch", type=int, default=8)
    ap.add_argument("--qat-size", type=int, default=128, help="training crop size (a multiple of 32)")
    ap.add_argument("--qat-eval-every", type=int, default=50, help="held-out SQNR every this many steps")
    ap.add_argument("--vision-keys", default="", help="only these vision rows, e.g. vision_w8a16 (default: all)")
    ap.add_argument("--htp-inputs", type=int, default=0,
                    help="also run each recipe row on the HTP emulator on this many held-out inputs (slow)")
    ap.add_argument("--lm-tokens", type=int, default=64, help="tokens per teacher-forced chunk")
    ap.add_argument("--lm-calib-tokens", type=int, default=20480)
    ap.add_argument("--lm-held-chunks", type=int, default=16)
    ap.add_argument("--lm-baseline-tokens", type=int, default=2560, help="calibration tokens of the unrotated row")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU int4/int8 language rows")
    ap.add_argument("--lm-gptq-tokens", type=int, default=2048, help="tokens for the GPTQ input second moments")
    ap.add_argument("--lm-keys", default="", help="only these LM rows, e.g. lm_w8a16,lm_w4a16 (default: all)")
    args = ap.parse_args()
    rows, extra = [], {}
    with tempfile.TemporaryDirectory(prefix="incar-quant-") as tmp:
        work = Path(tmp)
        if "vision" in args.components:
            from quant_vision import vision_component
            from service.modelbuild.cnn_qat import QatRecipe
            qat = QatRecipe(steps=args.qat_steps, batch=args.qat_batch, train_size=args.qat_size,
                            eval_every=args.qat_eval_every)
            vrows, extra["vision_sanity"] = vision_component(
                work, args.calib, args.image_size, args.held_crops, qat=qat, htp_inputs=args.htp_inputs,
                only=tuple(k for k in args.vision_keys.split(",") if k))
            rows += vrows
        if "lm" in args.components:
            from quant_lm import lm_component
            rows += lm_component(work, args.lm_tokens, args.lm_calib_tokens, args.lm_held_chunks,
                                 with_cpu=not args.no_cpu, baseline_tokens=args.lm_baseline_tokens,
                                 gptq_tokens=args.lm_gptq_tokens,
                                 keys=tuple(k for k in args.lm_keys.split(",") if k))
    print()
    print(f"{'component':36} {'precision':9} {'SQNR dB':>8} {'RMS %':>8} {'top-1':>6}  recipe")
    for r in rows:
        if "sqnr_db" in r:
            print(f"{r['component']:36} {r['precision']:9} {r['sqnr_db']:8.2f} {r['rms_pct']:8.3f} "
                  f"{r['top1_agree']:6.3f}  {r['recipe']}")
        else:
            print(f"{r['component']:36} {r['precision']:9} {r['note']}")
    print(f"paper: CNN vision encoder W8A16 {PAPER['cnn_vision_encoder']['sqnr_db']:.0f} dB / "
          f"{PAPER['cnn_vision_encoder']['rms_pct']} % RMS (QAT), "
          f"ViT baseline {PAPER['vit_baseline']['sqnr_db']:.0f} dB")
    print(json.dumps({"bench": "quant", **flat_keys(rows), "paper": PAPER, "rows": rows, **extra}))


if __name__ == "__main__":
    main()
