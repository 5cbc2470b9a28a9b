"""Header checks, decoding and the ring buffer, without a server."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from incar.v1 import common_pb2
from service.cameras.config import CamerasConfig, CameraConfig
from service.cameras.frames import (FrameError, check_image, decode, decode_and_resize, encode_nv12, jpeg_size,
                                    png_size)
from service.cameras.ring import CameraFrame, FrameRing
from service.config import ConfigError, load_config

from tests.cameras.camera_helpers import IMAGES, jpeg_bytes

MAX = 4096 * 4096


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_jpeg_header_size_matches_decoded_image(path):
    data = path.read_bytes()
    height, width = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2]
    assert jpeg_size(data) == (width, height)


def test_png_decode_and_resize_to_model_size():
    original = cv2.imread(str(IMAGES[0]))
    ok, png = cv2.imencode(".png", original)
    assert ok
    image = common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_PNG, data=png.tobytes())
    spec = check_image(image, MAX)
    assert (spec.width, spec.height) == png_size(png.tobytes()) == (original.shape[1], original.shape[0])
    decoded, resized = decode_and_resize(spec, image.data, 768)
    assert np.array_equal(decoded, original)   # PNG is lossless
    assert resized.shape == (768, 768, 3)


def test_nv12_round_trip_is_close_to_the_original():
    original = cv2.resize(cv2.imread(str(IMAGES[0])), (320, 240))
    data = encode_nv12(original)
    image = common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_NV12, width=320, height=240, data=data)
    decoded = decode(check_image(image, MAX), data)
    assert decoded.shape == original.shape
    # chroma is subsampled 2x2, so compare loosely
    assert np.abs(decoded.astype(int) - original.astype(int)).mean() < 8


def test_raw_bgr_is_taken_as_is():
    original = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    image = common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_RAW_BGR, width=64, height=48,
                             data=original.tobytes())
    assert np.array_equal(decode(check_image(image, MAX), image.data), original)


def test_bomb_is_refused_from_the_header_before_decoding():
    data = bytearray(jpeg_bytes())
    width, height = jpeg_size(bytes(data))
    # rewrite the SOF dimensions to 60000x60000: 3.6 gigapixels
    index = bytes(data).find(height.to_bytes(2, "big") + width.to_bytes(2, "big"))
    data[index:index + 4] = (60000).to_bytes(2, "big") * 2
    image = common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG, data=bytes(data))
    with pytest.raises(FrameError, match="60000x60000 is 3600000000 pixels, over the limit") as info:
        check_image(image, MAX)
    assert info.value.field == "image.data"


def frame(camera_id, t, size=(8, 8)):
    image = np.zeros((*size, 3), np.uint8)
    return CameraFrame(camera_id, "cabin", "front", t, t, image, image, 0)


def test_ring_keeps_the_configured_seconds():
    ring = FrameRing(seconds=1.0, max_bytes=1 << 30)
    for i in range(30):
        ring.append(frame("a", 100 + i * 0.1))
    assert [round(f.capture_time - 100, 1) for f in ring.since(0)][0] == 1.9
    assert ring.latest().capture_time == pytest.approx(102.9)
    assert len(ring.since(102.45)) == 5


def test_ring_keeps_within_max_bytes_but_always_the_newest():
    ring = FrameRing(seconds=100, max_bytes=8 * 8 * 3 * 4)
    for i in range(10):
        ring.append(frame("a", i))
    assert len(ring) == 4 and ring.nbytes == 8 * 8 * 3 * 4
    ring.append(frame("a", 11, size=(64, 64)))
    assert len(ring) == 1 and ring.latest().capture_time == 11


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"cameras\.cameras\[0\]\.role: expected one of cabin, exterior"):
        load_config(env={}, overrides=["cameras.cameras=[{id: a, role: trunk}]"])
    with pytest.raises(ConfigError, match=r"cameras\.max_frame_age_seconds: must be > 0"):
        load_config(env={}, overrides=["cameras.max_frame_age_seconds=0"])
    config = load_config(env={}, overrides=["cameras.cameras=[{id: rear, role: exterior, position: rear, "
                                            "source: /dev/video0}]"])
    assert config.cameras.cameras == [CameraConfig(id="rear", role="exterior", position="rear",
                                                   source="/dev/video0")]
    assert isinstance(config.cameras, CamerasConfig)
