"""Car Finder over gRPC, end to end through the real OCR stage (perception's PP-OCR graphs): a rendered
parking sign is read on parking; "where is my car?" answers with its level and bay; history survives a restart."""
from __future__ import annotations

import cv2
import grpc
import numpy as np
import pytest

from incar.v1 import skills_pb2, vehicle_pb2
from service.runtime.scheduler import JobClass
from skills.car_finder import ensure_facts, parse_signs
from skills.router import route
from tests.skills.conftest import vehicle
from tests.skills.scenes import analysis, background, photo


@pytest.fixture(scope="session")
def read_signs():
    from service.perception.models import model_path
    from service.perception.text import TextReader
    if not all(model_path(n).is_file() for n in ("ocr_det", "ocr_rec")):   # a fresh clone: build (the float
        from service.perception.build import ensure_built                  # graphs are what this test reads)
        ensure_built()
    reader = TextReader(model_path("ocr_det"), model_path("ocr_rec"))
    return reader.read


def garage_frame():
    """A garage pillar sign on a real photo backdrop."""
    frame = cv2.resize(photo("dog.jpg"), (640, 480), interpolation=cv2.INTER_AREA)
    cv2.rectangle(frame, (360, 30), (630, 260), (150, 80, 20), -1)
    for i, line in enumerate(("LEVEL P2", "ROW C", "BAY 17")):
        cv2.putText(frame, line, (380, 95 + 70 * i), cv2.FONT_HERSHEY_DUPLEX, 1.5, (255, 255, 255), 3)
    return frame


class ForgetfulNarrator:
    """A model whose wording drops the facts: the answer must still carry them."""

    async def complete(self, prompt, *, priority, **kwargs):
        assert priority == JobClass.LOOKUP and "level P2" in prompt and "bay 17" in prompt
        return "Your car is waiting for you in the garage."



async def test_parking_reads_the_newest_frame_when_the_analysis_lags(harness, clock, read_signs):
    """On a busy host the car can park before its last frames were analysed: the record is of what the cameras
    see now (the hub's newest frame), not of an analysis from before the sign came into view."""
    harness.read_signs = read_signs
    r = await harness.start()
    await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_ON))
    await r.frame(analysis("ext-front", "exterior", "front", clock.advance(0.1), background(), stages=("motion",)))
    # The sign comes into view; its frames reach the hub, the analysis lane has not caught up yet.
    r.frames.add(analysis("ext-front", "exterior", "front", clock.advance(2.0), garage_frame(), stages=()))
    r.frames.add(analysis("ext-side", "exterior", "left", clock.advance(0.1), background(seed=2), stages=()))
    record = await r.stub("CarFinder").RecordParking(skills_pb2.RecordParkingRequest())
    assert (record.level, record.row, record.bay) == ("P2", "C", "17"), list(record.sign_text)
    assert record.snapshot_id

async def test_parking_sign_read_and_answered_without_gps_and_after_restart(harness, clock, read_signs):
    harness.read_signs = read_signs
    r = await harness.start()
    finder = r.stub("CarFinder")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await finder.WhereIsMyCar(skills_pb2.WhereIsMyCarRequest())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_DRIVE, ignition=vehicle_pb2.IGNITION_ON, speed=12.0))
    await r.frame(analysis("ext-front", "exterior", "front", clock.advance(0.1), garage_frame(), stages=("motion",)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await finder.RecordParking(skills_pb2.RecordParkingRequest())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "moving" in err.value.details()

    # Parking in a garage (no GPS): P, then ignition off -> recorded by itself.
    await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_ON))
    await r.frame(analysis("ext-rear", "exterior", "rear", clock.advance(0.1), background(), stages=("motion",)))
    assert not r.events_of("car_finder.parked")
    await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF))
    parked, = r.events_of("car_finder.parked")
    records = (await finder.ListParkingHistory(skills_pb2.ListParkingHistoryRequest())).records
    assert len(records) == 1
    record = records[0]
    assert (record.level, record.row, record.bay) == ("P2", "C", "17"), list(record.sign_text)
    assert not record.gps_valid and record.snapshot_id in parked.attachment_ids

    reply = await finder.WhereIsMyCar(skills_pb2.WhereIsMyCarRequest(question="Where did I park?"))
    assert "P2" in reply.answer and "17" in reply.answer and reply.record.record_id == record.record_id

    # A second parking, outdoors with GPS and no sign: the latest record answers.
    await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_DRIVE, ignition=vehicle_pb2.IGNITION_ON, speed=30.0))
    await r.frame(analysis("ext-front", "exterior", "front", clock.advance(600), background(seed=3),
                           stages=("motion",)))
    await r.set_vehicle(vehicle(ignition=vehicle_pb2.IGNITION_OFF, gps=(52.52, 13.405)))
    latest = (await finder.WhereIsMyCar(skills_pb2.WhereIsMyCarRequest())).record
    assert latest.gps_valid and abs(latest.gps.latitude_deg - 52.52) < 1e-9 and not latest.bay

    # The router sends the Assistant's question here.
    assert route("where is my car?") == "car_finder"
    routed = await r.host.router.answer("Hey, where is my car?")
    assert routed.skill == "car_finder" and "GPS" in routed.answer

    # Restart: both records, newest first, the snapshot on disk.
    r = await harness.restart()
    history = (await r.stub("CarFinder").ListParkingHistory(skills_pb2.ListParkingHistoryRequest())).records
    assert [h.record_id for h in history] == [latest.record_id, record.record_id]
    assert (r.host.car_finder.snapshot_dir / f"{record.snapshot_id}.jpg").is_file()

    # The model's words are checked: words that drop the level and bay (numbers are facts) give way to the draft.
    harness.narrator = ForgetfulNarrator()
    r = await harness.restart()
    await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_DRIVE, ignition=vehicle_pb2.IGNITION_ON, speed=8.0))
    await r.frame(analysis("ext-front", "exterior", "front", clock.advance(0.1), garage_frame(), stages=("motion",)))
    await r.set_vehicle(vehicle(ignition=vehicle_pb2.IGNITION_OFF))
    reply = await r.stub("CarFinder").WhereIsMyCar(skills_pb2.WhereIsMyCarRequest())
    assert "waiting" not in reply.answer and reply.answer.startswith("Your car is parked on level P2, row C, bay 17")


