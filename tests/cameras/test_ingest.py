"""Cameras.StreamFrames end to end: a real grpc.aio server on a free port, real JPEGs, real clients."""
from __future__ import annotations

import asyncio
import threading
import time

import cv2
import grpc
import numpy as np
import pytest

from tests.cameras.camera_helpers import IMAGES, lockstep, make_frame, metric, unique, wait_for
from incar.v1 import cameras_pb2, common_pb2


async def test_two_cameras_stream_real_jpegs_at_once(serve):
    served = await serve()
    cameras = [unique("cabin"), unique("rear")]
    images = {path.name: path.read_bytes() for path in IMAGES}
    consumed: list = []

    async def consume():
        async for frame in served.hub.frames():
            consumed.append(frame)

    consumer = asyncio.create_task(consume())

    async def camera(camera_id, role, position):
        frames = [make_frame(camera_id, data, role=role, position=position, sequence=i + 1)
                  for i, data in enumerate(list(images.values()) * 2)]
        return await lockstep(served.stub, frames)

    cabin_acks, rear_acks = await asyncio.gather(
        camera(cameras[0], common_pb2.CAMERA_ROLE_CABIN, common_pb2.MOUNT_POSITION_CABIN_FRONT),
        camera(cameras[1], common_pb2.CAMERA_ROLE_EXTERIOR, common_pb2.MOUNT_POSITION_REAR))
    for camera_id, acks in zip(cameras, (cabin_acks, rear_acks)):
        assert [a.sequence for a in acks] == list(range(1, 7))
        assert all(a.accepted and a.camera_id == camera_id for a in acks), acks
        latest = served.hub.latest(camera_id)
        assert latest.image.shape == (768, 768, 3)
        # the original is kept as sent: the last frame was the last image file
        expected = cv2.imdecode(np.frombuffer(list(images.values())[-1], np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(latest.original, expected)
        assert not latest.image.flags.writeable
        assert len(served.hub.history(camera_id, 60)) == 6

    listing = await served.stub.ListCameras(cameras_pb2.ListCamerasRequest())
    by_id = {c.camera_id: c for c in listing.cameras}
    assert by_id[cameras[0]].role == common_pb2.CAMERA_ROLE_CABIN
    assert by_id[cameras[1]].position == common_pb2.MOUNT_POSITION_REAR
    for camera_id in cameras:
        status = by_id[camera_id]
        assert status.up and status.source == "grpc" and status.frames_accepted == 6 and status.buffered_frames == 6
        assert metric("incar_camera_frame_age_seconds_count", camera=camera_id) == 6
    await wait_for(lambda: {f.camera_id for f in consumed} == set(cameras), what="the analysis consumer")
    consumer.cancel()


async def test_overload_drops_latest_wins_and_counts(serve):
    served = await serve(decode_threads=1, max_pending_frames=1)
    camera_id = unique("busy")
    # Keep the only decode thread busy so frames pile up deterministically.
    release = threading.Event()
    blocker = served.hub._pool.submit(release.wait, 30)
    call = served.stub.StreamFrames()
    for sequence in range(1, 6):
        await call.write(make_frame(camera_id, sequence=sequence))
    await call.done_writing()
    acks = []
    # Replaced frames are answered at once; at most two frames (decoding + waiting) are left.
    while len(acks) < 3:
        acks.append(await call.read())
    release.set()
    blocker.result(5)
    while (ack := await call.read()) is not grpc.aio.EOF:
        acks.append(ack)
    assert len(acks) == 5
    dropped = [a for a in acks if not a.accepted]
    accepted = [a for a in acks if a.accepted]
    assert len(dropped) >= 3 and len(accepted) >= 1
    assert {a.drop_reason for a in dropped} == {cameras_pb2.DROP_REASON_OVERLOAD}
    assert all(a.queue_depth >= 1 and "replaced" in a.detail for a in dropped)
    assert 5 in {a.sequence for a in accepted}, "the newest frame wins"
    assert metric("incar_camera_frames_dropped_total", camera=camera_id, reason="overload") == len(dropped)
    status = await served.stub.GetCameraStatus(cameras_pb2.GetCameraStatusRequest(camera_id=camera_id))
    assert status.frames_dropped == len(dropped) and status.frames_accepted == len(accepted)


async def test_watchdog_marks_a_silent_camera_down_then_up(serve):
    served = await serve(watchdog_timeout_seconds=0.3)
    camera_id = unique("quiet")
    transitions = []
    served.hub.on_camera_state(lambda cid, up, reason: transitions.append((cid, up, reason)))
    get = cameras_pb2.GetCameraStatusRequest(camera_id=camera_id)

    await lockstep(served.stub, [make_frame(camera_id, sequence=1)])
    assert (await served.stub.GetCameraStatus(get)).up
    assert metric("incar_camera_up", camera=camera_id) == 1
    await wait_for(lambda: (camera_id, False) in [(c, u) for c, u, _ in transitions], what="camera down")
    status = await served.stub.GetCameraStatus(get)
    assert not status.up and status.frames_per_second == 0
    assert metric("incar_camera_up", camera=camera_id) == 0
    assert "no frame for 0.3 s" in [r for c, u, r in transitions if not u][0]

    acks = await lockstep(served.stub, [make_frame(camera_id, sequence=2)])
    assert acks[0].accepted
    assert [(c, u) for c, u, _ in transitions] == [(camera_id, True), (camera_id, False), (camera_id, True)]
    assert (await served.stub.GetCameraStatus(get)).up


async def test_stale_and_out_of_order_frames_are_dropped_and_age_is_measured(serve):
    served = await serve(max_frame_age_seconds=2.0)
    camera_id = unique("clock")
    now = time.time()
    acks = await lockstep(served.stub, [
        make_frame(camera_id, sequence=1, capture_time=now - 0.5),
        make_frame(camera_id, sequence=2, capture_time=now - 10),    # stale
        make_frame(camera_id, sequence=3, capture_time=now - 0.8),   # before frame 1
        make_frame(camera_id, sequence=4, capture_time=now - 0.5),   # same time as frame 1
        make_frame(camera_id, sequence=5, capture_time=now - 0.1),
    ])
    assert [a.accepted for a in acks] == [True, False, False, False, True]
    assert acks[1].drop_reason == cameras_pb2.DROP_REASON_STALE and "max_frame_age_seconds is 2" in acks[1].detail
    assert acks[2].drop_reason == acks[3].drop_reason == cameras_pb2.DROP_REASON_OUT_OF_ORDER
    assert metric("incar_camera_frames_dropped_total", camera=camera_id, reason="stale") == 1
    assert metric("incar_camera_frames_dropped_total", camera=camera_id, reason="out_of_order") == 2
    # the first frame was captured 0.5 s before it was sent, so its measured age is at least that
    assert metric("incar_camera_frame_age_seconds_count", camera=camera_id) == 2
    assert metric("incar_camera_frame_age_seconds_bucket", camera=camera_id, le="0.5") <= 1
    status = await served.stub.GetCameraStatus(cameras_pb2.GetCameraStatusRequest(camera_id=camera_id))
    assert status.last_frame_age_s >= 0.1
    assert status.last_frame_time.ToNanoseconds() == pytest.approx((now - 0.1) * 1e9, abs=1e3)


async def test_governor_rate_limit_drops_before_decoding(serve):
    served = await serve()
    camera_id = unique("gov")
    served.hub.set_analysis_rate(camera_id, 0)
    now = time.time()
    acks = await lockstep(served.stub, [make_frame(camera_id, sequence=1, capture_time=now - 0.2)])
    assert acks[0].drop_reason == cameras_pb2.DROP_REASON_RATE_LIMITED
    served.hub.set_analysis_rate(camera_id, 2.0)   # at most one frame per 0.5 s of capture time
    acks = await lockstep(served.stub, [make_frame(camera_id, sequence=s, capture_time=now - 0.15 + s * 0.01)
                                        for s in (2, 3)])
    assert [a.accepted for a in acks] == [True, False]
    assert metric("incar_camera_frames_dropped_total", camera=camera_id, reason="rate_limited") == 2
    served.hub.set_analysis_rate(camera_id, None)
    acks = await lockstep(served.stub, [make_frame(camera_id, sequence=4)])
    assert acks[0].accepted


def _sof_only_jpeg(width: int, height: int) -> bytes:
    """A JPEG with a valid frame header and nothing to decode (no tables, no scan)."""
    sof = b"\xff\xc0" + (17).to_bytes(2, "big") + b"\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big") \
        + b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def _png() -> bytes:
    return cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))[1].tobytes()


