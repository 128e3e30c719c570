"""The dashboard: `/ui/`, server-rendered pages of jobs, events and deliveries, with replay and
retry, behind a sign-in with the admin token (receiver.ui.session). `GET /` redirects here.

Templates and static files ship inside the package: nothing is fetched from a CDN, so the
dashboard works air-gapped and under `RECEIVER_ROOT_PATH` (every link is made by `url_for`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from receiver.config import Settings
from receiver.routes import NoNulInUrl
from receiver.routes.guesses import SignInLimit
from receiver.ui import overview, pages, sinks, submit
from receiver.ui.session import SessionCookie, SignedIn, session_secret


def _page(path: str, endpoint: pages.Handler, **options: Any) -> Route:
    """A page, not API: /openapi.json leaves it out."""
    return Route(path, endpoint, include_in_schema=False, **options)


def routes(
    settings: Settings, clock: Callable[[], float], guesses: SignInLimit
) -> list[BaseRoute]:
    """`GET /` and the `/ui` mount, its session cookie scoped to the mount's path; `guesses`
    counts wrong tokens on the sign-in form (shared with the admin API)."""
    cookie_path = settings.root_path.rstrip("/") + "/ui"
    middleware = [
        Middleware(NoNulInUrl),
        Middleware(SessionCookie, secret=session_secret(settings.admin_token), path=cookie_path),
        Middleware(SignedIn, clock=clock, limit=guesses),
    ]
    ui = [
        _page("/", overview.overview, name="overview"),
        _page("/overview/live", overview.live, name="overview_live"),
        _page("/jobs", pages.jobs, name="jobs"),
        _page("/signin", pages.signin_form, methods=["GET", "POST"], name="signin"),
        _page("/signout", pages.signout, methods=["POST"], name="signout"),
        _page("/find", pages.find, name="find"),
        _page("/jobs/{job_id}", pages.job, name="job"),
        _page("/events/{event_id}", pages.event, name="event"),
        _page("/events/{event_id}/replay", pages.replay, methods=["POST"], name="replay"),
        _page("/deliveries", pages.deliveries, name="deliveries"),
        _page(
            "/deliveries/retry",
            pages.retry_matching,
            methods=["GET", "POST"],
            name="retry_matching",
        ),
        _page("/deliveries/{delivery_id}/retry", pages.retry, methods=["POST"], name="retry"),
        _page("/submit", submit.submit, methods=["GET", "POST"], name="submit"),
        _page("/sinks", sinks.sinks, name="sinks"),
        _page("/sinks/{sink}/test", sinks.test, methods=["POST"], name="sink_test"),
        Mount("/static", StaticFiles(packages=[("receiver.ui", "static")]), name="static"),
    ]
    return [_page("/", pages.root), Mount("/ui", routes=ui, middleware=middleware, name="ui")]