def test_sign_parsing_and_fact_check():
    assert parse_signs(["LEVEL P2", "ROW C", "BAY 17"]) == {"level": "P2", "row": "C", "bay": "17"}
    assert parse_signs(["P3", "Space No. 104"]) == {"level": "P3", "row": "", "bay": "104"}
    assert parse_signs(["LEVEL 3", "C-14"]) == {"level": "3", "row": "C", "bay": "14"}
    assert parse_signs(["P2 LEVEL C-14"]) == {"level": "P2", "row": "C", "bay": "14"}
    assert parse_signs(["EXIT", "PAY HERE"]) == {"level": "", "row": "", "bay": ""}
    record = skills_pb2.ParkingRecord(level="P2", bay="17")
    assert ensure_facts("Level P2, bay 17.", record) == "Level P2, bay 17."
    assert ensure_facts("On P2, spot 170.", record) == "On P2, spot 170. (bay 17)"


def sign_frame(*lines, seed=0):
    """A garage sign on a plain backdrop, as a side camera passes it."""
    frame = background(seed=seed)
    cv2.rectangle(frame, (300, 40), (630, 110 + 70 * len(lines)), (150, 80, 20), -1)
    for i, line in enumerate(lines):
        cv2.putText(frame, line, (320, 105 + 70 * i), cv2.FONT_HERSHEY_DUPLEX, 1.5, (255, 255, 255), 3)
    return frame


async def test_trail_of_signs_on_the_way_in_gives_the_level_when_the_bay_is_unreadable(harness, clock, read_signs):
    harness.read_signs = read_signs
    r = await harness.start()
    finder = r.stub("CarFinder")
    # Driving into the garage: the ramp's level sign, then a row sign, pass the side camera (the text stage ran).
    await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_DRIVE, ignition=vehicle_pb2.IGNITION_ON, speed=9.0))
    for lines in (("LEVEL P1",), ("EXIT",), ("LEVEL P3",), ("ROW D",)):
        frame = sign_frame(*lines)
        await r.frame(analysis("ext-right", "exterior", "right", clock.advance(4.0), frame, texts=read_signs(frame),
                               stages=("motion", "text")))
    # At the bay nothing readable (a pillar without a sign); park in P, ignition off.
    await r.frame(analysis("ext-right", "exterior", "right", clock.advance(3.0), background(seed=5),
                           stages=("motion", "text")))
    await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_ON))
    await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF))
    parked, = r.events_of("car_finder.parked")
    record = await finder.GetParkingRecord(skills_pb2.GetParkingRecordRequest())
    assert (record.level, record.row, record.bay) == ("P3", "D", "")
    assert (record.level_source, record.row_source) == ("trail", "trail")
    assert [t.text for t in record.trail] == ["LEVEL P1", "LEVEL P3", "ROW D"]
    assert [t.level for t in record.trail] == ["P1", "P3", ""] and record.trail[-1].row == "D"
    assert record.trail[0].time.ToSeconds() < record.trail[-1].time.ToSeconds() <= record.time.ToSeconds()

    clock.advance(25 * 60)
    reply = await finder.WhereIsMyCar(skills_pb2.WhereIsMyCarRequest(question="Where did I park?"))
    assert "level P3" in reply.answer and "row D" in reply.answer and "25 min ago" in reply.answer
    assert "no GPS" in reply.answer and abs(reply.age_seconds - 25 * 60) < 5

    chunks = [c async for c in finder.GetParkingSnapshot(skills_pb2.GetParkingSnapshotRequest(
        record_id=record.record_id))]
    snapshot = cv2.imdecode(np.frombuffer(b"".join(c.data for c in chunks), np.uint8), cv2.IMREAD_COLOR)
    assert snapshot is not None and snapshot.shape == (480, 640, 3)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await finder.GetParkingRecord(skills_pb2.GetParkingRecordRequest(record_id="park-nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # The trail belongs to one parking: outdoors next time with GPS, the old garage signs are not used.
    await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_DRIVE, ignition=vehicle_pb2.IGNITION_ON, speed=40.0))
    await r.set_vehicle(vehicle(ignition=vehicle_pb2.IGNITION_OFF, gps=(52.52, 13.405)))
    outdoor = await finder.GetParkingRecord(skills_pb2.GetParkingRecordRequest())
    assert outdoor.record_id != record.record_id and not outdoor.level and not outdoor.trail
    reply = await finder.WhereIsMyCar(skills_pb2.WhereIsMyCarRequest())
    assert "GPS 52.52000, 13.40500" in reply.answer and "just now" in reply.answer
    r = await harness.restart()                      # stored with the record
    again = await r.stub("CarFinder").GetParkingRecord(skills_pb2.GetParkingRecordRequest(record_id=record.record_id))
    assert [t.text for t in again.trail] == ["LEVEL P1", "LEVEL P3", "ROW D"]
