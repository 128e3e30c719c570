"""HTTP routes. Each module is one resource; they share the `Services` the app wires up."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, SecretStr, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from receiver.config import Settings
from receiver.metrics import Metrics
from receiver.routes.guesses import SignInLimit
from receiver.routes.schemas import reason
from receiver.store import Store
from receiver.vlmrun import VlmRunClient

Model = TypeVar("Model", bound=BaseModel)


@dataclass
class Services:
    """Everything a request handler may use, built once by `create_app`."""

    settings: Settings
    store: Store
    vlmrun: VlmRunClient
    metrics: Metrics
    clock: Callable[[], float]
    webhook_secrets: list[str] = field(default_factory=list)
    sink_names: tuple[str, ...] = ()
    worker_running: Callable[[], bool] = lambda: False
    store_ready: bool = False  # migrated and reachable at least once since start


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error(status: int, reason: str, **extra: Any) -> JSON:
    """Every refusal has the same shape: `{"error": reason, ...}`."""
    return JSON({"error": reason, **extra}, status_code=status)


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


class AdminOnly:
    """ASGI middleware for everything under `/v1`: the admin bearer token (compared in
    constant time) or 401, before any handler runs. Wrong tokens count against the client
    as on the sign-in form (`guesses`); past the limit, 429 until it has passed."""

    def __init__(
        self,
        app: ASGIApp,
        token: SecretStr | None,
        guesses: SignInLimit,
        clock: Callable[[], float],
    ) -> None:
        self.app = app
        self.expected = f"bearer {token.get_secret_value()}".encode() if token else None
        self.guesses = guesses
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.expected is None:
            refusal = error(401, "admin API disabled: set RECEIVER_ADMIN_TOKEN")
            await refusal(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        client = (scope.get("client") or ("-",))[0]
        now = self.clock()
        wait = self.guesses.retry_after(client, now) if given else 0  # no token: no guess
        if wait:
            refusal = JSON(
                {"error": "too many wrong tokens from this address; try again later"},
                status_code=429,
                headers={"Retry-After": str(wait)},
            )
            await refusal(scope, receive, send)
            return
        scheme, _, token = given.partition(b" ")
        if hmac.compare_digest(scheme.lower() + b" " + token.strip(), self.expected):
            await self.app(scope, receive, send)
            return
        if given:
            self.guesses.failed(client, now)
        refusal = JSON(
            {"error": "missing or wrong bearer token"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await refusal(scope, receive, send)


class NoNulInUrl:
    """Refuses a URL with a NUL character in its path or query (400), on the admin API and the
    dashboard (a callback's token is hashed before any lookup): no id, filter or name of ours
    can hold one, PostgreSQL text cannot store or compare one, and answering such a
    lookup "store unavailable" (503) would send a client retrying what can never work."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
            "\x00" in scope["path"] or b"%00" in scope["query_string"]
        ):
            await error(400, "a URL may not contain a NUL character (%00)")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def parse(model: type[Model], data: Any, status: int) -> Model:
    """`data` as `model`, or BadRequest(status) naming the first field to fix."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(reason(exc, model), status) from None


class BadRequest(Exception):
    """Raised inside a handler; the app turns it into a 4xx with the reason."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
