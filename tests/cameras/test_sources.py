"""OpenCV sources named in config: a folder looped, a missing source retried with backoff until it appears."""
from __future__ import annotations

import shutil

import cv2
import grpc
import numpy as np
import pytest

from tests.cameras.camera_helpers import IMAGES, lockstep, make_frame, metric, unique, wait_for
from incar.v1 import cameras_pb2, common_pb2
from service.cameras.config import CameraConfig, CamerasConfig
from service.cameras.sources import OpenCVSource, source_kind


async def test_folder_source_loops_the_images(serve, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for path in IMAGES:
        shutil.copy(path, folder / path.name)
    camera_id = unique("folder")
    served = await serve(cameras=[{"id": camera_id, "role": "exterior", "position": "rear",
                                   "source": str(folder), "fps": 50}])
    n = len(IMAGES)
    await wait_for(lambda: len(served.hub.history(camera_id, 60)) >= 2 * n + 1, what="two passes over the folder")
    history = served.hub.history(camera_id, 60)
    expected = [cv2.imread(str(path)) for path in sorted(IMAGES)]
    for i, frame in enumerate(history[:2 * n]):
        assert np.array_equal(frame.original, expected[i % n]), f"frame {i} is not {sorted(IMAGES)[i % n].name}"
        assert frame.image.shape == (768, 768, 3)
        assert (frame.role, frame.position) == ("exterior", "rear")
    assert [f.sequence for f in history] == sorted(f.sequence for f in history)
    status = await served.stub.GetCameraStatus(cameras_pb2.GetCameraStatusRequest(camera_id=camera_id))
    assert status.up and status.source == str(folder) and status.role == common_pb2.CAMERA_ROLE_EXTERIOR
    assert status.frames_per_second > 0


async def test_missing_source_reconnects_with_backoff_and_comes_up(serve, tmp_path):
    image = tmp_path / "late" / "cabin.jpg"
    camera_id = unique("late")
    served = await serve(reconnect_initial_seconds=0.05, reconnect_max_seconds=0.2, watchdog_timeout_seconds=0.5,
                         cameras=[{"id": camera_id, "source": str(image), "fps": 20}])
    states = []
    served.hub.on_camera_state(lambda cid, up, reason: states.append((up, reason)))
    await wait_for(lambda: metric("incar_camera_source_reconnects_total", camera=camera_id) >= 3,
                   what="retries while the file is missing")
    assert served.hub.latest(camera_id) is None
    await wait_for(lambda: states, what="the never-seen camera reported down")
    assert states[0] == (False, "no frame within 0.5 s of start")
    image.parent.mkdir()
    shutil.copy(IMAGES[0], image)
    await wait_for(lambda: served.hub.latest(camera_id) is not None, what="frames once the file exists")
    await wait_for(lambda: states[-1][0], what="camera up")
    # frames from a pulled camera are not accepted over gRPC
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await lockstep(served.stub, [make_frame(camera_id)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is fed by its configured source" in info.value.details()


def test_backoff_doubles_up_to_the_cap():
    config = CamerasConfig(reconnect_initial_seconds=0.5, reconnect_max_seconds=4.0)
    source = OpenCVSource(CameraConfig(id="x", source="rtsp://192.0.2.1/stream"), hub=None, loop=None, config=config)
    delays = []
    for failures in range(1, 7):
        source.failures = failures
        delays.append(source.backoff_seconds())
    for delay, base in zip(delays, [0.5, 1, 2, 4, 4, 4]):
        assert 0.8 * base <= delay <= 1.2 * base


def test_source_kinds(tmp_path):
    assert source_kind("rtsp://cam.local/live") == "stream"
    assert source_kind("/dev/video2") == source_kind("v4l2:0") == "v4l2"
    assert source_kind(str(tmp_path)) == "folder"
    assert source_kind(str(tmp_path / "x.JPG")) == "image"
    assert source_kind(str(tmp_path / "drive.mp4")) == "video"


async def test_video_file_source_rewinds_at_its_end(serve, tmp_path):
    video = tmp_path / "drive.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    assert writer.isOpened(), "this OpenCV build cannot write MJPG/AVI"
    for i in range(4):
        frame = np.full((240, 320, 3), 60 * i, np.uint8)
        writer.write(frame)
    writer.release()
    camera_id = unique("video")
    served = await serve(cameras=[{"id": camera_id, "role": "exterior", "source": str(video), "fps": 50}])
    await wait_for(lambda: len(served.hub.history(camera_id, 60)) >= 9, what="more frames than the video has")
    levels = [int(round(f.original.mean() / 60)) for f in served.hub.history(camera_id, 60)[:9]]
    assert levels == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert metric("incar_camera_source_reconnects_total", camera=camera_id) == 0