BAD_INPUTS = {
    "undecodable_jpeg": (dict(data=_sof_only_jpeg(64, 48)), "image.data: JPEG could not be decoded"),
    "not_a_jpeg": (dict(data=b"hello, this is not an image"), "image.data: not a JPEG"),
    "jpeg_labelled_png": (dict(encoding=common_pb2.IMAGE_ENCODING_PNG), "image.data: not a PNG"),
    "empty_data": (dict(data=b""), "image.data: empty"),
    "width_disagrees_with_jpeg": (dict(width=640), "image.width: frame says 640 but the JPEG header says 768"),
    "height_disagrees_with_png": (dict(data=_png(), encoding=common_pb2.IMAGE_ENCODING_PNG, height=17),
                                  "image.height: frame says 17 but the PNG header says 16"),
    "raw_wrong_length": (dict(encoding=common_pb2.IMAGE_ENCODING_RAW_BGR, width=768, height=768, data=b"\0" * 1000),
                         "image.data: RAW_BGR 768x768 needs 1769472 bytes, got 1000"),
    "raw_zero_width": (dict(encoding=common_pb2.IMAGE_ENCODING_RAW_BGR, width=0, height=2, data=b"\0" * 6),
                       "image.width: required for RAW_BGR (got 0)"),
    "nv12_wrong_length": (dict(encoding=common_pb2.IMAGE_ENCODING_NV12, width=64, height=48, data=b"\0" * 64 * 48 * 3),
                          "image.data: NV12 64x48 needs 4608 bytes, got 9216"),
    "nv12_odd_height": (dict(encoding=common_pb2.IMAGE_ENCODING_NV12, width=64, height=47, data=b"\0" * 10),
                        "image.height: NV12 needs even dimensions"),
    "raw_huge": (dict(encoding=common_pb2.IMAGE_ENCODING_RAW_BGR, width=100000, height=100000, data=b"\0" * 30),
                 "image.data: 100000x100000 is 10000000000 pixels, over the limit"),
    "jpeg_zero_height": (dict(data=_sof_only_jpeg(64, 0)), "image.data: JPEG header has a zero dimension (64x0)"),
    "encoding_unspecified": (dict(encoding=common_pb2.IMAGE_ENCODING_UNSPECIFIED), "image.encoding: unspecified"),
    "encoding_unknown": (dict(encoding=42), "image.encoding: unknown value 42"),
    "role_unknown": (dict(role=9), "role: unknown value 9"),
    "position_unknown": (dict(position=77), "position: unknown value 77"),
    "role_changed": (dict(role=common_pb2.CAMERA_ROLE_EXTERIOR), "role: camera is cabin, frame says exterior"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
async def test_bad_input_ends_that_stream_with_invalid_argument(serve, case):
    served = await serve()
    camera_id, other = unique("bad"), unique("good")
    fields, expected = BAD_INPUTS[case]
    call = served.stub.StreamFrames()
    await call.write(make_frame(camera_id, sequence=1))
    assert (await call.read()).accepted
    await call.write(make_frame(camera_id, sequence=2, **fields))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"camera {camera_id!r}: {expected}"), info.value.details()
    # the server, other cameras and this camera (on a new stream) keep working
    acks = await lockstep(served.stub, [make_frame(other, sequence=1), make_frame(camera_id, sequence=3)])
    assert all(a.accepted for a in acks), acks


@pytest.mark.parametrize("frame_fields, expected", [
    (dict(camera_id=""), "camera_id: empty"),
    (dict(camera_id="has space"), "camera_id: expected 1-64 characters"),
    (dict(role=common_pb2.CAMERA_ROLE_UNSPECIFIED), "role: unspecified on the camera's first frame"),
])
async def test_bad_identity_on_first_frame(serve, frame_fields, expected):
    served = await serve()
    camera_id = frame_fields.pop("camera_id", unique("new"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await lockstep(served.stub, [make_frame(camera_id, **frame_fields)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in info.value.details()


async def test_one_camera_keeps_streaming_while_another_sends_garbage(serve):
    served = await serve()
    good, bad = unique("good"), unique("bad")

    async def steady():
        return await lockstep(served.stub, [make_frame(good, sequence=s) for s in range(1, 9)])

    async def garbage():
        for attempt in range(3):   # the broken camera reconnects and fails again each time
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await lockstep(served.stub, [make_frame(bad, b"\xff\xd8garbage", sequence=attempt + 1)])
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    acks, _ = await asyncio.gather(steady(), garbage())
    assert all(a.accepted for a in acks)
    assert metric("incar_camera_frames_invalid_total", field="image.data") >= 3


async def test_unknown_cameras_refused_when_not_allowed(serve):
    served = await serve(allow_unknown_cameras=False, cameras=[
        {"id": "declared", "role": "exterior", "position": "left"}])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await lockstep(served.stub, [make_frame("stranger")])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "camera_id: unknown camera 'stranger'" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.GetCameraStatus(cameras_pb2.GetCameraStatusRequest(camera_id="stranger"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # a declared camera may stream without repeating its role; its configured role and position apply
    acks = await lockstep(served.stub, [make_frame("declared", role=common_pb2.CAMERA_ROLE_UNSPECIFIED,
                                                   position=common_pb2.MOUNT_POSITION_UNSPECIFIED)])
    assert acks[0].accepted
    frame = served.hub.latest("declared")
    assert (frame.role, frame.position) == ("exterior", "left")


async def test_get_status_of_unknown_camera_is_not_found(serve):
    served = await serve()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.GetCameraStatus(cameras_pb2.GetCameraStatusRequest(camera_id="nobody"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.GetCameraStatus(cameras_pb2.GetCameraStatusRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_raw_bgr_768_frame_fits_and_nv12_decodes(serve):
    served = await serve()
    camera_id = unique("raw")
    bgr = cv2.resize(cv2.imread(str(IMAGES[0])), (768, 768))
    nv12_source = cv2.resize(bgr, (640, 480))
    from service.cameras.frames import encode_nv12
    acks = await lockstep(served.stub, [
        make_frame(camera_id, bgr.tobytes(), encoding=common_pb2.IMAGE_ENCODING_RAW_BGR, width=768, height=768,
                   sequence=1),
        make_frame(camera_id, encode_nv12(nv12_source), encoding=common_pb2.IMAGE_ENCODING_NV12, width=640,
                   height=480, sequence=2)])
    assert all(a.accepted for a in acks), acks
    history = served.hub.history(camera_id, 60)
    assert np.array_equal(history[0].original, bgr)
    assert history[1].original.shape == (480, 640, 3) and history[1].image.shape == (768, 768, 3)


async def test_slow_analysis_consumer_gets_the_newest_frame_per_camera(serve):
    served = await serve()
    camera_id = unique("slow")
    frames = served.hub.frames()
    first = asyncio.ensure_future(frames.__anext__())   # registers the consumer
    await asyncio.sleep(0)
    await lockstep(served.stub, [make_frame(camera_id, sequence=1)])
    assert (await first).sequence == 1
    # the consumer is busy elsewhere while three more frames arrive: it then sees only the newest
    await lockstep(served.stub, [make_frame(camera_id, sequence=s) for s in (2, 3, 4)])
    assert (await frames.__anext__()).sequence == 4
    assert [f.sequence for f in served.hub.history(camera_id, 60)] == [1, 2, 3, 4]
    await frames.aclose()


async def test_camera_limit_is_resource_exhausted(serve):
    served = await serve(max_cameras=1)
    assert (await lockstep(served.stub, [make_frame(unique("first"))]))[0].accepted
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await lockstep(served.stub, [make_frame(unique("second"))])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_cameras (1) reached" in info.value.details()
