"""`incar perception build|check|report`: convert the perception models (cached) and check them on real photos."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from service.perception.build import build
from service.perception.models import model_path, models_dir


def _check(out: Path, backend: str) -> int:
    """Run every stage on the test photos and print what it found; non-zero exit when an acceptance check fails."""
    from service.perception.calibration import HELD_OUT_SIGNS, draw_sign, load_photo
    from service.perception.faces import FaceDetector
    from service.perception.identity import FaceEmbedder, Gallery
    from service.perception.text import TextReader, parse_parking_sign
    variant = "float" if backend == "cpu" else "qdq"
    failures = []
    det = FaceDetector(model_path("face_full", variant, out), "full", backend, disable_cpu_fallback=backend != "cpu")
    embedder, gallery = FaceEmbedder(), Gallery()
    for name in ("faces1.jpg", "faces2.jpg", "faces3.jpg"):
        img = load_photo(name)
        t = time.perf_counter()
        faces = embedder.embed_faces(img, det.detect(img))
        print(f"faces {name}: {len(faces)} faces {[round(f.score, 2) for f in faces]} "
              f"({(time.perf_counter() - t) * 1000:.0f} ms with identity)")
        if len(faces) != 3:
            failures.append(f"{name}: {len(faces)} faces, expected 3")
        for i, f in enumerate(faces):
            who, d = gallery.match(f.embedding)
            if who is not None:
                failures.append(f"{name} face {i} matched {who} at {d:.2f}: identity threshold too loose")
            gallery.enroll(f"{name}#{i}", f.embedding)
    from service.perception.objects import ObjectDetector
    objects = ObjectDetector(model_path("objects", variant, out), backend, disable_cpu_fallback=backend != "cpu")
    for name, must, any_of in (("dog.jpg", {"dog", "bicycle"}, {"car", "truck"}),
                               ("person.jpg", {"person", "horse", "dog"}, set())):
        t = time.perf_counter()
        dets = objects.detect(load_photo(name))
        labels = {d.label for d in dets}
        print(f"objects {name}: {[(d.label, round(d.score, 2)) for d in dets]} "
              f"({(time.perf_counter() - t) * 1000:.0f} ms)")
        if not must <= labels or (any_of and not labels & any_of):
            failures.append(f"{name}: objects {sorted(labels)}, expected {sorted(must)} and one of {sorted(any_of)}")
    reader = TextReader(model_path("ocr_det", variant, out), model_path("ocr_rec", variant, out), backend,
                        disable_cpu_fallback=backend != "cpu", dictionary_path=model_path("ocr_rec", "float", out))
    for text in HELD_OUT_SIGNS:
        img, _ = draw_sign(load_photo("dog.jpg"), text)
        t = time.perf_counter()
        lines = reader.read(img)
        got = [l.text for l in lines]
        print(f"text {text!r}: read {got} -> {parse_parking_sign(lines)} ({(time.perf_counter() - t) * 1000:.0f} ms)")
        if got != [text]:
            failures.append(f"sign {text!r} read as {got}")
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    print("perception check: " + ("ok" if not failures else f"{len(failures)} failure(s)"))
    return 0 if not failures else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="incar perception", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="convert every perception model once (skips what is up to date)")
    b.add_argument("--out", type=Path, default=None, help="models folder (default $INCAR_MODELS_DIR or build/models)")
    b.add_argument("--no-quantize", action="store_true", help="float graphs only (skip the W8A16 QDQ variants)")
    c = sub.add_parser("check", help="run the models on the test photos and print what they find")
    c.add_argument("--out", type=Path, default=None)
    c.add_argument("--backend", default="cpu", choices=("cpu", "qnn-emulator", "qnn-htp"))
    r = sub.add_parser("report", help="accuracy of the QDQ graphs against float on held-out photos (JSON)")
    r.add_argument("--out", type=Path, default=None)
    r.add_argument("--backend", default="cpu", choices=("cpu", "qnn-emulator", "qnn-htp"))
    args = parser.parse_args(argv)
    out = args.out or models_dir()
    if args.command == "build":
        t = time.monotonic()
        build(out, quantize=not args.no_quantize)
        print(f"perception: models in {out / 'perception'} ({time.monotonic() - t:.1f}s)")
        return 0
    build(out, progress=lambda line: None)   # check/report on whatever is current
    if args.command == "check":
        return _check(out, args.backend)
    from service.perception.report import accuracy_report
    report = accuracy_report(out, args.backend)
    for entry in report:
        print(json.dumps(entry))
    return 0 if all(e["ok"] for e in report) else 1


if __name__ == "__main__":
    sys.exit(main())
