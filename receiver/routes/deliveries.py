"""`/v1/deliveries` and `/v1/events`: inspect the outbox and replay what failed.

Replaying puts deliveries back in the queue (attempts from zero, due now); the dispatcher
sends them with the event's id unchanged, so a consumer that already has the event sees a
duplicate it can recognise. A delivery in flight right now is left alone. Nothing here sends:
with `serve --no-worker`, a `receiver worker` elsewhere picks the rows up.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.routes import JSON, BadRequest, error, parse, services
from receiver.routes.schemas import (
    ROW_ID_PATTERN,
    DeliveriesQuery,
    ReplayDead,
    ReplayEvent,
    RetryMatching,
    epoch,
)

log = structlog.get_logger("receiver.deliveries")
_ROW_ID = re.compile(ROW_ID_PATTERN)  # str.isdigit would also take "²"


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("body must be JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object", 422)
    return data


def check_sink(request: Request, sink: str | None) -> None:
    """A sink named in a request must be configured (422 naming it), here and on the
    dashboard alike."""
    if sink is not None and sink not in services(request).sink_names:
        raise BadRequest(f"no sink named {sink!r} is configured", 422)


async def list_deliveries(request: Request) -> Response:
    query = parse(DeliveriesQuery, dict(request.query_params), 400)
    page = await services(request).store.list_deliveries(
        query.state,
        query.sink,
        query.limit,
        query.cursor,
        query.event_id,
        since=epoch(query.since),
        until=epoch(query.until),
    )
    return JSON({"items": [d.to_api() for d in page.items], "next_cursor": page.next_cursor})


async def retry_delivery(request: Request) -> Response:
    raw = request.path_params["delivery_id"]
    if not _ROW_ID.match(raw):
        return error(404, "no such delivery")
    svc = services(request)
    count = await svc.store.requeue(svc.clock(), delivery_id=int(raw), only_dead=False)
    if count == 0:
        return error(404, "no such delivery, or it is in flight right now")
    return JSON({"requeued": count}, status_code=202)


async def retry_matching(request: Request) -> Response:
    """Every delivery the filters match, as the list shows them, back in the queue at once
    (one statement); those being sent right now are left alone."""
    wanted = parse(RetryMatching, await _json_body(request), 422)
    check_sink(request, wanted.sink)
    svc = services(request)
    since, until = epoch(wanted.since), epoch(wanted.until)
    _, newest = await svc.store.count_requeueable(
        wanted.state, wanted.sink, since=since, until=until
    )
    count = 0
    if newest is not None:
        count = await svc.store.requeue_matching(
            svc.clock(), newest, wanted.state, wanted.sink, since=since, until=until
        )
    log.info("deliveries.retried", state=wanted.state, sink=wanted.sink, requeued=count)
    return JSON({"requeued": count}, status_code=202)


async def replay_event(request: Request) -> Response:
    """Deliver one event again: to `sink` (even one it never went to, e.g. added since), or
    to every configured sink whose filters take it."""
    svc = services(request)
    event_id = request.path_params["event_id"]
    event = await svc.store.get_event(event_id)
    if event is None:
        return error(404, "no such event")
    sink = parse(ReplayEvent, await _json_body(request), 422).sink
    check_sink(request, sink)
    targets = (
        [sink]
        if sink
        else [
            r.sink
            for r in svc.store.routes
            if r.sink in svc.sink_names and r.matches(event.status, event.domain)
        ]
    )
    count = 0
    for name in targets:
        count += await svc.store.requeue(svc.clock(), event_id=event_id, sink=name, only_dead=False)
    return JSON({"requeued": count}, status_code=202)


async def replay_dead(request: Request) -> Response:
    """Replay everything dead for one sink, optionally only what died since a time."""
    replay = parse(ReplayDead, await _json_body(request), 422)
    check_sink(request, replay.sink)
    svc = services(request)
    count = await svc.store.requeue(svc.clock(), sink=replay.sink, since=epoch(replay.since))
    return JSON({"requeued": count}, status_code=202)


async def get_event(request: Request) -> Response:
    event = await services(request).store.get_event(request.path_params["event_id"])
    if event is None:
        return error(404, "no such event")
    return JSON(event.to_api(with_body=True))


routes = [
    Route("/deliveries", list_deliveries, methods=["GET"]),
    Route("/deliveries/replay", replay_dead, methods=["POST"]),
    Route("/deliveries/retry", retry_matching, methods=["POST"]),
    Route("/deliveries/{delivery_id}/retry", retry_delivery, methods=["POST"]),
    Route("/events/{event_id}", get_event, methods=["GET"]),
    Route("/events/{event_id}/replay", replay_event, methods=["POST"]),
]
