"""Real photos and rendered signs used to calibrate the QDQ graphs and to check accuracy on held-out inputs."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

# The repository's one photo set (sources in its README); the image build copies it, so no build reads tests/.
IMAGES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "sim" / "images"
CALIBRATION_PHOTOS = ("faces1.jpg", "faces2.jpg", "dog.jpg", "horses.jpg")
HELD_OUT_PHOTOS = ("faces3.jpg", "person.jpg")
# Sign texts for calibration; the held-out sign is the acceptance one, never seen by the calibrator.
CALIBRATION_SIGNS = ("LEVEL 3 ROW B", "EXIT 12", "P1 A-07", "SPEED LIMIT 80", "B2 ZONE D 118")
HELD_OUT_SIGNS = ("P2 LEVEL C-14", "B3 BAY 205")


def load_photo(name: str) -> np.ndarray:
    path = IMAGES_DIR / name
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"perception: cannot read test photo {path}")
    return img


def photos_digest(names) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode())
        h.update((IMAGES_DIR / n).read_bytes())
    return h.hexdigest()


def draw_sign(bgr: np.ndarray, text: str, origin: tuple[int, int] = (40, 20),
              scale: float = 1.6) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Draw a large white-on-dark plate with `text` onto a copy of a photo; returns (image, plate box)."""
    img = bgr.copy()
    thickness = max(2, round(scale * 2.5))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = round(th * 0.6)
    x, y = origin
    box = (x, y, min(img.shape[1] - 1, x + tw + 2 * pad), min(img.shape[0] - 1, y + th + base + 2 * pad))
    cv2.rectangle(img, box[:2], box[2:], (30, 30, 30), -1)
    cv2.putText(img, text, (x + pad, y + pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness,
                cv2.LINE_AA)
    return img, box


def sign_images(texts, photos) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """Each text on a different photo, place and size: (image, plate box)."""
    out = []
    for i, text in enumerate(texts):
        photo = load_photo(photos[i % len(photos)])
        out.append(draw_sign(photo, text, (30 + 20 * i, 20 + 30 * i), 1.2 + 0.2 * (i % 3)))
    return out


def sign_crops(texts, photos) -> list[np.ndarray]:
    return [img[y1:y2, x1:x2].copy() for img, (x1, y1, x2, y2) in sign_images(texts, photos)]


def sign_strips(texts, photos, margin: int = 24) -> list[np.ndarray]:
    """The plate plus some surrounding photo: what a reader sees after a sign was located."""
    out = []
    for img, (x1, y1, x2, y2) in sign_images(texts, photos):
        h, w = img.shape[:2]
        out.append(img[max(0, y1 - margin):min(h, y2 + margin), max(0, x1 - margin):min(w, x2 + margin)].copy())
    return out
