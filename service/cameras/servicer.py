"""incar.v1.Cameras over the CameraHub.

Bad input on StreamFrames ends that stream with INVALID_ARGUMENT and a message naming the camera and the field
(e.g. "camera 'cabin': image.width: frame says 640 but the JPEG header says 768"). Why end the stream: gRPC
has no per-message status, and an ack with accepted=false would let a broken sender stream garbage forever
unnoticed. Every other stream (other cameras) keeps working, frames already admitted on this stream are still
processed, and the camera reconnects with a new stream. Valid frames that are not processed (overload, stale,
out of order, rate-limited) are not errors: their ack says accepted=false with the reason.
"""
from __future__ import annotations

import asyncio

import grpc
import structlog

from incar.v1 import cameras_pb2, cameras_pb2_grpc
from service.cameras.frames import FrameError
from service.cameras.hub import CameraHub, CameraLimitError

log = structlog.get_logger(__name__)

_END = object()


class CamerasServicer(cameras_pb2_grpc.CamerasServicer):
    def __init__(self, hub: CameraHub):
        self.hub = hub

    async def StreamFrames(self, request_iterator, context):
        # Frames are read and admitted as they come (not one ack round-trip at a time), so a fast sender meets
        # latest-wins dropping rather than TCP backpressure; acks go back in completion order. At most
        # max_unacked_frames are read ahead of the acks the sender has taken: a sender that never reads its acks
        # stops being read (HTTP/2 flow control holds it), instead of piling up finished frames in memory; and a
        # stream is read at most max_stream_fps, so a flood costs the loop what a fast camera would.
        done: asyncio.Queue = asyncio.Queue()
        in_flight: set[asyncio.Task] = set()
        read_error: list[BaseException] = []
        window = asyncio.Semaphore(self.hub.config.max_unacked_frames)

        async def read() -> None:
            frames = aiter(request_iterator)
            loop = asyncio.get_running_loop()
            pace, next_read = 1.0 / self.hub.config.max_stream_fps, 0.0
            try:
                while True:
                    await window.acquire()
                    if (wait := next_read - loop.time()) > 0:
                        await asyncio.sleep(wait)   # a flooding sender is read at max_stream_fps, and waits
                    frame = await anext(frames)
                    next_read = max(next_read, loop.time()) + pace
                    task = asyncio.ensure_future(self._submit(frame))
                    in_flight.add(task)
                    task.add_done_callback(done.put_nowait)
            except StopAsyncIteration:
                pass
            except Exception as exc:
                read_error.append(exc)
            finally:
                done.put_nowait(_END)

        reader = asyncio.create_task(read())
        reading = True
        try:
            while reading or in_flight:
                item = await done.get()
                if item is _END:
                    reading = False
                    if read_error:
                        raise read_error[0]
                    continue
                in_flight.discard(item)
                code, message, ack = item.result()
                if code is not None:
                    await context.abort(code, message)
                yield ack
                window.release()   # the ack is written: one more frame may be read
        finally:
            reader.cancel()

    async def _submit(self, frame: cameras_pb2.Frame):
        try:
            return None, "", await self.hub.submit(frame)
        except FrameError as exc:
            return grpc.StatusCode.INVALID_ARGUMENT, f"camera {frame.camera_id!r}: {exc}", None
        except CameraLimitError as exc:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), None

    async def ListCameras(self, request, context):
        return cameras_pb2.ListCamerasResponse(cameras=self.hub.status())

    async def GetCameraStatus(self, request, context):
        if not request.camera_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "camera_id: empty")
        try:
            return self.hub.camera_status(request.camera_id)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"camera_id: no camera {request.camera_id!r} "
                                                           f"(known: {', '.join(self.hub.camera_ids()) or 'none'})")


def add_to_server(hub: CameraHub, server: grpc.aio.Server) -> str:
    """Mount the Cameras service; returns its full name (for health and reflection)."""
    cameras_pb2_grpc.add_CamerasServicer_to_server(CamerasServicer(hub), server)
    return cameras_pb2.DESCRIPTOR.services_by_name["Cameras"].full_name
