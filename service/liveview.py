"""What an HMI shows of each camera: the latest frame and what perception last found in it.

`LiveView.tap` sits on the one-way analysis path (frames -> perception -> skills) and only remembers the
newest analysis per camera; it never changes what flows on. `GetSnapshot` encodes the frame off the event loop.
A frame older than the camera watchdog's timeout is marked stale, so no client shows it as the current view.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import cv2
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from incar.v1 import common_pb2, liveview_pb2, liveview_pb2_grpc
from service.cameras.hub import CameraHub
from service.perception.types import FrameAnalysis

JPEG_QUALITY = 80
MAX_BOX_AGE_SECONDS = 0.5      # detections from an analysed frame further from the shown one are left out


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class LiveView(liveview_pb2_grpc.LiveViewServicer):
    def __init__(self, hub: CameraHub, stale_after_seconds: float):
        self.hub = hub
        self.stale_after = stale_after_seconds
        self.latest: dict[str, FrameAnalysis] = {}

    async def tap(self, analyses: AsyncIterator[FrameAnalysis]) -> AsyncIterator[FrameAnalysis]:
        async for analysis in analyses:
            self.latest[analysis.camera_id] = analysis
            yield analysis

    async def GetSnapshot(self, request, context):
        if not request.camera_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "camera_id: required")
        frame = self.hub.latest(request.camera_id)
        if frame is None:
            known = ", ".join(self.hub.camera_ids()) or "none"
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"camera_id: no frame from camera {request.camera_id!r} (cameras with frames: {known})")
        original = frame.original
        scale = 1.0
        if request.max_width and original.shape[1] > request.max_width:
            scale = request.max_width / original.shape[1]
        jpeg = await asyncio.to_thread(_encode, original, scale)
        age = max(0.0, time.time() - frame.capture_time)
        snapshot = liveview_pb2.CameraSnapshot(
            camera_id=frame.camera_id, sequence=frame.sequence, age_seconds=age, stale=age > self.stale_after,
            image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG, data=jpeg,
                                   width=round(original.shape[1] * scale), height=round(original.shape[0] * scale)),
            capture_time=_timestamp(frame.capture_time))
        analysis = self.latest.get(frame.camera_id)
        # Boxes belong to the frame they were found in: drawn over a later frame they would show a cyclist who
        # has gone. Within one analysis interval of the returned frame they still describe it.
        if analysis is not None and abs(frame.capture_time - analysis.timestamp) <= MAX_BOX_AGE_SECONDS:
            # Analyses boxes are in the analysed frame's pixels; map them onto the returned image.
            fx = original.shape[1] * scale / analysis.frame.shape[1]
            fy = original.shape[0] * scale / analysis.frame.shape[0]
            snapshot.analysed_time.CopyFrom(_timestamp(analysis.timestamp))
            snapshot.stages_run.extend(analysis.stages_run)
            boxes = [(d.label, d.score, d.box, d.track_id) for d in analysis.detections]
            boxes += [("face", f.score, f.box, None) for f in analysis.faces]
            for label, score, (x0, y0, x1, y1), track in boxes:
                snapshot.objects.add(label=label, score=score, x0=x0 * fx, y0=y0 * fy, x1=x1 * fx, y1=y1 * fy,
                                     track_id=-1 if track is None else track)
        return snapshot


def _encode(bgr, scale: float) -> bytes:
    if scale != 1.0:
        bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("liveview: JPEG encoding failed")
    return data.tobytes()


def add_to_server(view: LiveView, server: grpc.aio.Server) -> str:
    liveview_pb2_grpc.add_LiveViewServicer_to_server(view, server)
    return liveview_pb2.DESCRIPTOR.services_by_name["LiveView"].full_name
