"""Perception bench: ms per frame per model (CPU float vs CPU W8A16 QDQ, same inputs, same run) and the fps of
the whole cascade for one camera. Prints a table, then one JSON line.

    .venv/bin/python bench/perception.py [--models build/models] [--frames 20] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from service.perception import models  # noqa: E402
from service.perception.build import build  # noqa: E402
from service.perception.calibration import HELD_OUT_PHOTOS, draw_sign, load_photo, sign_strips  # noqa: E402
from service.runtime.backends import create_session  # noqa: E402


def _time(fn, frames: int) -> float:
    fn()   # warm-up: first run allocates
    samples = []
    for _ in range(frames):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def model_inputs() -> dict[str, np.ndarray]:
    from service.perception.faces import preprocess
    from service.perception.objects import preprocess as objects_preprocess
    from service.perception.text import DET_SIZE, DET_STRIP, det_preprocess, rec_preprocess
    faces = load_photo(HELD_OUT_PHOTOS[0])
    strip = sign_strips(("P2 LEVEL C-14",), HELD_OUT_PHOTOS[1:])[0]
    return {"face_short": preprocess(faces, 128)[0], "face_full": preprocess(faces, 192)[0],
            "objects": objects_preprocess(load_photo(HELD_OUT_PHOTOS[1])),
            "ocr_det": det_preprocess(load_photo(HELD_OUT_PHOTOS[1]), DET_SIZE)[0],
            "ocr_det_strip": det_preprocess(strip, DET_STRIP)[0], "ocr_rec": rec_preprocess(strip)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", type=Path, default=models.models_dir())
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--threads", type=int, default=int(os.environ.get("INCAR_THREADS", "0")) or None)
    args = p.parse_args(argv)
    build(args.models, progress=lambda line: None)
    inputs = model_inputs()
    per_model = {}
    print(f"{'model':16} {'float ms':>9} {'qdq ms':>9} {'qdq/float':>9}")
    for name, x in inputs.items():
        row = {}
        for variant in models.VARIANTS:
            sess = create_session(models.model_path(name, variant, args.models), "cpu", threads=args.threads)
            feed = {sess.get_inputs()[0].name: x}
            row[f"{variant}_ms"] = round(_time(lambda sess=sess, feed=feed: sess.run(None, feed), args.frames), 3)
        row["qdq_over_float"] = round(row["qdq_ms"] / row["float_ms"], 2)
        per_model[name] = row
        print(f"{name:16} {row['float_ms']:9.2f} {row['qdq_ms']:9.2f} {row['qdq_over_float']:9.2f}")

    from service.perception.identity import FaceEmbedder
    from service.perception.faces import FaceDetector
    img = load_photo(HELD_OUT_PHOTOS[0])
    box = FaceDetector(models.model_path("face_full", "float", args.models)).detect(img)[0].box
    emb = FaceEmbedder()
    per_model["dlib_identity"] = {"float_ms": round(_time(lambda: emb.embed(img, box), args.frames), 3)}
    print(f"{'dlib_identity':16} {per_model['dlib_identity']['float_ms']:9.2f} {'(cpu only)':>9}")

    from service.perception.cascade import Cascade, CameraCascadeConfig, PerceptionConfig

    class Meta:
        def __init__(self, cid, role, pos, t):
            self.camera_id, self.role, self.position, self.capture_time = cid, role, pos, t

    cascade_fps = {}
    # A cabin camera at the model's 768x768 with a passenger moving every frame (worst case: detectors always run),
    # and the same camera on a still scene (motion gates the detectors).
    cabin = cv2.resize(load_photo(HELD_OUT_PHOTOS[0]), (768, 768))
    exterior = cv2.resize(draw_sign(load_photo("dog.jpg"), "P2 LEVEL C-14")[0], (768, 768))
    for label, frame, role, moving in (("cabin_moving", cabin, "cabin", True), ("cabin_still", cabin, "cabin", False),
                                       ("exterior_moving", exterior, "exterior", True)):
        for variant in ("float", "qdq"):
            c = Cascade(PerceptionConfig(models_dir=str(args.models), variant=variant, threads=args.threads,
                                         default_camera=CameraCascadeConfig(idle_refresh_seconds=1e9)))
            shift = [0]

            def step(c=c, frame=frame, role=role, moving=moving, shift=shift):
                f = np.roll(frame, shift[0] * 8, axis=1) if moving else frame
                shift[0] += 1
                c.analyze(f, Meta("cam", role, "front", shift[0] / 30))
            ms = _time(step, args.frames)
            cascade_fps[f"{label}_{variant}"] = round(1000 / ms, 2)
            print(f"cascade {label:16} {variant:5}: {1000 / ms:7.2f} fps ({ms:.1f} ms/frame)")
    print(json.dumps({"bench": "perception", "threads": args.threads, "frames": args.frames,
                      "models_ms": per_model, "cascade_fps": cascade_fps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
