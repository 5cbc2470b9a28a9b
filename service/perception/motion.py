"""Motion: OpenCV MOG2 background subtraction per camera, the nearly free gate in front of the detectors."""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from service.perception.types import Box, Motion

Polygon = tuple[tuple[float, float], ...]  # vertices in normalised frame coordinates (0..1)


@dataclass
class MotionConfig:
    analysis_width: int = 320          # subtract on a small copy: motion needs no detail and this keeps it ~1 ms
    history: int = 300
    var_threshold: float = 25.0
    detect_shadows: bool = True        # shadows are marked separately and not counted as motion
    min_region_fraction: float = 0.002  # connected blobs smaller than this share of the frame are noise
    ignore: tuple[Polygon, ...] = ()   # areas never counted (the car's own bonnet, a wiper, a dashboard clock)
    zones: dict[str, Polygon] = field(default_factory=dict)  # named areas whose moved fraction is reported

    def validate(self) -> None:
        if self.analysis_width < 32:
            raise ValueError(f"analysis_width: must be >= 32, got {self.analysis_width}")
        if self.history < 1:
            raise ValueError(f"history: must be >= 1, got {self.history}")
        if self.var_threshold <= 0:
            raise ValueError(f"var_threshold: must be > 0, got {self.var_threshold}")
        if not 0 <= self.min_region_fraction < 1:
            raise ValueError(f"min_region_fraction: must be in [0, 1), got {self.min_region_fraction}")
        for name, poly in [("ignore", p) for p in self.ignore] + [(f"zones.{k}", p) for k, p in self.zones.items()]:
            if len(poly) < 3:
                raise ValueError(f"{name}: a polygon needs at least 3 vertices, got {len(poly)}")
            if any(not (0 <= x <= 1 and 0 <= y <= 1) for x, y in poly):
                raise ValueError(f"{name}: vertices must be normalised to [0, 1]")


def _polygon_mask(shape: tuple[int, int], poly: Polygon) -> np.ndarray:
    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    pts = np.array([[x * (w - 1), y * (h - 1)] for x, y in poly], np.float32).round().astype(np.int32)
    cv2.fillPoly(mask, [pts], 255)
    return mask


class MotionDetector:
    """One per camera: the background model is the camera's own history."""

    def __init__(self, config: MotionConfig | None = None):
        self.config = config or MotionConfig()
        self.config.validate()
        self._subtractor = cv2.createBackgroundSubtractorMOG2(
            history=self.config.history, varThreshold=self.config.var_threshold,
            detectShadows=self.config.detect_shadows)
        self._shape: tuple[int, int] | None = None
        self._valid: np.ndarray | None = None
        self._zones: dict[str, np.ndarray] = {}
        self._kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))

    def _prepare_masks(self, shape: tuple[int, int]) -> None:
        self._shape = shape
        valid = np.full(shape, 255, np.uint8)
        for poly in self.config.ignore:
            valid[_polygon_mask(shape, poly) > 0] = 0
        self._valid = valid
        self._zones = {name: cv2.bitwise_and(_polygon_mask(shape, poly), valid)
                       for name, poly in self.config.zones.items()}

    def reset(self) -> None:
        """Forget the background (after the camera moved, or the car started driving)."""
        self.__init__(self.config)

    def update(self, bgr: np.ndarray, learning_rate: float = -1.0) -> Motion:
        if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
            raise ValueError(f"motion: expected a uint8 BGR image HxWx3, got {bgr.dtype} {bgr.shape}")
        h, w = bgr.shape[:2]
        scale = min(1.0, self.config.analysis_width / w)
        small = cv2.resize(bgr, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA) if scale < 1 else bgr
        if self._shape != small.shape[:2]:
            if self._shape is not None:  # resolution changed: the old background is meaningless
                self._subtractor = cv2.createBackgroundSubtractorMOG2(
                    history=self.config.history, varThreshold=self.config.var_threshold,
                    detectShadows=self.config.detect_shadows)
            self._prepare_masks(small.shape[:2])
        fg = self._subtractor.apply(small, learningRate=learning_rate)
        moving = np.where(fg == 255, 255, 0).astype(np.uint8)  # 127 marks shadows
        moving = cv2.morphologyEx(moving, cv2.MORPH_OPEN, self._kernel)
        moving = cv2.bitwise_and(moving, self._valid)
        valid_px = max(1, int(np.count_nonzero(self._valid)))
        fraction = float(np.count_nonzero(moving)) / valid_px
        regions: list[Box] = []
        min_area = self.config.min_region_fraction * moving.size
        n, _, stats, _ = cv2.connectedComponentsWithStats(moving, connectivity=8)
        inv = 1.0 / scale
        for i in range(1, n):
            x, y, bw, bh, area = stats[i]
            if area >= min_area:
                regions.append((float(x * inv), float(y * inv), float((x + bw) * inv), float((y + bh) * inv)))
        regions.sort(key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
        zones = {name: float(np.count_nonzero(cv2.bitwise_and(moving, zmask))) / max(1, int(np.count_nonzero(zmask)))
                 for name, zmask in self._zones.items()}
        return Motion(fraction=fraction, regions=tuple(regions), zones=zones)
