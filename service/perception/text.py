"""Text: PP-OCR detection (DB) + recognition (CTC) from the `rapidocr` package, run through our backends.

rapidocr's own pipeline opens its own onnxruntime sessions, which would bypass `create_session` (and so the
QNN backends); we keep its model files, its dictionary (stored in the recognition graph's metadata) and its
well-tested DB/CTC post-processing, and do the sessions and the static-shape pre-processing ourselves.
"""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import onnx
from rapidocr.ch_ppocr_det.utils import DBPostProcess
from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode

from service.perception.types import TextLine
from service.runtime.backends import create_session

DET_SIZE = 512            # static square detector input (camera frames are square); QNN needs static shapes
DET_STRIP = (96, 384)     # a sign-strip detector (H, W): reads a crop around a known sign;
                          # small enough for the emulator
REC_HEIGHT, REC_WIDTH = 48, 480   # one line up to a 10:1 aspect ratio, 60 CTC steps


def det_preprocess(bgr: np.ndarray, size: int | tuple[int, int] = DET_SIZE) -> tuple[np.ndarray, float]:
    """Fit into the detector's (H, W) keeping the aspect ratio, pad bottom/right (boxes map back by one scale)."""
    size_h, size_w = (size, size) if isinstance(size, int) else size
    h, w = bgr.shape[:2]
    scale = min(size_h / h, size_w / w)
    nw, nh = min(size_w, max(1, round(w * scale))), min(size_h, max(1, round(h * scale)))
    canvas = np.zeros((size_h, size_w, 3), np.uint8)
    canvas[:nh, :nw] = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    x = (canvas.astype(np.float32) / 255.0 - 0.5) / 0.5   # PP-OCRv6 det: mean 0.5, std 0.5, BGR as read
    return x.transpose(2, 0, 1)[None], scale


