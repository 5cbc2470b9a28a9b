"""The CPU int8 object detector (`objects.int8.onnx`, service/perception/build/cpu_int8.py) against the float
one it was quantized from: speed per run on this CPU, and detection agreement, the figure that decides whether
the safety lane may use it. Prints figures, then one JSON line.

    .venv/bin/python bench/safety_int8.py [--runs 20] [--threads 1]

Agreement: every float detection (score >= 0.3) matched by an int8 one of the same label at IoU >= 0.5, on the
six photos (faces3.jpg and person.jpg are held out of the calibration) and on bench/safety.py's 40 approach
frames (a bicycle growing from 20 % to 88 % of the frame height on a plain backdrop; the bicycle is cut from
dog.jpg, a calibration photo, but no approach frame is calibrated on). Recall on the approach frames is the
share of frames where each model finds the bicycle at all.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.safety import scenes  # noqa: E402

PHOTOS = ("faces1.jpg", "faces2.jpg", "faces3.jpg", "dog.jpg", "horses.jpg", "person.jpg")
MATCH_IOU = 0.5


def agreement(reference, candidate, images: dict) -> dict:
    """Float detections matched by label and IoU, the IoU and score change of each match, and extra boxes."""
    from service.perception.types import box_iou
    matched = total = extra = 0
    ious, score_change, missed = [], [], []
    for name, bgr in images.items():
        ref, got, used = reference.detect(bgr), candidate.detect(bgr), set()
        for r in ref:
            total += 1
            iou, j = max(((box_iou(r.box, g.box), j) for j, g in enumerate(got) if g.label == r.label
                          and j not in used), default=(0.0, None))
            if iou >= MATCH_IOU:
                matched += 1
                used.add(j)
                ious.append(iou)
                score_change.append(got[j].score - r.score)
            else:
                missed.append(f"{name}:{r.label}:{r.score:.2f}")
        extra += len(got) - len(used)
    return {"matched": matched, "total": total, "extra": extra, "missed": missed,
            "iou_mean": float(np.mean(ious)) if ious else None, "iou_min": float(np.min(ious)) if ious else None,
            "score_change_mean": float(np.mean(score_change)) if score_change else None}


def per_run_ms(detector, bgr, runs: int) -> float:
    from service.perception.objects import preprocess
    feed = {detector.input_name: preprocess(bgr)}
    for _ in range(3):
        detector.session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        detector.session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from service.perception.build import build
    from service.perception.calibration import load_photo
    from service.perception.models import CPU_INT8, model_path
    from service.perception.objects import ObjectDetector
    build(names=["objects"], quantize=False, cpu_int8=True, progress=lambda line: None)
    float_det = ObjectDetector(model_path("objects", "float"), threads=args.threads)
    int8_det = ObjectDetector(model_path("objects", CPU_INT8), threads=args.threads)
    photos = {n: load_photo(n) for n in PHOTOS}
    approach = dict(enumerate(scenes()["left"]))
    on_photos = agreement(float_det, int8_det, photos)
    on_approach = agreement(float_det, int8_det, approach)
    bicycle = {label: sum(any(d.label == "bicycle" for d in det.detect(f)) for f in approach.values())
               for label, det in (("float", float_det), ("int8", int8_det))}
    speed = {label: per_run_ms(det, photos["person.jpg"], args.runs) for label, det in
             (("float", float_det), ("int8", int8_det))}
    for label, a in (("photos", on_photos), ("approach frames", on_approach)):
        print(f"{label:16s} float detections matched {a['matched']}/{a['total']}, IoU mean {a['iou_mean']:.3f} "
              f"min {a['iou_min']:.3f}, score change {a['score_change_mean']:+.3f}, extra {a['extra']}; "
              f"missed {a['missed'][:12]}")
    print(f"approach frames with the bicycle: float {bicycle['float']}/40, int8 {bicycle['int8']}/40")
    print(f"per run ({args.threads} thread): float {speed['float']:.1f} ms, int8 {speed['int8']:.1f} ms")
    print(json.dumps({
        "int8_ms": round(speed["int8"], 2), "float_ms": round(speed["float"], 2),
        "int8_vs_float_speed": round(speed["float"] / speed["int8"], 2), "threads": args.threads,
        "photo_matched": on_photos["matched"], "photo_float_detections": on_photos["total"],
        "photo_extra": on_photos["extra"], "photo_iou_mean": round(on_photos["iou_mean"], 3),
        "photo_score_change_mean": round(on_photos["score_change_mean"], 3),
        "approach_matched": on_approach["matched"], "approach_float_detections": on_approach["total"],
        "approach_bicycle_float": bicycle["float"], "approach_bicycle_int8": bicycle["int8"],
        "approach_frames": len(approach),
        "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
