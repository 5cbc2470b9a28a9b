"""Camera pictures for the scripted day: crops of the real sim photos (deploy/sim/images) composited onto a
car-park backdrop, so the perception models see real people, faces, bicycles and a printed sign.

Each scene is a function of the seconds since it started, returning a BGR image; the day's camera feeders
encode whatever scene a camera shows now. An approach is a crop pasted at a growing size, a person lingering
sways by a few pixels (people do; a frozen picture would be a poster).
"""
from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from collections.abc import Callable

import cv2
import numpy as np

WIDTH, HEIGHT = 640, 480
Scene = Callable[[float], np.ndarray]

# Regions of the photos (x1, y1, x2, y2) holding the subject, measured on the originals.
PERSON_CROP = (170, 80, 290, 390)       # person.jpg: the standing person
BICYCLE_CROP = (110, 110, 580, 450)     # dog.jpg: the bicycle
DRIVER_CROP = (100, 120, 370, 400)      # faces1.jpg resized to 960x640: the left person (the enrolled driver)


@cache
def photo(images: Path, name: str) -> np.ndarray:
    image = cv2.imread(str(images / name))
    if image is None:
        raise FileNotFoundError(images / name)
    return image


def group_photo(images: Path) -> np.ndarray:
    return cv2.resize(photo(images, "faces1.jpg"), (960, 640), interpolation=cv2.INTER_AREA)


def driver_portrait_jpeg(images: Path) -> bytes:
    """The driver's enrolment photo: the left person of faces1.jpg alone."""
    x1, y1, x2, y2 = DRIVER_CROP
    ok, jpeg = cv2.imencode(".jpg", group_photo(images)[y1:y2, x1:x2])
    return jpeg.tobytes()


def backdrop(seed: int = 0) -> np.ndarray:
    """Tarmac and wall: a grey gradient with mild sensor noise (a new draw each frame, as a sensor gives)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(70, 150, HEIGHT, dtype=np.float32)[:, None, None]
    img = np.broadcast_to(ramp, (HEIGHT, WIDTH, 3)).copy() + rng.normal(0, 3, (HEIGHT, WIDTH, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def paste(canvas: np.ndarray, patch: np.ndarray, box) -> None:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(WIDTH, x2), min(HEIGHT, y2)
    if x2 > x1 and y2 > y1:
        canvas[y1:y2, x1:x2] = cv2.resize(patch, (x2 - x1, y2 - y1), interpolation=cv2.INTER_AREA)


def _crop(images: Path, name: str, box) -> np.ndarray:
    x1, y1, x2, y2 = box
    return photo(images, name)[y1:y2, x1:x2]


def _standing_box(height: float, centre_x: float, aspect: float):
    bottom = HEIGHT - 10
    return centre_x - height * aspect / 2, bottom - height, centre_x + height * aspect / 2, bottom


def empty(images: Path) -> Scene:
    """Nothing there: one still backdrop (changing noise would be motion to the cascade's motion gate)."""
    still = backdrop(0)
    return lambda t: still


def garage_with_sign(images: Path, level: str, bay: str) -> Scene:
    """The car pulling into a bay: a level and bay sign on the wall (printed text, what PP-OCR reads)."""
    def draw(t: float) -> np.ndarray:
        frame = cv2.resize(photo(images, "dog.jpg"), (WIDTH, HEIGHT))
        cv2.rectangle(frame, (360, 30), (630, 200), (40, 40, 40), -1)
        for i, line in enumerate((f"LEVEL {level}", f"BAY {bay}")):
            cv2.putText(frame, line, (375, 95 + 70 * i), cv2.FONT_HERSHEY_DUPLEX, 1.4, (255, 255, 255), 3)
        return frame
    return draw


def driver_walks_up(images: Path, seconds: float = 4.0) -> Scene:
    """The enrolled driver (with friends) walking up to the side camera: the group photo filling the frame, zooming
    in towards the driver as they come closer. Never pasted with a border: a photo's edge around a face is what
    Greeter's anti-spoofing refuses as a print held up to the camera."""
    group = group_photo(images)                       # 960x640
    gh, gw = group.shape[:2]

    def draw(t: float) -> np.ndarray:
        grow = min(1.0, t / seconds)
        h = int(gh * (1.0 - 0.3 * grow))              # the view narrows as the driver nears
        w = int(h * WIDTH / HEIGHT)
        x = int((gw - w) * 0.25 * (1 - grow))         # drifting onto the driver (left of the group)
        view = cv2.resize(group[gh - h:, x:x + w], (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
        noise = np.random.default_rng(int(t * 10)).normal(0, 2, view.shape)
        return np.clip(view + noise, 0, 255).astype(np.uint8)
    return draw


def _standing(images: Path, name: str, box, height: Callable[[float], float],
              centre_x: Callable[[float], float]) -> Scene:
    """A crop standing on the ground, its height and centre functions of the time."""
    patch = _crop(images, name, box)
    aspect = patch.shape[1] / patch.shape[0]

    def draw(t: float) -> np.ndarray:
        frame = backdrop(int(t * 10))
        paste(frame, patch, _standing_box(height(t), centre_x(t), aspect))
        return frame
    return draw


def person_lingering(images: Path, height_fraction: float = 0.75) -> Scene:
    """A stranger standing a couple of metres from the parked car, swaying slightly."""
    return _standing(images, "person.jpg", PERSON_CROP, lambda t: HEIGHT * height_fraction,
                     lambda t: WIDTH / 2 + 6 * math.sin(t * 1.3))


def child_in_back(images: Path) -> Scene:
    """The rear cabin camera: a child's face in the rear seat (a face of faces2.jpg), moving a little."""
    source = photo(images, "faces2.jpg")

    def draw(t: float) -> np.ndarray:
        frame = np.full((HEIGHT, WIDTH, 3), 45, np.uint8)
        dx = int(5 * math.sin(t * 2.0))
        h = int(HEIGHT * 0.8)
        w = int(h * source.shape[1] / source.shape[0])
        paste(frame, source, (WIDTH - w + dx, HEIGHT - h, WIDTH + dx, HEIGHT))
        return frame
    return draw


def cyclist_approaching(images: Path, seconds: float = 3.0) -> Scene:
    """A bicycle coming up from behind along the side of the car: the crop looming quickly, then repeating."""
    return _standing(images, "dog.jpg", BICYCLE_CROP, lambda t: HEIGHT * (0.2 + 0.7 * (t % seconds) / seconds),
                     lambda t: WIDTH / 2)
