"""`GET /api/v1/events`: the event log as Server-Sent Events (operator token when configured).

`Last-Event-ID` (what a reconnecting browser sends) or `?since=N` replays the log after N;
without either the stream starts with the next event. Streams end when the app shuts down:
`close_streams` runs on shutdown, before aiohttp waits for handlers to finish.
"""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from imageswarm.daemon.appkeys import CONFIG, EVENT_STREAMS, EVENTS
from imageswarm.daemon.db import Event
from imageswarm.daemon.errors import BadRequest, Unavailable
from imageswarm.daemon.problems import require_token

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
KEEPALIVE = 15.0
_SHUTDOWN_WAIT = 2.0


def format_event(event: Event) -> bytes:
    data = json.dumps(event.data, separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {data}\n\n".encode()


def _since(request: web.Request) -> int | None:
    for source, value in (
        ("query parameter 'since'", request.query.get("since")),
        ("header 'Last-Event-ID'", request.headers.get("Last-Event-ID")),
    ):
        if value is None or value == "":
            continue
        if not value.isdigit():
            raise BadRequest(f"{source}: expected an event id (an integer >= 0), got {value!r}")
        return int(value)
    return None


@routes.get("/api/v1/events")
async def stream(request: web.Request) -> web.StreamResponse:
    require_token(request, request.app[CONFIG].api_token)
    since = _since(request)
    bus = request.app[EVENTS]
    if bus.closed:
        raise Unavailable("the controller is shutting down")
    subscription = bus.subscribe(bus.last_seq if since is None else since)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    task = asyncio.current_task()
    assert task is not None
    streams = request.app[EVENT_STREAMS]
    streams.add(task)
    try:
        while (batch := await subscription.next_batch(KEEPALIVE)) is not None:
            if batch:
                await response.write(b"".join(format_event(e) for e in batch))
            else:
                await response.write(b": keepalive\n\n")
    except ConnectionError:
        pass  # the client went away
    finally:
        streams.discard(task)
    return response


async def close_streams(app: web.Application) -> None:
    """on_shutdown: end every open stream (a bounded wait, then cancel what is left)."""
    bus = app.get(EVENTS)
    if bus is not None:
        bus.close()
    streams = app.get(EVENT_STREAMS)
    if not streams:
        return
    _done, pending = await asyncio.wait(list(streams), timeout=_SHUTDOWN_WAIT)
    for task in pending:
        log.warning("an event stream did not end within %gs; cancelling it", _SHUTDOWN_WAIT)
        task.cancel()
