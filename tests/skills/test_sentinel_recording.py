"""Sentinel clips at the camera's own frame rate through a real CameraHub whose analysis rate the power governor
lowered (2 fps), and the skills' extra perception stages merged on a real cascade."""
from __future__ import annotations

import asyncio
import json
import time

import cv2

from incar.v1 import cameras_pb2, common_pb2, skills_pb2
from service.cameras.config import CamerasConfig
from service.cameras.hub import CameraHub
from tests.skills.conftest import vehicle
from tests.skills.sentinel_scenes import frame_analysis, scene

CAM_FPS, ANALYSIS_FPS = 10.0, 2.0


async def test_clip_has_every_frame_the_camera_sent_while_analysis_ran_at_2_fps(harness):
    hub = CameraHub(CamerasConfig(allow_unknown_cameras=True))
    await hub.start()
    harness.frames, harness.clock = hub, time.time          # the hub checks capture times against the wall clock
    harness.config.sentinel.pre_event_seconds = harness.config.sentinel.post_event_seconds = 1.5
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True))
    hub.set_analysis_rate("ext-left", ANALYSIS_FPS)
    analysed, sent = [], {}

    async def analyse():
        async for frame in hub.frames():     # what the pipeline hands on: only frames the rate lets through
            analysed.append(frame.capture_time)
            await r.host.on_analysis(frame_analysis(frame.camera_id, frame.position, frame.capture_time,
                                                    frame.original))

    consumer = asyncio.create_task(analyse())
    try:
        for i in range(int(4.5 * CAM_FPS)):
            frame, _ = scene((), seed=i)
            ok, data = cv2.imencode(".jpg", frame)
            msg = cameras_pb2.Frame(camera_id="ext-left", role=common_pb2.CAMERA_ROLE_EXTERIOR,
                                    position=common_pb2.MOUNT_POSITION_LEFT, sequence=i,
                                    image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG,
                                                           data=data.tobytes()))
            now = time.time()
            msg.capture_time.FromNanoseconds(int(now * 1e9))
            sent[round(now, 6)] = data.tobytes()
            await hub.submit(msg)
            if i == int(2.0 * CAM_FPS):       # a strong shock half-way: an Alarm, with footage either side
                shock = vehicle(locked=True)
                shock.intrusion.shock_g = 0.9
                await r.set_vehicle(shock, drain=False)
            await asyncio.sleep(max(0.0, 1 / CAM_FPS - (time.time() - now)))
        deadline = time.time() + 10
        while not r.events_of("sentinel.clip_saved") and time.time() < deadline:
            await r.host.tick()
            await r.host.drain()
            await asyncio.sleep(0.05)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    alarm, = r.events_of("sentinel.alarm")
    assert json.loads(alarm.payload_json)["trigger"] == "shock"
    clip, = r.host.sentinel.list_clips()
    cam, = clip.cameras
    event = clip.event_time.ToNanoseconds() / 1e9
    window = (event - 1.5, event + 1.5)
    in_window = [t for t in sent if window[0] <= t <= window[1]]
    assert cam.camera_id == "ext-left" and cam.frame_count == len(in_window) >= 15   # every frame sent ...
    analysed_in_window = [t for t in analysed if window[0] <= t <= window[1]]
    assert len(analysed_in_window) <= ANALYSIS_FPS * 3 + 1 < cam.frame_count / 2    # ... not the analysed ones
    chunks = [c async for c in r.stub("Sentinel").GetClip(skills_pb2.GetClipRequest(clip_id=clip.clip_id,
                                                                                  camera_id="ext-left"))]
    index = json.loads(b"".join(c.data for c in chunks if c.name.endswith("index.json")))
    jpegs = {c.name.split("/")[-1]: c.data for c in chunks if c.name.endswith(".jpg")}
    for entry in index:                    # stored byte for byte as the camera sent them
        assert jpegs[entry["file"]] == sent[round(entry["capture_time"], 6)]
    await harness.stop()
    await hub.stop()


def test_skills_extra_stages_merge_on_the_cascade():
    from service.perception.cascade import Cascade, PerceptionConfig
    from skills.stages import CameraStages
    cascade = Cascade(PerceptionConfig())
    stages = CameraStages(cascade)
    greeter, sentinel = stages.switch("greeter", ("faces", "identity")), stages.switch("sentinel", ("pose",))
    assert cascade.stages_for("ext-left", "exterior") == ("motion", "objects", "text")
    greeter("ext-left", True)
    assert set(cascade.stages_for("ext-left", "exterior")) == {"motion", "faces", "objects", "identity", "text"}
    sentinel("ext-left", True)
    assert ("pose" in cascade.stages_for("ext-left", "exterior")
            and "faces" in cascade.stages_for("ext-left", "exterior"))
    greeter("ext-left", False)
    assert "pose" in cascade.stages_for("ext-left", "exterior") and "faces" not in cascade.stages_for("ext-left",
                                                                                                       "exterior")
    sentinel("ext-left", False)
    assert cascade.stages_for("ext-left", "exterior") == ("motion", "objects", "text")


def test_a_skills_wish_survives_the_governors_depth_cap():
    """Sentry mode's power rung caps an exterior camera at two stages. Counted over the merged stages that left
    motion + faces on the camera the driver walks towards: no identity, so no greeting by face, and no object
    detector for Sentinel. The cap trims only the usual stages; what a skill asks for comes on top."""
    from service.perception.cascade import Cascade, PerceptionConfig
    from skills.stages import CameraStages
    cascade = Cascade(PerceptionConfig())
    stages = CameraStages(cascade)
    cascade.set_camera_depth("ext-left", 2)
    assert cascade.stages_for("ext-left", "exterior") == ("motion", "objects")
    stages.want("ext-left", "greeter", ("faces", "identity"))
    assert cascade.stages_for("ext-left", "exterior") == ("motion", "faces", "objects", "identity")
    stages.want("ext-left", "sentinel", ("pose",))
    assert cascade.stages_for("ext-left", "exterior") == ("motion", "faces", "objects", "identity", "pose")
    stages.want("ext-left", "greeter", None)
    stages.want("ext-left", "sentinel", None)
    assert cascade.stages_for("ext-left", "exterior") == ("motion", "objects")
