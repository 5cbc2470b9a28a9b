"""A real grpc.aio server on a free port hosting the Cameras servicer over a CameraHub."""
from __future__ import annotations

import grpc
import pytest

from tests.cameras.camera_helpers import MAX_MESSAGE, Served
from service.cameras.config import CamerasConfig
from service.cameras.hub import CameraHub
from service.cameras.servicer import add_to_server
from service.config import build


@pytest.fixture
async def serve():
    """serve(**CamerasConfig fields) -> Served; everything is stopped after the test."""
    started: list[Served] = []

    async def make(**settings) -> Served:
        hub = CameraHub(build(CamerasConfig, settings, "cameras"))  # as the service config builds it
        await hub.start()
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
        add_to_server(hub, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                            options=[("grpc.max_send_message_length", MAX_MESSAGE)])
        served = Served(hub, server, channel, port)
        started.append(served)
        return served

    yield make
    for served in started:
        await served.channel.close()
        await served.server.stop(0)
        await served.hub.stop()
