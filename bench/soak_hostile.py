"""The hostile load of `bench/soak.py --hostile` (issue 13): clients that misbehave the ways an adversarial run
found, beside a plain client whose latency is the figure.

- unread acks: cameras that stream frames at full speed and never read an ack (the server must stop reading
  them, not buffer their frames);
- slow streams: event subscribers that take one event every few seconds;
- subscriber flood: many idle subscribers (a kind filter nothing matches), spread over connections;
- the plain client: Vehicle/GetState every 50 ms on its own connection, measured before the hostile clients
  start (quiet) and while they run (hostile).
"""
from __future__ import annotations

import asyncio
import time

import grpc

from incar.v1 import (cameras_pb2, cameras_pb2_grpc, common_pb2, events_pb2, events_pb2_grpc, vehicle_pb2,
                      vehicle_pb2_grpc)

STREAMS_PER_CONNECTION = 50   # below the server's max_concurrent_streams (100)


class HostileLoad:
    def __init__(self, make_channel, target: str, frames: list[bytes], *, unread_ack_cameras: int,
                 slow_subscribers: int, idle_subscribers: int):
        self.make_channel, self.target, self.frames = make_channel, target, frames
        self.unread_ack_cameras, self.slow_subscribers = unread_ack_cameras, slow_subscribers
        self.idle_subscribers = idle_subscribers
        self.counts = {"hostile_frames_written": 0, "hostile_slow_events_read": 0, "hostile_errors": 0}
        self._channels: list = []
        self._tasks: list[asyncio.Task] = []
        self._calls: list = []

    def start(self) -> None:
        for i in range(self.unread_ack_cameras):
            self._tasks.append(asyncio.create_task(self._unread_acks(f"hostile-deaf-{i}")))
        for _ in range(self.slow_subscribers):
            self._tasks.append(asyncio.create_task(self._slow_subscriber()))
        channel = None
        for i in range(self.idle_subscribers):
            if i % STREAMS_PER_CONNECTION == 0:
                channel = self._channel("hmi")
            call = events_pb2_grpc.EventsStub(channel).Subscribe(
                events_pb2.SubscribeRequest(kinds=["hostile.nothing."], only_new=True))
            self._calls.append(call)

    async def stop(self) -> None:
        for call in self._calls:
            call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels:
            await channel.close()

    def _channel(self, role: str):
        channel = self.make_channel(self.target, role)
        self._channels.append(channel)
        return channel

    async def _unread_acks(self, name: str) -> None:
        call = cameras_pb2_grpc.CamerasStub(self._channel("camera")).StreamFrames()
        self._calls.append(call)
        seq = 0
        try:
            while True:
                seq += 1
                frame = cameras_pb2.Frame(camera_id=name, role=common_pb2.CAMERA_ROLE_EXTERIOR,
                                          position=common_pb2.MOUNT_POSITION_UNSPECIFIED, sequence=seq,
                                          image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG,
                                                                 data=self.frames[seq % len(self.frames)]))
                frame.capture_time.GetCurrentTime()
                await call.write(frame)          # blocks once the server stops reading (flow control)
                self.counts["hostile_frames_written"] += 1
        except grpc.aio.AioRpcError:
            self.counts["hostile_errors"] += 1

    async def _slow_subscriber(self) -> None:
        call = events_pb2_grpc.EventsStub(self._channel("hmi")).Subscribe(events_pb2.SubscribeRequest(after_cursor=0))
        self._calls.append(call)
        try:
            while True:
                await call.read()
                self.counts["hostile_slow_events_read"] += 1
                await asyncio.sleep(5.0)
        except grpc.aio.AioRpcError:
            self.counts["hostile_errors"] += 1


async def plain_client(channel, stop: asyncio.Event, latencies: dict[str, list[float]], phase: list[str]) -> None:
    """GetState every 50 ms; each latency lands in the list of the phase in force ('quiet' or 'hostile')."""
    stub = vehicle_pb2_grpc.VehicleStub(channel)
    while not stop.is_set():
        started = time.perf_counter()
        try:
            await stub.GetState(vehicle_pb2.GetStateRequest(), timeout=10)
            latencies[phase[0]].append(time.perf_counter() - started)
        except grpc.aio.AioRpcError:
            latencies[f"{phase[0]}_errors"].append(0.0)
        await asyncio.sleep(0.05)
