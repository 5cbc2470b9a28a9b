"""The web HMI in a real headless Chromium: camera tiles with detections, a scripted step's events on the
timeline, and an answer streaming into the Ask box; the screenshot is kept as build/artifacts/hmi.png."""
from __future__ import annotations

import asyncio

import aiohttp
import grpc

from incar.v1 import cameras_pb2, cameras_pb2_grpc, common_pb2, vehicle_pb2, vehicle_pb2_grpc
from service.clients import Connection
from service.hmi_web.gateway import bound_port, serve
from tests.conftest import PHOTOS, ROOT
from tests.hmi.cdp import Browser, dumps

ARTIFACT = ROOT / "build" / "artifacts" / "hmi.png"


async def stream_camera(target: str, stop: asyncio.Event) -> None:
    image = (PHOTOS / "person.jpg").read_bytes()

    async def frames():
        sequence = 0
        while not stop.is_set():
            frame = cameras_pb2.Frame(camera_id="front", role=common_pb2.CAMERA_ROLE_EXTERIOR,
                                      position=common_pb2.MOUNT_POSITION_FRONT, sequence=sequence,
                                      image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG, data=image))
            frame.capture_time.GetCurrentTime()
            yield frame
            sequence += 1
            await asyncio.sleep(0.5)
    async with grpc.aio.insecure_channel(target) as channel:
        async for _ in cameras_pb2_grpc.CamerasStub(channel).StreamFrames(frames()):
            pass


async def test_page_shows_cameras_events_and_a_streamed_answer(server_process, tmp_path):
    server = server_process().start(timeout=120)
    stop = asyncio.Event()
    camera = asyncio.create_task(stream_camera(server.target, stop))
    runner = await serve(Connection(server.target), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{bound_port(runner)}/"
    try:
        async with Browser(tmp_path / "chromium") as page:
            await page.goto(url)
            await page.wait_for("document.getElementById('connection').textContent === 'connected'",
                                what="the event stream connects")
            # The camera tile shows the frame and what perception found in it (a person in person.jpg).
            await page.wait_for("document.querySelector('.tile[data-camera=\"front\"]')?.dataset.objects"
                                "?.split(',').includes('person')", timeout=60, what="a person box on the front tile")
            assert await page.evaluate("document.querySelector('.tile canvas').width") > 0

            # A scripted step: the car parks and locks; its events reach the timeline.
            async with grpc.aio.insecure_channel(server.target) as channel:
                await vehicle_pb2_grpc.VehicleStub(channel).UpdateState(
                    vehicle_pb2.VehicleState(gear=vehicle_pb2.GEAR_PARK, locked=True))
            await page.wait_for("document.querySelector('#events li[data-kind=\"vehicle.locked\"]') !== null",
                                what="'Car locked' on the timeline")
            assert "Car locked" in await page.evaluate("document.getElementById('events').innerText")

            # An answer streams in: the text grows piece by piece before the done record arrives.
            await page.evaluate("""(() => {
                window.pieces = 0;
                new MutationObserver(() => window.pieces++).observe(document.getElementById('answer'),
                    {childList: true, characterData: true, subtree: true});
                document.getElementById('question').value = 'What is the capital of France?';
                document.getElementById('ask-form').requestSubmit();
            })()""")
            await page.wait_for("document.getElementById('answer').dataset.state !== 'streaming'", timeout=120,
                                what="the answer finishes")
            state = await page.evaluate("document.getElementById('answer').dataset.state")
            answer = await page.evaluate("document.getElementById('answer').textContent")
            assert state == "done", answer
            assert "Paris" in answer
            assert await page.evaluate("window.pieces") >= 3, "the answer arrived in one piece, not streamed"
            assert "tok/s" in await page.evaluate("document.getElementById('answer-meta').textContent")
            await page.screenshot(ARTIFACT)
    finally:
        stop.set()
        await runner.cleanup()
        camera.cancel()
    assert ARTIFACT.stat().st_size > 10_000


async def test_gateway_maps_grpc_errors_to_http(server_process):
    server = server_process().start(timeout=120)
    runner = await serve(Connection(server.target), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{bound_port(runner)}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/api/cameras/nowhere/snapshot") as reply:
                assert reply.status == 404
                assert "nowhere" in (await reply.json())["error"]["message"]
            async with http.post(f"{base}/api/ask", data="not json") as reply:
                assert reply.status == 400
            async with http.post(f"{base}/api/ask", data=dumps({"question": "x" * 5000})) as reply:
                assert reply.status == 400 and "question" in (await reply.json())["error"]["message"]
            async with http.get(f"{base}/api/events", headers={"Last-Event-ID": "abc"}) as reply:
                assert reply.status == 400
    finally:
        await runner.cleanup()
