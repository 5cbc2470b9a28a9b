"""Attachments over the CLI: Car Finder's parking snapshot (the exterior frame at parking) and its record."""
from __future__ import annotations

import asyncio
import json

import cv2
import grpc

from incar.v1 import (cameras_pb2, cameras_pb2_grpc, common_pb2, skills_pb2, skills_pb2_grpc, vehicle_pb2,
                      vehicle_pb2_grpc)
from service.sim_scenes import garage_with_sign
from tests.conftest import PHOTOS
from tests.foundation.test_cli_skills import incar


async def park_by_a_sign(target: str) -> skills_pb2.ParkingRecord:
    scene = garage_with_sign(PHOTOS, "B2", "117")

    async def frames():
        for seq in range(16):
            ok, jpeg = cv2.imencode(".jpg", scene(seq * 0.25))
            frame = cameras_pb2.Frame(camera_id="front", role=common_pb2.CAMERA_ROLE_EXTERIOR,
                                      position=common_pb2.MOUNT_POSITION_FRONT, sequence=seq,
                                      image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG,
                                                             data=jpeg.tobytes()))
            frame.capture_time.GetCurrentTime()
            yield frame
            await asyncio.sleep(0.25)
    async with grpc.aio.insecure_channel(target) as channel:
        async for _ack in cameras_pb2_grpc.CamerasStub(channel).StreamFrames(frames()):
            pass
        await vehicle_pb2_grpc.VehicleStub(channel).UpdateState(vehicle_pb2.VehicleState(
            gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_ON, battery_percent=80))
        return await skills_pb2_grpc.CarFinderStub(channel).RecordParking(skills_pb2.RecordParkingRequest())


def test_parking_snapshot_and_record_download(server_process, tmp_path):
    server = server_process().start(timeout=120)
    record = asyncio.run(park_by_a_sign(server.target))
    assert record.snapshot_id and (record.level, record.bay) == ("B2", "117"), record

    out = tmp_path / "parked.jpg"
    got = incar(server, "carfinder", "--json", "snapshot", record.record_id, "--out", str(out))
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["bytes"] == out.stat().st_size > 0
    image = cv2.imread(str(out))
    assert image is not None and image.shape[0] > 0          # a JPEG that decodes

    shown = incar(server, "carfinder", "--json", "record")   # the latest, with what was read
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["record_id"] == record.record_id

    missing = incar(server, "carfinder", "snapshot", "no-such-record", "--out", str(tmp_path / "x.jpg"))
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and not (tmp_path / "x.jpg").exists()
