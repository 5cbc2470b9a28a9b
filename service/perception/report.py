"""Accuracy of each converted model against its float graph on held-out photos (box IoU, text equality), with
each raw graph output's SQNR (QDQ against float) beside it, and the detectors' score error where a decision could
change (raw SQNR is dominated by background anchors far from the threshold).

Used by `incar perception check`, the tests (same tolerances) and the bench. The QNN emulator runs the QDQ
graphs bit-faithfully but slowly, so its check uses small inputs: the faces on one held-out photo, objects on
another, and the sign-strip OCR detector + recognizer on one held-out sign.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from service.perception.calibration import HELD_OUT_PHOTOS, HELD_OUT_SIGNS, load_photo, sign_images, sign_strips
from service.perception.models import model_path
from service.perception.types import box_iou

# Tolerances: every float face must have a QDQ twin overlapping this much, and text must be equal.
FACE_MIN_IOU = 0.85
TEXT_BOX_MIN_IOU = 0.85
OBJECT_MIN_IOU = 0.8


def _match_boxes(ref: list, got: list) -> dict:
    ious = [max((box_iou(r, g) for g in got), default=0.0) for r in ref]
    return {"reference": len(ref), "found": len(got), "min_iou": round(min(ious), 4) if ious else 1.0,
            "mean_iou": round(float(np.mean(ious)), 4) if ious else 1.0}


# A detector decides on its scores near its threshold: raw-output SQNR is dominated by the many background
# anchors far from it, so the report also gives the score error where a decision could change.
CANDIDATE_SCORE = 0.05


def _raw_outputs(name: str, base: Path, backend: str, inputs: list[np.ndarray]) -> dict[str, tuple]:
    """Every raw graph output, float and QDQ, each flattened over the held-out preprocessed inputs."""
    from service.runtime.backends import create_session
    ref = create_session(model_path(name, "float", base), "cpu", model_name=f"{name}.float")
    test = create_session(model_path(name, "qdq", base), backend, disable_cpu_fallback=backend != "cpu",
                          model_name=f"{name}.qdq")
    feed_name = ref.get_inputs()[0].name
    out: dict[str, list] = {}
    for x in inputs:
        for o, a, b in zip(ref.get_outputs(), ref.run(None, {feed_name: x}), test.run(None, {feed_name: x})):
            out.setdefault(o.name, []).append((np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()))
    return {o: (np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))
            for o, pairs in out.items()}


def _sqnr_db(a: np.ndarray, b: np.ndarray) -> float:
    noise = float(np.sum((a - b) ** 2))
    return round(10 * np.log10(float(np.sum(a ** 2)) / noise), 2) if noise > 0 else float("inf")


def score_error(ref: np.ndarray, got: np.ndarray) -> dict:
    """Probability error on the candidates: scores (0..1) where the float or the QDQ graph reaches
    CANDIDATE_SCORE; rms and max of |QDQ - float| there."""
    near = (ref >= CANDIDATE_SCORE) | (got >= CANDIDATE_SCORE)
    diff = np.abs(got[near] - ref[near])
    return {"candidates": int(near.sum()), "rms": round(float(np.sqrt(np.mean(diff ** 2))), 4) if diff.size else 0.0,
            "max": round(float(diff.max()), 4) if diff.size else 0.0}


def compare_outputs(name: str, base: Path, backend: str, inputs: list[np.ndarray],
                    scores: dict[str, str] | None = None) -> dict:
    """SQNR (dB) of every raw graph output, QDQ against float; and for the outputs named in `scores`
    ("logit": sigmoid first, "probability": as they are) the score error near the decision."""
    raw = _raw_outputs(name, base, backend, inputs)
    out = {"output_sqnr_db": {o: _sqnr_db(a, b) for o, (a, b) in raw.items()}}
    if scores:
        def prob(v, kind):
            return 1.0 / (1.0 + np.exp(-np.clip(v, -100, 100))) if kind == "logit" else v
        picked = [(prob(raw[o][0], kind), prob(raw[o][1], kind)) for o, kind in scores.items()]
        out["score_error"] = score_error(np.concatenate([p[0] for p in picked]), np.concatenate([p[1] for p in picked]))
    return out


def _faces(name: str, range_: str, base: Path, backend: str, photos) -> dict:
    from service.perception.faces import FaceDetector
    ref = FaceDetector(model_path(name, "float", base), range_)
    test = FaceDetector(model_path(name, "qdq", base), range_, backend, disable_cpu_fallback=backend != "cpu")
    per_photo, t = {}, time.perf_counter()
    for photo in photos:
        img = load_photo(photo)
        per_photo[photo] = _match_boxes([f.box for f in ref.detect(img)], [f.box for f in test.detect(img)])
    ok = all(p["reference"] == p["found"] and p["min_iou"] >= FACE_MIN_IOU for p in per_photo.values())
    from service.perception.faces import FULL_RANGE, SHORT_RANGE, preprocess
    size = (SHORT_RANGE if range_ == "short" else FULL_RANGE).input_size
    figures = compare_outputs(name, base, backend, [preprocess(load_photo(p), size)[0] for p in photos],
                              scores={test.score_name: "logit"})
    return {"model": name, "backend": backend, "variant": "qdq", "photos": per_photo, "ok": ok, **figures,
            "seconds": round(time.perf_counter() - t, 2), "tolerance": f"same count, box IoU >= {FACE_MIN_IOU}"}


def _objects(base: Path, backend: str, photos) -> dict:
    """Every float detection needs a QDQ detection of the same class overlapping by OBJECT_MIN_IOU."""
    from service.perception.objects import ObjectDetector
    ref = ObjectDetector(model_path("objects", "float", base))
    test = ObjectDetector(model_path("objects", "qdq", base), backend, disable_cpu_fallback=backend != "cpu")
    per_photo, t = {}, time.perf_counter()
    for photo in photos:
        img = load_photo(photo)
        a, b = ref.detect(img), test.detect(img)
        ious = [max((box_iou(d.box, e.box) for e in b if e.label == d.label), default=0.0) for d in a]
        per_photo[photo] = {"float": sorted(d.label for d in a), "qdq": sorted(d.label for d in b),
                            "min_iou": round(min(ious), 4) if ious else 1.0,
                            "mean_iou": round(float(np.mean(ious)), 4) if ious else 1.0}
    ok = all(p["min_iou"] >= OBJECT_MIN_IOU for p in per_photo.values())
    from service.perception.objects import preprocess
    figures = compare_outputs("objects", base, backend, [preprocess(load_photo(p)) for p in photos],
                              scores=dict.fromkeys(test.score_names, "probability"))
    return {"model": "objects", "backend": backend, "variant": "qdq", "photos": per_photo, "ok": ok, **figures,
            "seconds": round(time.perf_counter() - t, 2),
            "tolerance": f"each float detection has a same-class QDQ box with IoU >= {OBJECT_MIN_IOU}"}


def _text(det_name: str, base: Path, backend: str, images: list[np.ndarray]) -> dict:
    from service.perception.text import TextReader
    dictionary = model_path("ocr_rec", "float", base)
    ref = TextReader(model_path(det_name, "float", base), dictionary)
    test = TextReader(model_path(det_name, "qdq", base), model_path("ocr_rec", "qdq", base), backend,
                      disable_cpu_fallback=backend != "cpu", dictionary_path=dictionary)
    results, t = [], time.perf_counter()
    for img in images:
        a, b = ref.read(img), test.read(img)
        boxes = _match_boxes([l.box for l in a], [l.box for l in b])
        results.append({"float": [l.text for l in a], "qdq": [l.text for l in b],
                        "text_equal": [l.text for l in a] == [l.text for l in b], **boxes})
    ok = all(r["text_equal"] and r["min_iou"] >= TEXT_BOX_MIN_IOU for r in results)
    from service.perception.text import DET_SIZE, DET_STRIP, crop_quad, det_preprocess, rec_preprocess
    size = DET_STRIP if det_name == "ocr_det_strip" else DET_SIZE
    crops = [rec_preprocess(crop_quad(img, quad)) for img in images for quad in ref.detect(img)]
    det = compare_outputs(det_name, base, backend, [det_preprocess(img, size)[0] for img in images],
                          scores={test.det.get_outputs()[0].name: "probability"})
    rec = compare_outputs("ocr_rec", base, backend, crops) if crops else {"output_sqnr_db": {}}
    return {"model": f"{det_name}+ocr_rec", "backend": backend, "variant": "qdq", "signs": results, "ok": ok,
            "output_sqnr_db": {det_name: det["output_sqnr_db"], "ocr_rec": rec["output_sqnr_db"]},
            "score_error": {det_name: det["score_error"]},
            "seconds": round(time.perf_counter() - t, 2),
            "tolerance": f"text equal, line box IoU >= {TEXT_BOX_MIN_IOU}"}


def accuracy_report(base: str | Path, backend: str = "cpu") -> list[dict]:
    """QDQ vs float for every ONNX model. On `cpu` all held-out photos; on the emulator the small set."""
    base = Path(base)
    if backend == "cpu":
        signs = [img for img, _ in sign_images(HELD_OUT_SIGNS, HELD_OUT_PHOTOS)]
        strips = sign_strips(HELD_OUT_SIGNS, HELD_OUT_PHOTOS)
        return [_faces("face_short", "short", base, backend, HELD_OUT_PHOTOS),
                _faces("face_full", "full", base, backend, HELD_OUT_PHOTOS),
                _objects(base, backend, HELD_OUT_PHOTOS),
                _text("ocr_det", base, backend, signs),
                _text("ocr_det_strip", base, backend, strips)]
    strips = sign_strips(HELD_OUT_SIGNS[:1], HELD_OUT_PHOTOS[1:])
    return [_faces("face_short", "short", base, backend, HELD_OUT_PHOTOS[:1]),
            _faces("face_full", "full", base, backend, HELD_OUT_PHOTOS[:1]),
            _objects(base, backend, HELD_OUT_PHOTOS[1:]),
            _text("ocr_det_strip", base, backend, strips)]