def rec_preprocess(crop: np.ndarray) -> np.ndarray:
    h, w = crop.shape[:2]
    rw = min(REC_WIDTH, max(1, int(np.ceil(REC_HEIGHT * w / max(h, 1)))))
    resized = cv2.resize(crop, (rw, REC_HEIGHT)).astype(np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros((3, REC_HEIGHT, REC_WIDTH), np.float32)
    out[:, :, :rw] = (resized - 0.5) / 0.5
    return out[None]


def crop_quad(bgr: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """Perspective-crop a detected quadrilateral into an upright line image."""
    quad = quad.astype(np.float32)
    w = int(max(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[2] - quad[3])))
    h = int(max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2])))
    w, h = max(w, 1), max(h, 1)
    m = cv2.getPerspectiveTransform(quad, np.float32([[0, 0], [w, 0], [w, h], [0, h]]))
    crop = cv2.warpPerspective(bgr, m, (w, h), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    if h / w >= 1.5:  # vertical line: read it rotated, as PP-OCR does
        crop = np.rot90(crop)
    return np.ascontiguousarray(crop)


def dictionary_of(rec_model_path: str | Path) -> list[str]:
    model = onnx.load(str(rec_model_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise ValueError(f"text: {Path(rec_model_path).name} has no 'character' metadata (not a PP-OCR rec graph?)")
    return meta["character"].splitlines()


class TextReader:
    def __init__(self, det_path: str | Path, rec_path: str | Path, backend: str = "cpu", *,
                 threads: int | None = None, disable_cpu_fallback: bool = False,
                 min_score: float = 0.5, dictionary_path: str | Path | None = None):
        self.det = create_session(det_path, backend, threads=threads, disable_cpu_fallback=disable_cpu_fallback)
        self.rec = create_session(rec_path, backend, threads=threads, disable_cpu_fallback=disable_cpu_fallback)
        # The QDQ graph may lose the metadata; the float graph always has it.
        self.decoder = CTCLabelDecode(character=dictionary_of(dictionary_path or rec_path))
        shape = self.det.get_inputs()[0].shape
        if not all(isinstance(d, int) for d in shape[2:]):
            raise ValueError(f"text: {Path(det_path).name} has a dynamic input {shape}; build it with static shapes")
        self.det_size = (shape[2], shape[3])
        self.post = DBPostProcess(thresh=0.3, box_thresh=0.5, unclip_ratio=1.6)
        self.min_score = min_score

    def detect(self, bgr: np.ndarray) -> list[np.ndarray]:
        x, scale = det_preprocess(bgr, self.det_size)
        (prob,) = self.det.run(None, {self.det.get_inputs()[0].name: x})
        # Post-process in detector-input pixels, then undo our single scale.
        quads, _ = self.post(prob, self.det_size)
        h, w = bgr.shape[:2]
        out = []
        for q in quads:
            q = np.asarray(q, np.float32) / scale
            q[:, 0] = np.clip(q[:, 0], 0, w - 1)
            q[:, 1] = np.clip(q[:, 1], 0, h - 1)
            out.append(q)
        out.sort(key=lambda q: (round(float(q[:, 1].min()) / 10), float(q[:, 0].min())))  # reading order
        return out

    def recognize(self, crop: np.ndarray) -> tuple[str, float]:
        (logits,) = self.rec.run(None, {self.rec.get_inputs()[0].name: rec_preprocess(crop)})
        (text, score), = self.decoder(logits)[0]
        return text.strip(), float(score)

    def read(self, bgr: np.ndarray) -> list[TextLine]:
        if bgr.ndim != 3 or bgr.shape[2] != 3:
            raise ValueError(f"text: expected a BGR image HxWx3, got shape {bgr.shape}")
        lines = []
        for quad in self.detect(bgr):
            text, score = self.recognize(crop_quad(bgr, quad))
            if text and score >= self.min_score:
                box = (float(quad[:, 0].min()), float(quad[:, 1].min()),
                       float(quad[:, 0].max()), float(quad[:, 1].max()))
                lines.append(TextLine(text=text, score=score, box=box))
        return lines


_LEVEL = re.compile(r"\b(?:LEVEL|LVL|FLOOR|DECK|ETAGE|EBENE)\s*[:.]?\s*([A-Z0-9]{1,3})\b")
_PLEVEL = re.compile(r"\b(P\d{1,2}|B\d{1,2}|U\d{1,2}|UG\d?|L\d{1,2})\b")
_ROW_BAY = re.compile(r"\b([A-Z]{1,2})\s*[-–]\s*(\d{1,4})\b")
_ROW = re.compile(r"\b(?:ROW|ZONE|AREA|SECTION)\s*[:.]?\s*([A-Z0-9]{1,3})\b")
_BAY = re.compile(r"\b(?:BAY|SPACE|SPOT|STALL|NO\.?)\s*[:.]?\s*(\d{1,4})\b")


def parse_parking_sign(texts) -> dict[str, str]:
    """Parking-garage position from sign text: {"level": "P2", "row": "C", "bay": "14"} (only keys found).

    `texts` are strings or TextLines; all lines are read together ("P2 LEVEL C-14", or "LEVEL 3" and "ROW B").
    An explicit word ("LEVEL 3") wins over a bare code ("P2"); "C-14" style gives row and bay together.
    """
    joined = " ".join(t.text if isinstance(t, TextLine) else str(t) for t in texts).upper()
    joined = re.sub(r"\s+", " ", joined)
    found: dict[str, str] = {}
    if m := _PLEVEL.search(joined):
        found["level"] = m.group(1)
    if m := _LEVEL.search(joined):
        found.setdefault("level", m.group(1))
    rest = _PLEVEL.sub(" ", joined)  # "P2" must not read as row P, bay 2
    if m := _ROW_BAY.search(rest):
        found["row"], found["bay"] = m.group(1), m.group(2)
    if "row" not in found and (m := _ROW.search(rest)):
        found["row"] = m.group(1)
    if "bay" not in found and (m := _BAY.search(rest)):
        found["bay"] = m.group(1)
    return found
