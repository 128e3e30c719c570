"""`/v1/deliveries` and `/v1/events`: inspect the outbox and replay what failed.

Replaying puts deliveries back in the queue (attempts from zero, due now); the dispatcher
sends them with the event's id unchanged, so a consumer that already has the event sees a
duplicate it can recognise. A delivery in flight right now is left alone. Nothing here sends:
with `serve --no-worker`, a `receiver worker` elsewhere picks the rows up.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.models import PAGE_DEFAULT, PAGE_MAX, DeliveryState
from receiver.routes import JSON, BadRequest, error, int_param, services

STATES = {s.value for s in DeliveryState}
# Delivery ids and cursors: ASCII digits that fit a 64-bit integer (str.isdigit also takes "²").
_ROW_ID = re.compile(r"[0-9]{1,18}")


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


def _sink(request: Request, data: dict[str, Any], required: bool) -> str | None:
    sink = data.get("sink")
    if sink is None:
        if required:
            raise BadRequest("`sink` is required", 422)
        return None
    if sink not in services(request).sink_names:
        raise BadRequest(f"no sink named {sink!r} is configured", 422)
    return str(sink)


def _since(value: Any) -> float | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(
            "`since` must be an ISO-8601 time, e.g. 2026-11-24T08:00:00Z", 422
        ) from None
    if when.tzinfo is None:  # the API speaks UTC; never the server's local time
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


async def list_deliveries(request: Request) -> Response:
    state = request.query_params.get("state")
    if state is not None and state not in STATES:
        raise BadRequest(f"`state` must be one of {', '.join(sorted(STATES))}", 422)
    cursor = request.query_params.get("cursor")
    if cursor is not None and not _ROW_ID.fullmatch(cursor):
        raise BadRequest("`cursor` must come from a previous page's next_cursor", 422)
    page = await services(request).store.list_deliveries(
        state,
        request.query_params.get("sink"),
        int_param(request, "limit", PAGE_DEFAULT, 1, PAGE_MAX),
        cursor,
    )
    return JSON({"items": [d.to_api() for d in page.items], "next_cursor": page.next_cursor})


async def retry_delivery(request: Request) -> Response:
    raw = request.path_params["delivery_id"]
    if not _ROW_ID.fullmatch(raw):
        return error(404, "no such delivery")
    svc = services(request)
    count = await svc.store.requeue(svc.clock(), delivery_id=int(raw), only_dead=False)
    if count == 0:
        return error(404, "no such delivery, or it is in flight right now")
    return JSON({"requeued": count}, status_code=202)


async def replay_event(request: Request) -> Response:
    """Deliver one event again: to `sink` (even one it never went to, e.g. added since), or
    to every configured sink whose filters take it."""
    svc = services(request)
    event_id = request.path_params["event_id"]
    event = await svc.store.get_event(event_id)
    if event is None:
        return error(404, "no such event")
    sink = _sink(request, await _json_body(request), required=False)
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
    data = await _json_body(request)
    sink = _sink(request, data, required=True)
    svc = services(request)
    count = await svc.store.requeue(svc.clock(), sink=sink, since=_since(data.get("since")))
    return JSON({"requeued": count}, status_code=202)


async def get_event(request: Request) -> Response:
    event = await services(request).store.get_event(request.path_params["event_id"])
    if event is None:
        return error(404, "no such event")
    return JSON(event.to_api(with_body=True))


routes = [
    Route("/deliveries", list_deliveries, methods=["GET"]),
    Route("/deliveries/replay", replay_dead, methods=["POST"]),
    Route("/deliveries/{delivery_id}/retry", retry_delivery, methods=["POST"]),
    Route("/events/{event_id}", get_event, methods=["GET"]),
    Route("/events/{event_id}/replay", replay_event, methods=["POST"]),
]
