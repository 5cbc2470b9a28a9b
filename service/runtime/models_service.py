"""The Models gRPC service (role `admin`): which bundle serves, and a hot swap to another one."""
from __future__ import annotations

import grpc

from incar.v1 import models_pb2, models_pb2_grpc
from service.runtime.backends import BACKENDS
from service.runtime.host import ModelHost, SwapError

SERVICE = models_pb2.DESCRIPTOR.services_by_name["Models"].full_name
CODES = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "refused": grpc.StatusCode.FAILED_PRECONDITION,
         "busy": grpc.StatusCode.ABORTED, "not_ready": grpc.StatusCode.UNAVAILABLE}


def model_info(host: ModelHost) -> models_pb2.ModelInfo:
    verdict = host.verdict
    return models_pb2.ModelInfo(model=host.engine.name if host.engine else "", bundle_path=str(host.bundle_path),
                                backend=host.backend, signed=bool(verdict and verdict.signed),
                                signature=verdict.note if verdict else "")


class ModelsServicer(models_pb2_grpc.ModelsServicer):
    def __init__(self, host: ModelHost):
        self.host = host

    async def SwapBundle(self, request, context):
        if not request.bundle_path or len(request.bundle_path) > 4096 or "\x00" in request.bundle_path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "bundle_path: a bundle directory is required (at most 4096 characters, no NUL)")
        if request.backend and request.backend not in BACKENDS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"backend: expected one of {', '.join(BACKENDS)} or '', got {request.backend!r}")
        try:
            result = await self.host.swap(request.bundle_path, backend=request.backend)
        except SwapError as exc:
            await context.abort(CODES[exc.kind], str(exc))
        return models_pb2.SwapBundleResponse(now=model_info(self.host), previous_model=result.previous,
                                             load_seconds=result.load_seconds, check_answer=result.check_answer)

    async def GetModel(self, request, context):
        return model_info(self.host)


def add_to_server(host: ModelHost, server: grpc.aio.Server) -> str:
    models_pb2_grpc.add_ModelsServicer_to_server(ModelsServicer(host), server)
    return SERVICE
