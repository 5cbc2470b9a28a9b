"""OpenCV sources the hub pulls frames from: an image file or a folder of images (looped at the configured
fps), a video file (looped), an RTSP/HTTP URL or a V4L2 device. Each runs in its own thread (OpenCV reads
block) and hands frames to the hub on its event loop, waiting for the ack: backpressure is the ack.
A source that fails to open or stops delivering reconnects with exponential backoff and jitter."""
from __future__ import annotations

import asyncio
import concurrent.futures
import random
import re
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import structlog
from prometheus_client import Counter

from service.cameras.config import CameraConfig, CamerasConfig
from service.cameras.frames import FrameError

log = structlog.get_logger(__name__)

RECONNECTS = Counter("incar_camera_source_reconnects_total", "Times a pulled source was reopened after a failure",
                     ["camera"])

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
STREAM_URL = re.compile(r"^(rtsp|rtsps|http|https|udp|tcp)://", re.IGNORECASE)
V4L2 = re.compile(r"^(?:v4l2:(\d+)|/dev/video(\d+))$")
OPEN_TIMEOUT_MS = 5000
READ_TIMEOUT_MS = 5000


class SourceError(RuntimeError):
    """The source cannot deliver now (not found, not opened, read failed); the thread retries with backoff."""


def source_kind(uri: str) -> str:
    if STREAM_URL.match(uri):
        return "stream"
    if V4L2.match(uri):
        return "v4l2"
    path = Path(uri)
    if path.is_dir():
        return "folder"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    return "video"


class _ImageFiles:
    """Images from a file or a folder, in name order, forever; re-listed each pass so the folder may change."""

    def __init__(self, uri: str):
        self.path = Path(uri)
        self._queue: list[Path] = []

    def open(self) -> None:
        self._queue = self._list()

    def _list(self) -> list[Path]:
        if self.path.is_dir():
            files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif self.path.is_file():
            files = [self.path]
        else:
            raise SourceError(f"{self.path}: not found")
        if not files:
            raise SourceError(f"{self.path}: no images ({', '.join(IMAGE_SUFFIXES)})")
        return files

    def read(self) -> np.ndarray:
        if not self._queue:
            self._queue = self._list()
        path = self._queue.pop(0)
        image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None:
            raise SourceError(f"{path}: cannot be read as an image")
        return image

    def close(self) -> None:
        self._queue = []


class _Capture:
    """cv2.VideoCapture on a URL, a device or a video file (a file loops: it is rewound at its end)."""

    def __init__(self, uri: str, kind: str):
        self.uri, self.kind = uri, kind
        self.capture: cv2.VideoCapture | None = None

    def open(self) -> None:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, READ_TIMEOUT_MS]
        if self.kind == "v4l2":
            match = V4L2.match(self.uri)
            self.capture = cv2.VideoCapture(int(match.group(1) or match.group(2)), cv2.CAP_V4L2)
        elif self.kind == "stream":
            self.capture = cv2.VideoCapture(self.uri, cv2.CAP_FFMPEG, params)
        else:
            if not Path(self.uri).is_file():
                raise SourceError(f"{self.uri}: not found")
            self.capture = cv2.VideoCapture(self.uri, cv2.CAP_ANY)
        if not self.capture.isOpened():
            self.close()
            raise SourceError(f"{self.uri}: cannot be opened")

    def read(self) -> np.ndarray:
        ok, image = self.capture.read()
        if not ok and self.kind == "video":
            self.capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self.capture.read()
        if not ok or image is None:
            raise SourceError(f"{self.uri}: read failed")
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        return image

    def close(self) -> None:
        if self.capture is not None:
            self.capture.release()
            self.capture = None


class OpenCVSource:
    def __init__(self, camera: CameraConfig, hub, loop: asyncio.AbstractEventLoop, config: CamerasConfig):
        self.camera, self.hub, self.loop, self.config = camera, hub, loop, config
        self.kind = source_kind(camera.source)
        # Live sources pace themselves; files are replayed at the configured rate.
        self.interval = 1.0 / camera.fps if self.kind in ("folder", "image", "video") else 0.0
        self.reader = _ImageFiles(camera.source) if self.kind in ("folder", "image") else _Capture(camera.source,
                                                                                                     self.kind)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"camera-source-{camera.id}", daemon=True)
        self.sequence = 0
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def backoff_seconds(self) -> float:
        """Exponential in consecutive failures, capped, with +-20% jitter so cameras do not retry in step."""
        base = min(self.config.reconnect_max_seconds,
                   self.config.reconnect_initial_seconds * 2 ** max(0, self.failures - 1))
        return base * random.uniform(0.8, 1.2)

    def _run(self) -> None:
        log.info("camera_source_starting", camera=self.camera.id, source=self.camera.source, kind=self.kind)
        opened = False
        next_due = time.monotonic()
        while not self._stop.is_set():
            try:
                if not opened:
                    self.reader.open()
                    opened = True
                    log.info("camera_source_open", camera=self.camera.id, source=self.camera.source)
                image = self.reader.read()
            except SourceError as exc:
                self.reader.close()
                opened = False
                self.failures += 1
                RECONNECTS.labels(self.camera.id).inc()
                delay = self.backoff_seconds()
                log.warning("camera_source_failed", camera=self.camera.id, error=str(exc), retry_in_s=round(delay, 3))
                self._stop.wait(delay)
                continue
            self.failures = 0
            self.sequence += 1
            self._deliver(image, time.time())
            if self.interval:
                next_due = max(next_due + self.interval, time.monotonic())
                self._stop.wait(max(0.0, next_due - time.monotonic()))
        self.reader.close()
        log.info("camera_source_stopped", camera=self.camera.id)

    def _deliver(self, image: np.ndarray, capture_time: float) -> None:
        future = asyncio.run_coroutine_threadsafe(
            self.hub.submit_decoded(self.camera.id, image, capture_time, self.sequence), self.loop)
        try:
            while not self._stop.is_set():
                try:
                    future.result(timeout=0.5)
                    return
                except TimeoutError:
                    continue
            future.cancel()
        except FrameError as exc:
            log.warning("camera_source_frame_refused", camera=self.camera.id, error=str(exc))
        except (concurrent.futures.CancelledError, RuntimeError):
            pass   # the hub is stopping
        except Exception:
            log.exception("camera_source_deliver_failed", camera=self.camera.id)
