"""The VehicleActions gRPC service for the vehicle gateway (role `vehicle`): stream, acknowledge, look up."""
from __future__ import annotations

import grpc

from incar.v1 import actions_pb2, actions_pb2_grpc
from service.actions.queue import ActionQueue
from service.rpc_errors import RequestError, abort_for

SERVICE = actions_pb2.DESCRIPTOR.services_by_name["VehicleActions"].full_name
MAX_CURSOR = 2**63 - 1
MAX_DETAIL = 512


class VehicleActionsServicer(actions_pb2_grpc.VehicleActionsServicer):
    def __init__(self, queue: ActionQueue):
        self.queue = queue

    async def Stream(self, request, context):
        if request.after_cursor > MAX_CURSOR:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"after_cursor: {request.after_cursor} is beyond any cursor this service issues")
        async for delivery in self.queue.follow(request.after_cursor):
            yield delivery

    async def Acknowledge(self, request, context):
        await _check_id(request.id, context)
        if len(request.detail) > MAX_DETAIL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"detail: at most {MAX_DETAIL} characters")
        try:
            return self.queue.acknowledge(request.id, request.result, request.detail)
        except RequestError as exc:      # a bad result, an unknown id, a conflicting answer, the store refusing
            await abort_for(context, exc)

    async def GetAction(self, request, context):
        await _check_id(request.id, context)
        try:
            return self.queue.get(request.id)
        except RequestError as exc:
            await abort_for(context, exc)


async def _check_id(action_id: str, context) -> None:
    if not action_id or len(action_id) > 64:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "id: expected the action's id (1..64 characters)")


def add_to_server(queue: ActionQueue, server: grpc.aio.Server) -> str:
    actions_pb2_grpc.add_VehicleActionsServicer_to_server(VehicleActionsServicer(queue), server)
    return SERVICE
