"""Hostile camera clients (issue 13, holes 2-5): a progressive-JPEG scan bomb, capture times far off the server
clock, garbage frames filling the camera registry, rings held after cameras left, a sender that never reads
its acks. Real gRPC on a real port (the `serve` fixture)."""
from __future__ import annotations

import asyncio
import time

import cv2
import grpc
import numpy as np

from incar.v1 import cameras_pb2
from tests.cameras.camera_helpers import lockstep, make_frame, unique, wait_for
from tests.security.bombs import progressive_scan_bomb


async def _refusal(stub, frame) -> grpc.aio.AioRpcError:
    try:
        await lockstep(stub, [frame])
    except grpc.aio.AioRpcError as err:
        return err
    raise AssertionError("the frame was not refused")


async def test_a_scan_bomb_is_refused_before_decoding_and_the_hub_keeps_serving(serve):
    served = await serve(max_pixels=4096 * 4096)
    camera = unique("bomb")
    err = await _refusal(served.stub, make_frame(camera, progressive_scan_bomb()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "30006 scans" in err.details() and "image.data" in err.details(), err.details()
    assert camera not in served.hub.camera_ids()
    good = unique("good")
    acks = await lockstep(served.stub, [make_frame(good)])
    assert acks[0].accepted, acks[0]


async def test_capture_times_far_from_the_server_clock_are_refused_and_real_frames_still_flow(serve):
    served = await serve()
    camera = unique("clock")
    assert (await lockstep(served.stub, [make_frame(camera)]))[0].accepted
    ahead = make_frame(camera, capture_time=time.time() + 80 * 365 * 86400)
    err = await _refusal(served.stub, ahead)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "capture_time" in err.details(), err.details()
    huge = make_frame(camera)
    huge.capture_time.seconds, huge.capture_time.nanos = 2 ** 40, 0
    err = await _refusal(served.stub, huge)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "ahead of the server clock" in err.details()
    ancient = make_frame(camera, capture_time=10.0)
    err = await _refusal(served.stub, ancient)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "behind the server clock" in err.details()
    bad_nanos = make_frame(camera)
    bad_nanos.capture_time.nanos = -5
    assert (await _refusal(served.stub, bad_nanos)).code() == grpc.StatusCode.INVALID_ARGUMENT
    # the refused frames left no trace: the next real frame is in order, and ListCameras answers
    assert (await lockstep(served.stub, [make_frame(camera)]))[0].accepted
    listed = await served.stub.ListCameras(cameras_pb2.ListCamerasRequest())
    assert camera in [c.camera_id for c in listed.cameras]


async def test_invalid_frames_do_not_register_cameras_and_undecodable_ones_give_their_slot_back(serve):
    served = await serve(max_cameras=4)
    for _ in range(10):         # refused on the header: never registered
        err = await _refusal(served.stub, make_frame(unique("junk"), b"\xff\xd8garbage"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    jpeg = cv2.imencode(".jpg", np.full((64, 64, 3), 90, np.uint8))[1].tobytes()
    sof = jpeg.index(b"\xff\xc0")
    undecodable = jpeg[:sof + 4] + b"\x0c" + jpeg[sof + 5:]   # a readable header, a sample precision libjpeg refuses
    for _ in range(6):          # more than max_cameras: each gives its slot back when its decode fails
        camera = unique("broken")
        err = await _refusal(served.stub, make_frame(camera, undecodable))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "could not be decoded" in err.details()
        assert camera not in served.hub.camera_ids(), "an undecodable camera kept its registry slot"
    assert served.hub.camera_ids() == []
    for _ in range(4):
        assert (await lockstep(served.stub, [make_frame(unique("real"))]))[0].accepted


async def test_cameras_that_left_release_their_rings_and_are_forgotten(serve):
    served = await serve(watchdog_timeout_seconds=0.5, forget_after_seconds=1.5)
    camera = unique("leaver")
    frames = [make_frame(camera, sequence=i, capture_time=time.time() + i * 0.001) for i in range(5)]
    await lockstep(served.stub, frames)
    assert len(served.hub.history(camera, 10.0)) > 1
    await wait_for(lambda: not served.hub.camera_status(camera).up, what="the camera to be down")
    await wait_for(lambda: camera not in served.hub.camera_ids() or len(served.hub.history(camera, 10.0)) <= 1,
                   what="the ring to be released")
    await wait_for(lambda: camera not in served.hub.camera_ids(), what="the camera to be forgotten")
    listed = await served.stub.ListCameras(cameras_pb2.ListCamerasRequest())
    assert camera not in [c.camera_id for c in listed.cameras]
    assert (await lockstep(served.stub, [make_frame(camera)]))[0].accepted    # it may come back


async def test_a_sender_that_never_reads_its_acks_is_held_by_flow_control(serve):
    """The old servicer read every frame at once and kept every finished ack: memory grew without bound."""
    served = await serve(max_unacked_frames=4)
    camera = unique("deaf")
    tiny = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))[1].tobytes()
    total = 20_000
    # no BDP probing: the client's receive window stays at 64 KiB, so unread acks fill it soon
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{served.port}", options=[("grpc.http2.bdp_probe", 0)])
    stub = type(served.stub)(channel)
    call = stub.StreamFrames()

    async def write_all():
        start = time.time()
        for i in range(total):
            await call.write(make_frame(camera, tiny, sequence=i, capture_time=start + i * 1e-6))

    writer = asyncio.create_task(write_all())
    status = lambda: served.hub.camera_status(camera) if camera in served.hub.camera_ids() else None  # noqa: E731
    await wait_for(lambda: status() is not None, what="the first frame")
    seen = -1
    while True:                 # until the server stops taking frames (a plateau), or the sender finishes
        processed = status().frames_accepted + status().frames_dropped
        if processed == seen or writer.done():
            break
        seen = processed
        await asyncio.sleep(1.0)
    assert not writer.done(), "every frame was taken although no ack was read"
    assert processed < total // 2, processed
    call.cancel()
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await channel.close()
