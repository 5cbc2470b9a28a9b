"""QDQ graphs against float, on CPU (all held-out photos) and once on the QNN HTP emulator with CPU fallback off."""
from service.perception.report import accuracy_report


def test_qdq_matches_float_on_cpu_for_every_model(models_dir):
    report = accuracy_report(models_dir, "cpu")
    assert {e["model"] for e in report} == {"face_short", "face_full", "objects", "ocr_det+ocr_rec",
                                           "ocr_det_strip+ocr_rec"}
    for entry in report:
        assert entry["ok"], entry
    signs = next(e for e in report if e["model"] == "ocr_det+ocr_rec")["signs"]
    assert signs[0]["qdq"] == ["P2 LEVEL C-14"]


def test_qdq_on_qnn_emulator_without_cpu_fallback(models_dir):
    # Runs once (the emulator is bit-faithful but slow: ~1 min for these small inputs).
    report = accuracy_report(models_dir, "qnn-emulator")
    for entry in report:
        assert entry["backend"] == "qnn-emulator" and entry["ok"], entry
    strip = next(e for e in report if e["model"] == "ocr_det_strip+ocr_rec")
    assert strip["signs"][0]["qdq"] == ["P2 LEVEL C-14"]
    faces = next(e for e in report if e["model"] == "face_full")
    assert faces["photos"]["faces3.jpg"]["found"] == 3
    objects = next(e for e in report if e["model"] == "objects")
    assert {"person", "horse", "dog"} <= set(objects["photos"]["person.jpg"]["qdq"])
