"""An AssistantService on its own grpc.aio server on a free loopback port, and Ask's final AskDone."""
from __future__ import annotations

import grpc

from incar.v1 import assistant_pb2, assistant_pb2_grpc


class AssistantServer:
    def __init__(self, service):
        self.service = service

    async def __aenter__(self):
        self.server = grpc.aio.server()
        assistant_pb2_grpc.add_AssistantServicer_to_server(self.service, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        await self.server.stop(None)

    async def done(self, request: assistant_pb2.AskRequest, timeout: float = 120) -> assistant_pb2.AskDone:
        stub = assistant_pb2_grpc.AssistantStub(self.channel)
        items = [item async for item in stub.Ask(request, timeout=timeout)]
        return items[-1].done
