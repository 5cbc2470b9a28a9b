"""The errors a part raises for its caller, each carrying its gRPC status, and the one mapping to an abort.

Runtime, skills and actions raise these (a bad request, the wrong state, an unknown id, a full queue); the
servicers turn them into the status and a message naming what was wrong with `abort_for`, so the mapping is
written once instead of once per service.
"""
from __future__ import annotations

import grpc


class RequestError(Exception):
    """Base: the request cannot be served as given; `status` is what the caller gets."""
    status = grpc.StatusCode.UNKNOWN


class InvalidRequestError(RequestError, ValueError):
    """The request itself is bad (parameters, schema, context overflow)."""
    status = grpc.StatusCode.INVALID_ARGUMENT


class PreconditionError(RequestError):
    """The vehicle (or the part) is in the wrong state for this request."""
    status = grpc.StatusCode.FAILED_PRECONDITION


class NotFoundError(RequestError, LookupError):
    """The thing asked for does not exist."""
    status = grpc.StatusCode.NOT_FOUND


class ExhaustedError(RequestError):
    """A bounded queue or store is full: retry later."""
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(RequestError):
    """Not the caller's fault and not lasting (a model step or the store failed): retrying is right."""
    status = grpc.StatusCode.UNAVAILABLE


async def abort_for(context, exc: RequestError):
    """Abort the call with the error's status and message (raises, as `context.abort` does)."""
    await context.abort(exc.status, str(exc))
