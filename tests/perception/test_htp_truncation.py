"""The shipped W8A16 face detector carries its fitted HTP truncation compensation, and the QNN compile applies it:
on the emulator (CPU fallback off) the held-out photo's outputs come much nearer CPU QDQ's than the same file
compiled without the lowering (measured: classifier logits 34.7 -> 43 dB, boxes 47 -> 56 dB)."""
from __future__ import annotations

import onnx
import onnxruntime as ort

from service.modelbuild.qdq import sqnr_db
from service.perception import faces
from service.perception.calibration import HELD_OUT_PHOTOS, load_photo
from service.perception.models import model_path
from service.runtime import htp_lowering
from service.runtime.backends import create_session
from service.runtime.providers import qnn_session_options


def test_face_short_on_the_htp_lands_on_cpu_qdq(models_dir):
    path = model_path("face_short", "qdq", models_dir)
    units = htp_lowering.truncation_units(onnx.load(str(path), load_external_data=False))
    assert 0 < units <= 256, units
    x = faces.preprocess(load_photo(HELD_OUT_PHOTOS[0]), faces.SHORT_RANGE.input_size)[0]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    cpu = session.run(None, feed)
    raw = ort.InferenceSession(str(path), sess_options=qnn_session_options("qnn-emulator", disable_cpu_fallback=True)
                               ).run(None, feed)
    lowered = create_session(path, "qnn-emulator", disable_cpu_fallback=True, context_cache=False).run(None, feed)
    for name, c, r, low in zip([o.name for o in session.get_outputs()], cpu, raw, lowered):
        before, after = sqnr_db(c, r), sqnr_db(c, low)
        assert after > before + 3.0, (name, before, after)
