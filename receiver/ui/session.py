"""The dashboard's session: signing in with the admin token, the cookie, and CSRF checks.

The cookie is Starlette's `SessionMiddleware` (signed with itsdangerous), scoped to the
dashboard's path, `HttpOnly`, `SameSite=Strict`, `Secure` when the request came over HTTPS,
and good for `SESSION_SECONDS` from sign-in. Its secret is an HMAC of the admin token, so no
new setting is needed and changing the token signs everyone out.

Every state-changing request is a form POST carrying the session's CSRF token in a hidden
field; it is refused (403) without it, or when `Origin` (or `Sec-Fetch-Site`) says it came
from another site. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from urllib.parse import parse_qsl

from pydantic import SecretStr
from starlette.datastructures import URL, MutableHeaders
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from receiver.routes import BadRequest
from receiver.routes.guesses import SignInLimit

SESSION_SECONDS = 12 * 3600
COOKIE = "receiver_ui"
FORM_LIMIT = 16 * 1024  # our forms carry a few short fields
FORM_FIELDS = 10
# Pages load nothing from elsewhere and run no inline script; nobody may frame them.
HEADERS = {
    "content-security-policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "referrer-policy": "same-origin",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


def session_secret(token: SecretStr | None) -> str:
    """The cookie's signing key. Without an admin token nobody can sign in, so a random key
    serves (and no cookie outlives the process)."""
    if token is None:
        return secrets.token_hex(32)
    key = token.get_secret_value().encode()
    return hmac.new(key, b"receiver.ui.session", hashlib.sha256).hexdigest()


class SessionCookie:
    """Starlette's SessionMiddleware with `Secure` set per request: a service reached over
    plain HTTP on a laptop must still work, while over HTTPS (the scheme is the proxy's
    `X-Forwarded-Proto` when the proxy is trusted) the cookie is never sent in clear."""

    def __init__(self, app: ASGIApp, secret: str, path: str) -> None:
        self.plain = SessionMiddleware(
            app, secret, COOKIE, SESSION_SECONDS, path, same_site="strict", https_only=False
        )
        self.secure = SessionMiddleware(
            app, secret, COOKIE, SESSION_SECONDS, path, same_site="strict", https_only=True
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chosen = self.secure if scope.get("scheme") in ("https", "wss") else self.plain
        await chosen(scope, receive, send)


def signed_in(request: Request, now: float) -> bool:
    """Whether this session signed in less than SESSION_SECONDS ago. The cookie's own
    timestamp restarts whenever the session changes (a flash message), so the sign-in time
    is kept and checked too: a session ends 12 hours after sign-in, however busy."""
    since = request.session.get("signed_in_at")
    return isinstance(since, int | float) and 0 <= now - since < SESSION_SECONDS


def sign_in_limit(request: Request) -> SignInLimit:
    limit: SignInLimit = request.scope["receiver.signin_limit"]
    return limit


class SignedIn:
    """Inside the dashboard's mount: every path but the sign-in form and the static files
    needs a live session, else a redirect to the form; every answer gets HEADERS. It also
    passes on the wrong-token counts (in the scope, for the sign-in form)."""

    def __init__(self, app: ASGIApp, clock: Callable[[], float], limit: SignInLimit) -> None:
        self.app = app
        self.clock = clock
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        scope["receiver.signin_limit"] = self.limit
        # Inside the mount, root_path ends in /ui and path still carries it.
        rest = scope["path"][len(scope.get("root_path", "")) :]
        request = Request(scope, receive)
        if rest in ("/signin",) or rest.startswith("/static/") or signed_in(request, self.clock()):
            await self.app(scope, receive, send_with_headers)
            return
        if request.session.get("signed_in_at") is not None:
            request.session.clear()  # expired: the cookie goes too
        answer = RedirectResponse(request.url_for("ui:signin"), status_code=303)
        await answer(scope, receive, send_with_headers)


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use (the sign-in form makes it)."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def same_origin(request: Request, origin: str) -> bool:
    """Whether `origin` is this service as the browser sees it. A proxy that passes `Host`
    without its port (nginx's `$host`) leaves the port unknown: then scheme and host decide,
    and the CSRF token still has to match."""
    own = request.url
    theirs = URL(origin)
    if own.port is None:
        return (theirs.scheme, theirs.hostname) == (own.scheme, own.hostname)
    return origin == f"{own.scheme}://{own.netloc}"


def refuse_other_sites(request: Request) -> None:
    """BadRequest(403) unless the request comes from our own pages (`Origin`, `Sec-Fetch-Site`)."""
    origin = request.headers.get("origin")
    if origin is not None and not same_origin(request, origin):
        raise BadRequest("refused: this form was sent from another site", 403)
    if request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        raise BadRequest("refused: this form was sent from another site", 403)


def check_csrf(request: Request, given: str) -> None:
    """BadRequest(403) unless `given` is the session's CSRF token (constant-time compare)."""
    expected = request.session.get("csrf")
    if not isinstance(expected, str) or not hmac.compare_digest(given.encode(), expected.encode()):
        raise BadRequest("refused: the form's CSRF token is missing or stale; reload the page", 403)


async def checked_form(request: Request) -> dict[str, str]:
    """A state-changing POST's fields, once it has shown it comes from our own page: same
    origin, and the session's CSRF token in the `csrf` field. Else BadRequest(403)."""
    refuse_other_sites(request)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_LIMIT:
            raise BadRequest(f"form over {FORM_LIMIT} bytes", 413)
    fields: dict[str, str] = {}
    # Our forms are urlencoded; any other body has no token to find, so it is refused below.
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/x-www-form-urlencoded":
        try:
            fields = dict(
                parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=FORM_FIELDS)
            )
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("the form could not be read", 400) from None
    check_csrf(request, fields.pop("csrf", ""))
    return fields


def sign_in(request: Request, given: str, token: SecretStr | None, now: float) -> bool:
    """Start a session when `given` is the admin token (constant-time compare). A fresh
    session and CSRF token on success: nothing from before sign-in carries over."""
    if token is None:
        return False
    # Digests first: compare_digest on equal lengths does not reveal the token's length.
    ok = hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(),
        hashlib.sha256(token.get_secret_value().encode()).digest(),
    )
    if ok:
        request.session.clear()
        request.session["signed_in_at"] = now
        request.session["csrf"] = secrets.token_urlsafe(32)
    return ok
