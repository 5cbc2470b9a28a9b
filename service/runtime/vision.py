"""The bundle's vision component at run time: BGR image -> normalised pixels -> `image_embeds` [256, hidden]."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import structlog

from service.runtime.backends import QNN_BACKENDS, BackendError, create_session
from service.runtime.qnn_context import context_binary

log = structlog.get_logger(__name__)

# Variant preference when none is named: the float graph on the CPU, the HTP's QDQ graphs on QNN.
_PREFERENCE = {"cpu": ("float", "int8", "w8a16"), "qnn": ("w8a16", "w8pc-a16", "w4a16")}


class VisionEncoder:
    def __init__(self, bundle, backend: str = "cpu", variant: str | None = None, *, target: str | None = None,
                 performance_mode: str | None = None, threads: int | None = None):
        if isinstance(bundle, (str, Path)):
            from service.runtime.bundle import load_bundle
            bundle = load_bundle(bundle)
        component = bundle.manifest.get("components", {}).get("vision")
        if component is None:
            raise BackendError(f"bundle {bundle.manifest.get('name', '?')} has no vision component")
        self.variant_name = variant or self._pick_variant(component, backend)
        spec = bundle.variant("vision", self.variant_name)
        if backend not in spec.get("backends", [backend]):
            raise BackendError(f"vision variant {self.variant_name!r} is for {spec.get('backends')}, not {backend}")
        pre = component.get("preprocess", {})
        self.size = int(pre.get("size", 768))
        self.mean = np.asarray(pre.get("mean", [0.5, 0.5, 0.5]), np.float32).reshape(1, 1, 3)
        self.std = np.asarray(pre.get("std", [0.5, 0.5, 0.5]), np.float32).reshape(1, 1, 3)
        self.rgb = pre.get("color", "RGB").upper() == "RGB"
        self.backend = backend
        path = bundle.file(spec["file"])
        if backend in QNN_BACKENDS:
            path = context_binary(bundle, spec, backend, target) or path   # shipped: no compile on the device
            self.session = create_session(path, backend, threads=threads, disable_cpu_fallback=True,
                                          performance_mode=performance_mode, target=target,
                                          model_name=f"vision.{self.variant_name}")
        else:
            self.session = create_session(path, backend, threads=threads, model_name=f"vision.{self.variant_name}")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.tokens, self.hidden = self.session.get_outputs()[0].shape[1:3]
        self.preprocess_seconds = 0.0
        self.encode_seconds = 0.0
        self._lock = threading.Lock()   # one run at a time per encoder; the timings belong to that run
        log.info("vision.loaded", backend=backend, variant=self.variant_name, tokens=self.tokens, hidden=self.hidden)

    @staticmethod
    def _pick_variant(component: dict, backend: str) -> str:
        variants = component.get("variants", {})
        kind = "qnn" if backend in QNN_BACKENDS else "cpu"
        for name in _PREFERENCE[kind]:
            if name in variants and backend in variants[name].get("backends", [backend]):
                return name
        for name, spec in variants.items():
            if backend in spec.get("backends", []):
                return name
        raise BackendError(f"bundle vision component has no variant for backend {backend} "
                           f"(variants: {', '.join(variants) or 'none'})")

    def preprocess(self, bgr_image: np.ndarray) -> np.ndarray:
        """BGR uint8 [H, W, 3] -> [1, 3, size, size] float32, normalised as the manifest says."""
        if not isinstance(bgr_image, np.ndarray) or bgr_image.ndim != 3 or bgr_image.shape[2] != 3:
            shape = getattr(bgr_image, "shape", None)
            raise ValueError(f"vision: expected a BGR image [H, W, 3], got {type(bgr_image).__name__} {shape}")
        if bgr_image.dtype != np.uint8:
            raise ValueError(f"vision: expected uint8 pixels, got {bgr_image.dtype}")
        if min(bgr_image.shape[:2]) < 1:
            raise ValueError("vision: empty image")
        h, w = bgr_image.shape[:2]
        interp = cv2.INTER_AREA if max(h, w) > self.size else cv2.INTER_LINEAR
        img = bgr_image if (h, w) == (self.size, self.size) else cv2.resize(bgr_image, (self.size, self.size),
                                                                            interpolation=interp)
        if self.rgb:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        x = (img.astype(np.float32) * (1.0 / 255.0) - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])

    def encode(self, bgr_image: np.ndarray) -> np.ndarray:
        with self._lock:
            t0 = time.perf_counter()
            pixels = self.preprocess(bgr_image)
            t1 = time.perf_counter()
            out = self.session.run([self.output_name], {self.input_name: pixels})[0]
            t2 = time.perf_counter()
            self.preprocess_seconds, self.encode_seconds = t1 - t0, t2 - t1
        return out[0]
