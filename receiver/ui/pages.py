"""The dashboard's pages and the actions on them: server-rendered HTML, plain forms.

Pages read through the same store calls as the admin API (`list_jobs`, `get_job`,
`list_deliveries`: keyset pages on indexed columns), and actions do what the API's replay and
retry do (`store.requeue`), so the page and `/v1` never disagree.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from pathlib import PurePosixPath
from typing import Any

import jinja2
import orjson
import structlog
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from receiver.models import (
    STATUS_RANK,
    SUBMIT_FAILED,
    SUBMITTING,
    TIMED_OUT,
    DeliveryState,
    Event,
    iso,
)
from receiver.routes import BadRequest, Services, parse, services
from receiver.routes.jobs import deliveries_of
from receiver.routes.schemas import ROW_ID_PATTERN, DeliveriesQuery, JobsQuery
from receiver.ui.session import checked_form, csrf_token, sign_in

log = structlog.get_logger("receiver.ui")
Handler = Callable[[Request], Awaitable[Response]]
JOB_STATUSES = (SUBMITTING, *STATUS_RANK, SUBMIT_FAILED, TIMED_OUT)
_ROW_ID = re.compile(ROW_ID_PATTERN)

templates = Jinja2Templates(
    env=jinja2.Environment(
        loader=jinja2.PackageLoader("receiver.ui", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
)
templates.env.filters["iso"] = iso


def render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
    """A page, with what every page shows: the CSRF token for its forms, the flash message."""
    session = request.session
    flash = session.pop("flash") if "flash" in session else None  # shown once
    base = {"csrf": csrf_token(request), "flash": flash, "signed_in": "signed_in_at" in session}
    return templates.TemplateResponse(request, name, base | context, status_code=status)


def page(handler: Handler) -> Handler:
    """Bad input on a page is a readable 4xx page (the app would answer JSON)."""

    @functools.wraps(handler)
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except BadRequest as exc:
            return render(request, "error.html", exc.status, reason=exc.reason)

    return run


def query(request: Request) -> dict[str, str]:
    """The query string, blank fields dropped (what a form sends for "any")."""
    return {k: v for k, v in request.query_params.items() if v}


def back_to(request: Request, fields: dict[str, str]) -> str:
    """Where an action returns: the page it was sent from (the form's `back`), if that is a
    dashboard path; never another site."""
    home = request.url_for("ui:overview").path
    back = fields.get("back", "")
    path = back.split("?", 1)[0]
    if back.startswith(home) and "\\" not in back and ".." not in PurePosixPath(path).parts:
        return back
    return home


async def root(request: Request) -> Response:
    """`GET /`: the dashboard."""
    return RedirectResponse(request.url_for("ui:overview"), status_code=303)


@page
async def signin_form(request: Request) -> Response:
    if request.method == "GET":
        return render(request, "signin.html")
    fields = await checked_form(request)
    svc = services(request)
    if svc.settings.admin_token is None:
        return render(request, "signin.html", 403, error="Set RECEIVER_ADMIN_TOKEN to sign in.")
    if not sign_in(request, fields.get("token", ""), svc.settings.admin_token, svc.clock()):
        log.warning("ui.signin_refused", client=request.client.host if request.client else "-")
        return render(request, "signin.html", 401, error="That is not the admin token.")
    log.info("ui.signed_in", client=request.client.host if request.client else "-")
    return RedirectResponse(request.url_for("ui:overview"), status_code=303)


@page
async def signout(request: Request) -> Response:
    await checked_form(request)
    request.session.clear()
    return RedirectResponse(request.url_for("ui:signin"), status_code=303)


@page
async def jobs(request: Request) -> Response:
    q = parse(JobsQuery, query(request), 400)
    listing = await services(request).store.list_jobs(q.status, q.domain, q.limit, q.cursor)
    more = None
    if listing.next_cursor:
        more = request.url.include_query_params(cursor=listing.next_cursor)
    return render(
        request, "jobs.html", jobs=listing.items, q=q, statuses=JOB_STATUSES, next_url=more
    )


def pretty(body: bytes) -> str:
    """The prediction indented; as received when it cannot be (orjson writes 254 levels)."""
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return body.decode("utf-8", "replace")


@page
async def job(request: Request) -> Response:
    svc = services(request)
    found = await svc.store.get_job(request.path_params["job_id"])
    if found is None:
        raise BadRequest("No such job.", 404)
    the_job, events = found
    deliveries = await deliveries_of(svc.store, events)  # as GET /v1/jobs/{id}
    timeline = [(event, pretty(event.body), deliveries[event.id]) for event in events]
    return render(request, "job.html", job=the_job, timeline=timeline, sinks=svc.sink_names)


@page
async def deliveries(request: Request) -> Response:
    svc = services(request)
    q = parse(DeliveriesQuery, query(request), 400)
    listing = await svc.store.list_deliveries(q.state, q.sink, q.limit, q.cursor, q.event_id)
    more = None
    if listing.next_cursor:
        more = request.url.include_query_params(cursor=listing.next_cursor)
    return render(
        request,
        "deliveries.html",
        deliveries=listing.items,
        q=q,
        states=[s.value for s in DeliveryState],
        sinks=svc.sink_names,
        next_url=more,
    )


@page
async def event(request: Request) -> Response:
    """An event's page is its job's, at the event (the deliveries page links here)."""
    found = await services(request).store.get_event(request.path_params["event_id"])
    if found is None:
        raise BadRequest("No such event.", 404)
    url = request.url_for("ui:job", job_id=found.job_id)
    return RedirectResponse(f"{url}#{found.id}", status_code=303)


@page
async def find(request: Request) -> Response:
    """The page of a job, given its id or one of its events' ids (pasted from a log line)."""
    wanted = request.query_params.get("id", "").strip()
    store = services(request).store
    if wanted and await store.get_job(wanted) is not None:
        return RedirectResponse(request.url_for("ui:job", job_id=wanted), status_code=303)
    found = await store.get_event(wanted) if wanted else None
    if found is not None:
        url = request.url_for("ui:job", job_id=found.job_id)
        return RedirectResponse(f"{url}#{found.id}", status_code=303)
    raise BadRequest(f"No job or event has the id {wanted!r}.", 404)


def replay_targets(svc: Services, event: Event, sink: str | None) -> list[str]:
    """The sinks a replay goes to: the one named, or every configured sink whose filters take
    the event (the same choice as POST /v1/events/{id}/replay)."""
    if sink:
        if sink not in svc.sink_names:
            raise BadRequest(f"No sink named {sink!r} is configured.", 422)
        return [sink]
    return [
        r.sink
        for r in svc.store.routes
        if r.sink in svc.sink_names and r.matches(event.status, event.domain)
    ]


def _done(count: int) -> str:
    if count == 0:
        return "Nothing was requeued: no sink takes it, or it is being sent right now."
    noun = "delivery" if count == 1 else "deliveries"
    return f"Requeued {count} {noun}: the worker sends them next."


@page
async def replay(request: Request) -> Response:
    fields = await checked_form(request)
    svc = services(request)
    found = await svc.store.get_event(request.path_params["event_id"])
    if found is None:
        raise BadRequest("No such event.", 404)
    count = 0
    for name in replay_targets(svc, found, fields.get("sink") or None):
        count += await svc.store.requeue(svc.clock(), event_id=found.id, sink=name, only_dead=False)
    log.info("ui.replayed", event_id=found.id, job_id=found.job_id, requeued=count)
    request.session["flash"] = _done(count)
    return RedirectResponse(back_to(request, fields), status_code=303)


@page
async def retry(request: Request) -> Response:
    fields = await checked_form(request)
    raw = request.path_params["delivery_id"]
    if not _ROW_ID.match(raw):
        raise BadRequest("No such delivery.", 404)
    svc = services(request)
    # As POST /v1/deliveries/{id}/retry: any state but in flight, attempts from zero, due now.
    count = await svc.store.requeue(svc.clock(), delivery_id=int(raw), only_dead=False)
    log.info("ui.retried", delivery_id=int(raw), requeued=count)
    request.session["flash"] = _done(count)
    return RedirectResponse(back_to(request, fields), status_code=303)
