"""Frame decoding: header checks before any decoding (decompression bombs), decode to BGR, resize for the model.

Everything here is synchronous and meant for the decode thread pool, except `check_image`, which is cheap
(it reads a few header bytes) and runs on the event loop so bad input is refused before it is queued.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from incar.v1 import common_pb2

JPEG = common_pb2.IMAGE_ENCODING_JPEG
PNG = common_pb2.IMAGE_ENCODING_PNG
RAW_BGR = common_pb2.IMAGE_ENCODING_RAW_BGR
NV12 = common_pb2.IMAGE_ENCODING_NV12
ENCODING_NAMES = {JPEG: "JPEG", PNG: "PNG", RAW_BGR: "RAW_BGR", NV12: "NV12"}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the dimensions; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# A progressive JPEG is decoded in as many passes as it has scans (each touches every block), so a small file with
# thousands of scans costs tens of seconds: a "scan bomb". Encoders write about 10 (libjpeg's default progression
# for colour); 64 leaves room for any real encoder and bounds the cost to ~64 passes at the pixel limit.
MAX_JPEG_SCANS = 64
# Decode as the sensor delivered it: mount rotation is configuration, and the header size must match the pixels.
IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


class FrameError(ValueError):
    """Bad input in a frame; `field` names the offending Frame field (e.g. "image.width")."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ImageSpec:
    """What was checked before decoding: enough to decode without trusting anything else."""
    encoding: int
    width: int
    height: int


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the first start-of-frame segment, without decoding."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise FrameError("image.data", "not a JPEG (no start-of-image marker)")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise FrameError("image.data", f"corrupt JPEG: expected a marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:   # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            raise FrameError("image.data", f"corrupt JPEG: segment length {length} at byte {i}")
        if marker in JPEG_SOF:
            if i + 9 > n:
                break
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            return width, height
        i += 2 + length
    raise FrameError("image.data", "corrupt or truncated JPEG: no frame header (SOF) found")


def check_jpeg_scans(data: bytes, max_scans: int = MAX_JPEG_SCANS) -> None:
    """Refuse a JPEG with more scans than any encoder writes, before decoding it. Every start-of-scan marker is
    counted: inside entropy-coded data a 0xFF byte is always stuffed (FF 00), so FF DA is a real marker there
    (one inside an APPn thumbnail counts too, which only makes the check stricter)."""
    scans = data.count(b"\xff\xda")
    if scans > max_scans:
        raise FrameError("image.data", f"JPEG has {scans} scans, more than the limit of {max_scans} "
                                       f"(each scan is a full decoding pass)")


def png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise FrameError("image.data", "not a PNG (bad signature or no IHDR chunk)")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def check_image(image: common_pb2.Image, max_pixels: int) -> ImageSpec:
    """Validate an Image from its fields and header bytes only; raises FrameError naming the field."""
    encoding = image.encoding
    if encoding not in ENCODING_NAMES:
        if encoding == common_pb2.IMAGE_ENCODING_UNSPECIFIED:
            raise FrameError("image.encoding", "unspecified (JPEG, PNG, RAW_BGR or NV12)")
        raise FrameError("image.encoding", f"unknown value {encoding}")
    name = ENCODING_NAMES[encoding]
    data = image.data
    if not data:
        raise FrameError("image.data", "empty")
    if encoding in (JPEG, PNG):
        width, height = jpeg_size(data) if encoding == JPEG else png_size(data)
        if encoding == JPEG:
            check_jpeg_scans(data)
        for field_name, declared, actual in (("width", image.width, width), ("height", image.height, height)):
            if declared and declared != actual:
                raise FrameError(f"image.{field_name}", f"frame says {declared} but the {name} header says {actual}")
    else:
        width, height = image.width, image.height
        for field_name, value in (("width", width), ("height", height)):
            if not value:
                raise FrameError(f"image.{field_name}", f"required for {name} (got 0)")
        if encoding == NV12 and (width % 2 or height % 2):
            raise FrameError("image.width" if width % 2 else "image.height",
                             f"NV12 needs even dimensions, got {width}x{height}")
    if width == 0 or height == 0:
        raise FrameError("image.data", f"{name} header has a zero dimension ({width}x{height})")
    if width * height > max_pixels:
        raise FrameError("image.data", f"{width}x{height} is {width * height} pixels, over the limit of {max_pixels}")
    if encoding in (RAW_BGR, NV12):
        expected = width * height * 3 if encoding == RAW_BGR else width * height * 3 // 2
        if len(data) != expected:
            raise FrameError("image.data", f"{name} {width}x{height} needs {expected} bytes, got {len(data)}")
    return ImageSpec(encoding, width, height)


def decode(spec: ImageSpec, data: bytes) -> np.ndarray:
    """BGR uint8 HxWx3 from checked data (see check_image)."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    if spec.encoding == RAW_BGR:
        return buffer.reshape(spec.height, spec.width, 3)
    if spec.encoding == NV12:
        return cv2.cvtColor(buffer.reshape(spec.height * 3 // 2, spec.width), cv2.COLOR_YUV2BGR_NV12)
    image = cv2.imdecode(buffer, IMREAD_FLAGS)
    if image is None:
        raise FrameError("image.data", f"{ENCODING_NAMES[spec.encoding]} could not be decoded")
    if image.shape[1] != spec.width or image.shape[0] != spec.height:
        raise FrameError("image.data", f"decoded {image.shape[1]}x{image.shape[0]} but the header says "
                                       f"{spec.width}x{spec.height}")
    return image


def decode_checked(image: common_pb2.Image, max_pixels: int) -> np.ndarray:
    """An inline Image as BGR, header-checked (pixel limit, dimensions, lengths) before any decoding.
    The one decoder for every RPC that carries images; raises FrameError naming the field."""
    return decode(check_image(image, max_pixels), image.data)


def resize_for_model(original: np.ndarray, size: int) -> np.ndarray:
    """The model's square input; area averaging when shrinking (no aliasing), bilinear when enlarging."""
    height, width = original.shape[:2]
    if width == size and height == size:
        return original
    interpolation = cv2.INTER_AREA if width > size and height > size else cv2.INTER_LINEAR
    return cv2.resize(original, (size, size), interpolation=interpolation)


def decode_and_resize(spec: ImageSpec, data: bytes, size: int) -> tuple[np.ndarray, np.ndarray]:
    original = decode(spec, data)
    return original, resize_for_model(original, size)


def encode_nv12(bgr: np.ndarray) -> bytes:
    """BGR to NV12 (Y plane, then interleaved UV): what many camera ISPs deliver. For simulators and tests."""
    height, width = bgr.shape[:2]
    i420 = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420).reshape(-1)
    y_size, quarter = width * height, width * height // 4
    u = i420[y_size:y_size + quarter]
    v = i420[y_size + quarter:]
    uv = np.empty(2 * quarter, dtype=np.uint8)
    uv[0::2], uv[1::2] = u, v
    return i420[:y_size].tobytes() + uv.tobytes()
