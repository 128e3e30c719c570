"""The dashboard's pages and the actions on them: server-rendered HTML, plain forms.

Pages read through the same store calls as the admin API (`list_jobs`, `get_job`,
`list_deliveries`: keyset pages on indexed columns), and actions do what the API's replay and
retry do (`store.requeue`), so the page and `/v1` never disagree.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, get_args
from urllib.parse import urlencode

import jinja2
import orjson
import structlog
from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from receiver.models import (
    STATUS_RANK,
    SUBMIT_FAILED,
    SUBMITTING,
    TIMED_OUT,
    Event,
    iso,
)
from receiver.routes import BadRequest, Services, parse, services
from receiver.routes.deliveries import check_sink
from receiver.routes.jobs import deliveries_of
from receiver.routes.schemas import (
    ROW_ID_PATTERN,
    CreatedBetween,
    DeliveriesQuery,
    DeliveryFilterState,
    JobsQuery,
    RetryMatching,
    epoch,
)
from receiver.store import Page
from receiver.ui import jsontree
from receiver.ui.session import checked_form, csrf_token, sign_in, sign_in_limit

log = structlog.get_logger("receiver.ui")
Handler = Callable[[Request], Awaitable[Response]]
JOB_STATUSES = (SUBMITTING, *STATUS_RANK, SUBMIT_FAILED, TIMED_OUT)
DELIVERY_STATES: tuple[str, ...] = get_args(DeliveryFilterState)
PRETTY_LIMIT = 256 * 1024  # a prediction is also shown as indented text up to this size
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
    # The address the proxy middleware resolved: the client's own behind a trusted proxy.
    client = request.client.host if request.client else "-"
    limit = sign_in_limit(request)
    wait = limit.retry_after(client, svc.clock())
    if wait:
        log.warning("ui.signin_limited", client=client, retry_after=wait)
        answer = render(
            request,
            "signin.html",
            429,
            error=f"Too many wrong tokens from your address: try again in {wait} s.",
        )
        answer.headers["Retry-After"] = str(wait)
        return answer
    if not sign_in(request, fields.get("token", ""), svc.settings.admin_token, svc.clock()):
        limit.failed(client, svc.clock())
        log.warning("ui.signin_refused", client=client)
        return render(request, "signin.html", 401, error="That is not the admin token.")
    limit.succeeded(client)
    log.info("ui.signed_in", client=client)
    return RedirectResponse(request.url_for("ui:overview"), status_code=303)


@page
async def signout(request: Request) -> Response:
    await checked_form(request)
    request.session.clear()
    return RedirectResponse(request.url_for("ui:signin"), status_code=303)


@page
async def jobs(request: Request) -> Response:
    q = parse(JobsQuery, query(request), 400)
    listing = await services(request).store.list_jobs(
        q.status,
        q.domain,
        q.limit,
        q.cursor,
        since=epoch(q.since),
        until=epoch(q.until),
        search=q.q,
    )
    return render(
        request,
        "jobs.html",
        jobs=listing.items,
        q=q,
        times=times(q),
        statuses=JOB_STATUSES,
        next_url=next_page(request, listing),
    )


def next_page(request: Request, listing: Page) -> URL | None:
    """This list's next page: the same filters, the listing's cursor (None: the last page)."""
    if not listing.next_cursor:
        return None
    return request.url.include_query_params(cursor=listing.next_cursor)


def times(q: CreatedBetween) -> dict[str, dict[str, str]]:
    """The time filters as the form shows them: `value` in UTC for a datetime-local input
    (what the page shows without script), `utc` for the script to show in the viewer's zone."""
    shown = {}
    for name in ("since", "until"):
        when = epoch(getattr(q, name))
        if when is None:
            shown[name] = {"value": "", "utc": ""}
        else:
            at = datetime.fromtimestamp(when, UTC)
            shown[name] = {"value": at.strftime("%Y-%m-%dT%H:%M:%S"), "utc": iso(when) or ""}
    return shown


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
    timeline = [
        (
            event,
            jsontree.from_body(event.body),
            pretty(event.body) if len(event.body) <= PRETTY_LIMIT else None,
            len(event.body),
            deliveries[event.id],
        )
        for event in events
    ]
    return render(request, "job.html", job=the_job, timeline=timeline, sinks=svc.sink_names)


@page
async def deliveries(request: Request) -> Response:
    svc = services(request)
    q = parse(DeliveriesQuery, query(request), 400)
    listing = await svc.store.list_deliveries(
        q.state, q.sink, q.limit, q.cursor, q.event_id, since=epoch(q.since), until=epoch(q.until)
    )
    return render(
        request,
        "deliveries.html",
        deliveries=listing.items,
        q=q,
        times=times(q),
        states=DELIVERY_STATES,
        sinks=svc.sink_names,
        next_url=next_page(request, listing),
        filters=filters_of(q),
    )


def filters_of(q: CreatedBetween) -> dict[str, str]:
    """A delivery filter as query fields (what the bulk retry carries from page to page)."""
    fields = {"state": getattr(q, "state", None), "sink": getattr(q, "sink", None)}
    fields |= {name: iso(epoch(getattr(q, name))) for name in ("since", "until")}
    return {k: v for k, v in fields.items() if v}


def deliveries_url(request: Request, fields: dict[str, str]) -> str:
    url = str(request.url_for("ui:deliveries").path)
    return f"{url}?{urlencode(fields)}" if fields else url


@page
async def retry_matching(request: Request) -> Response:
    """Retry every delivery the filters match: GET counts them and asks to confirm (a page,
    so it works without script); the confirmation POSTs back here."""
    if request.method == "POST":
        return await retry_confirmed(request)
    svc = services(request)
    wanted = parse(RetryMatching, query(request), 400)
    check_sink(request, wanted.sink)
    count, newest = await svc.store.count_requeueable(
        wanted.state, wanted.sink, since=epoch(wanted.since), until=epoch(wanted.until)
    )
    fields = filters_of(wanted)
    return render(
        request,
        "retry_matching.html",
        count=count,
        upto=newest,
        fields=fields,
        back=deliveries_url(request, fields),
    )


async def retry_confirmed(request: Request) -> Response:
    """The bulk retry, confirmed: every delivery the filters match, up to the newest one
    counted, back in the queue in one statement."""
    fields = await checked_form(request)
    upto = fields.pop("upto", "")
    if not _ROW_ID.match(upto):
        raise BadRequest("The confirmation is incomplete; count again.", 400)
    svc = services(request)
    wanted = parse(RetryMatching, {k: v for k, v in fields.items() if v}, 400)
    check_sink(request, wanted.sink)
    count = await svc.store.requeue_matching(
        svc.clock(),
        int(upto),
        wanted.state,
        wanted.sink,
        since=epoch(wanted.since),
        until=epoch(wanted.until),
    )
    log.info("ui.retried_matching", state=wanted.state, sink=wanted.sink, requeued=count)
    request.session["flash"] = _done(count)
    return RedirectResponse(deliveries_url(request, filters_of(wanted)), status_code=303)


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
