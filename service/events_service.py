"""The Events service: a durable server stream with a resume cursor."""
from __future__ import annotations

import grpc

from incar.v1 import events_pb2, events_pb2_grpc
from service.store.events import EventLog

MAX_KIND_FILTERS = 32
MAX_CURSOR = 2**63 - 1   # SQLite INTEGER; cursors are allocated from 1 upwards, so none is larger


class EventsServicer(events_pb2_grpc.EventsServicer):
    def __init__(self, log: EventLog):
        self.log = log

    async def _check_kinds(self, kinds, context) -> list[str]:
        if len(kinds) > MAX_KIND_FILTERS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"kinds: at most {MAX_KIND_FILTERS} filters")
        for kind in kinds:
            if not kind or len(kind) > 64:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "kinds: each filter must be 1..64 characters")
        return list(kinds)

    async def _check_cursor(self, cursor: int, context) -> int:
        if cursor > MAX_CURSOR:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"after_cursor: {cursor} is beyond any cursor this service can issue ({MAX_CURSOR})")
        return cursor

    async def Subscribe(self, request, context):
        kinds = await self._check_kinds(request.kinds, context)
        await self._check_cursor(request.after_cursor, context)
        after = self.log.latest_cursor() if request.only_new else request.after_cursor
        async for event in self.log.follow(after, kinds):
            yield event

    async def ListEvents(self, request, context):
        kinds = await self._check_kinds(request.kinds, context)
        await self._check_cursor(request.after_cursor, context)
        limit = request.limit or 100
        if limit > 1000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limit: at most 1000, got {limit}")
        events = self.log.after(request.after_cursor, limit, kinds)
        next_cursor = events[-1].cursor if events else request.after_cursor
        return events_pb2.ListEventsResponse(events=events, next_cursor=next_cursor)
