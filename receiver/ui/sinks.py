"""The Sinks page: `/ui/sinks`, each configured sink (its URL with credentials masked, filters,
retry schedule, state) and a button that sends it a test event.

The test event is sent at once, straight through the sink's own code (the same signing,
headers and timeout as a real delivery), and the answer is shown: what someone setting up a
sink wants to know is whether it takes our messages now. It goes around the outbox, so it is
not recorded, not retried and not counted by the breaker, and it is no job's event: its type
is `receiver.test` (a consumer should ignore types it does not know) and its id starts
`evt_test_`.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from receiver.config import SinkConfig
from receiver.errors import SinkError
from receiver.models import iso, new_id
from receiver.outbox import Dispatcher
from receiver.retry import RetryPolicy
from receiver.routes import BadRequest, services
from receiver.sinks import Message
from receiver.ui import overview
from receiver.ui.pages import page, render
from receiver.ui.session import checked_form

log = structlog.get_logger("receiver.ui")
MASK = "***"
TEST_GRACE = 5.0  # seconds beyond the sink's own timeout before a test send is given up
TEXT_MAX = 600  # characters of a test's answer kept: the session is a cookie (4 kB at most)


def masked_url(url: str) -> str:
    """`url` fit to show: user and password masked; for a webhook (http, https) the path and
    query too, which often are the credential (Slack, Discord and Teams put it in the path,
    Azure Functions in `?code=`): the sink's own error messages hide them for the same reason.
    Other sinks' paths (a file, a Redis database, a vhost) are shown, their query values not."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{MASK}:{MASK}@{host}" if ":" in userinfo else f"{MASK}@{host}"
    if parts.scheme in ("http", "https"):
        hidden = parts.path.strip("/") or parts.query
        return urlunsplit((parts.scheme, netloc, f"/{MASK}" if hidden else parts.path, "", ""))
    query = urlencode(
        [(k, MASK) for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*"
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def schedule(config: SinkConfig) -> str:
    """The retry schedule in words: the delay before each attempt."""
    delays = RetryPolicy.for_sink(config).schedule
    return ", ".join(_seconds(d) for d in delays) + f" ({len(delays)} attempts, ±20 % jitter)"


def _seconds(value: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if value >= size:
            return f"{value / size:g} {unit}"
    return f"{value:g} s"


@page
async def sinks(request: Request) -> Response:
    svc = services(request)
    now = svc.clock()
    found = await svc.store.overview(now)
    configs: list[SinkConfig] = request.app.state.sink_configs
    shown = [
        {
            "config": c,
            "url": masked_url(c.url),
            "schedule": schedule(c),
            "counts": found.deliveries.get(c.name, {}),
        }
        for c in configs
    ]
    # The last test event's answer, shown once, in its sink's section (where the page opens).
    tested = request.session.pop("sink_test") if "sink_test" in request.session else None
    return render(
        request,
        "sinks.html",
        sinks=shown,
        tested=tested,
        o=found,
        circuits=overview.circuits(request, svc, now),
        elsewhere=overview.ELSEWHERE,
        states=overview.STATES,
    )


def test_message(sink: str, now: float) -> Message:
    event_id = new_id("evt_test")
    body = {
        "type": "receiver.test",
        "id": event_id,
        "sink": sink,
        "sent_at": iso(now),
        "data": {"note": "a test event sent from receiver's dashboard; ignore it"},
    }
    return Message(event_id, "receiver.test", orjson.dumps(body))


@page
async def test(request: Request) -> Response:
    """Send a test event to one sink now and say what it answered."""
    await checked_form(request)
    svc = services(request)
    name = request.path_params["sink"]
    dispatcher: Dispatcher = request.app.state.dispatcher
    configs = {c.name: c for c in request.app.state.sink_configs}
    if name not in dispatcher.senders or name not in configs:
        raise BadRequest(f"No sink named {name!r} is configured.", 404)
    message = test_message(name, svc.clock())
    started = time.perf_counter()
    try:
        async with asyncio.timeout(configs[name].timeout + TEST_GRACE):
            receipt = await dispatcher.senders[name].sink.send(message)
    except Exception as exc:  # the sink's error, a timeout, or a bug in its code: shown alike
        took = (time.perf_counter() - started) * 1000
        # A SinkError's reason is cleaned of the sink's secrets by the sink; anything else is
        # named by its type only, since its text may quote a URL or a credential.
        reason = exc.reason if isinstance(exc, SinkError) else type(exc).__name__
        log.info("ui.sink_tested", sink=name, event_id=message.event_id, ok=False, error=reason)
        text = f"Test event to {name} failed after {took:.0f} ms: {reason}"
        request.session["sink_test"] = {"sink": name, "ok": False, "text": text[:TEXT_MAX]}
    else:
        took = (time.perf_counter() - started) * 1000
        answer = f"status {receipt.status_code}" if receipt.status_code is not None else "taken"
        log.info("ui.sink_tested", sink=name, event_id=message.event_id, ok=True)
        text = f"Test event {message.event_id} sent to {name}: {answer} in {took:.0f} ms" + (
            f"; it answered {receipt.snippet[:200]!r}" if receipt.snippet else ""
        )
        request.session["sink_test"] = {"sink": name, "ok": True, "text": text[:TEXT_MAX]}
    return RedirectResponse(f"{request.url_for('ui:sinks')}#sink-{name}", status_code=303)
