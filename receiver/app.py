"""`create_app(settings)`: the Starlette app, with its store, clients and background worker.

Behind a reverse proxy, see receiver.proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from receiver import logs
from receiver.config import Settings, load_sinks
from receiver.errors import StoreError, StoreUnavailable
from receiver.logs import redact_path
from receiver.metrics import Metrics
from receiver.models import new_id
from receiver.outbox import Dispatcher, RetryPolicy
from receiver.proxy import ProxyHeaders, mount
from receiver.reconcile import Reconciler
from receiver.routes import (
    JSON,
    AdminOnly,
    BadRequest,
    NoNulInUrl,
    Services,
    deliveries,
    error,
    jobs,
    ops,
)
from receiver.routes.callbacks import CALLBACK_PATH, CallbackEndpoint
from receiver.routes.guesses import SignInLimit
from receiver.routes.openapi import openapi
from receiver.sinks import open_sink
from receiver.store import Store, open_store
from receiver.ui import routes as dashboard
from receiver.vlmrun import VlmRunClient

log = structlog.get_logger("receiver.app")


class RequestContext:
    """Gives every request an id (a sane X-Request-ID kept, else one made; always returned),
    binds it to every log line of the request, and writes one access line with the callback
    token redacted. An unhandled error becomes a logged 500 with the same id, not a traceback
    on stderr."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = logs.request_id(given.decode("latin-1") if given else None) or new_id("req")
        logs.reset(request_id=request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        # Unchanged only if the app returned without answering: the client went away first
        # (nginx's 499, "client closed request"); an error answers 500 below.
        status = 499
        started = False
        header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("http.failed", method=scope["method"], path=redact_path(scope["path"]))
            if not started:
                await JSON({"error": "internal error", "request_id": request_id}, 500)(
                    scope, receive, send_with_id
                )
        finally:
            log.info(
                "http.request",
                method=scope["method"],
                path=redact_path(scope["path"]),
                status=status,
                client=(scope.get("client") or ("-",))[0],
                scheme=scope.get("scheme", "http"),
                duration_ms=round((time.perf_counter() - start) * 1000, 2),
            )


def _vlmrun(settings: Settings, http: httpx.AsyncClient) -> tuple[VlmRunClient, Any]:
    """The real API with a key; without one, the bundled simulator, in process."""
    if settings.vlmrun_api_key is not None:
        return VlmRunClient(
            http, settings.vlmrun_base_url, settings.vlmrun_api_key.get_secret_value()
        ), None
    from receiver.simulator import SimulatorOptions, create_simulator_app

    secrets = [s.get_secret_value() for s in settings.vlmrun_webhook_secrets]
    sim = create_simulator_app(
        SimulatorOptions(webhook_secret=secrets[0] if secrets else None), client=http
    )
    transport = httpx.ASGITransport(app=sim)
    client = httpx.AsyncClient(transport=transport, timeout=settings.vlmrun_timeout)
    return VlmRunClient(client, "http://simulator/v1", "simulated"), (sim, client)


async def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    return error(exc.status, exc.reason)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (404, 405, bad multipart, ...) in our shape: `{"error": ...}`."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    answer = error(exc.status_code, str(exc.detail))
    answer.headers.update(exc.headers or {})
    return answer


async def _store_failed(request: Request, exc: Exception) -> Response:
    log.error("store.failed", error=str(exc))
    return error(503, "store unavailable, retry later")


class RootPath:
    """Serves the app under `RECEIVER_ROOT_PATH` whether or not the proxy stripped it."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            mount(scope, self.prefix)
        await self.app(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    http: httpx.AsyncClient | None = None,
    clock: Callable[[], float] = time.time,
    ops_only: bool = False,
) -> Starlette:
    """The service. `ops_only` serves just /healthz, /readyz and /metrics: what a
    `receiver worker` exposes so that its own health and counters can be watched."""
    sink_configs = load_sinks(settings.sinks_file)
    store = store or open_store(settings.database_url, [s.route for s in sink_configs])
    http = http or httpx.AsyncClient(timeout=settings.vlmrun_timeout)
    vlmrun, simulator = _vlmrun(settings, http)
    metrics = Metrics()
    sinks = {c.name: open_sink(c) for c in sink_configs}
    dispatcher = Dispatcher(
        store,
        sinks,
        {c.name: RetryPolicy.for_sink(c) for c in sink_configs},
        metrics,
        clock=clock,
        batch=settings.dispatch_batch,
        concurrency=settings.dispatch_concurrency,
        limits={c.name: c.concurrency for c in sink_configs if c.concurrency},
        lease_seconds=settings.lease_seconds,
        poll_interval=settings.poll_interval,
    )
    reconciler = Reconciler(store, vlmrun, metrics, settings, clock=clock)
    tasks: list[asyncio.Task[None]] = []
    svc = Services(
        settings=settings,
        store=store,
        vlmrun=vlmrun,
        metrics=metrics,
        clock=clock,
        webhook_secrets=[s.get_secret_value() for s in settings.vlmrun_webhook_secrets],
        sink_names=tuple(sinks),
        worker_running=lambda: bool(tasks) and not any(t.done() for t in tasks),
    )

    for name in sinks:
        metrics.circuit_open.labels(name).set(0)

    def start_worker() -> None:
        if settings.worker:
            tasks.append(asyncio.create_task(dispatcher.run(), name="dispatcher"))
            tasks.append(asyncio.create_task(reconciler.run(), name="reconciler"))

    async def migrate_when_reachable() -> None:
        """The store was down at start: keep trying; readyz says 503 meanwhile."""
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            try:
                await store.migrate()
            except StoreUnavailable as exc:
                log.error("store.unavailable", error=str(exc), retry_in=delay)
                continue
            svc.store_ready = True
            log.info("store.ready")
            start_worker()
            return

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        starting: asyncio.Task[None] | None = None
        try:
            await store.migrate()
            svc.store_ready = True
        except StoreUnavailable as exc:
            # Serve anyway: /healthz answers, /readyz and callbacks say 503 (so senders retry)
            # until the store is back; then the schema is checked and the worker starts.
            log.error("store.unavailable", error=str(exc), retry_in=0.5)
            starting = asyncio.create_task(migrate_when_reachable(), name="store-wait")
        async with contextlib.AsyncExitStack() as stack:
            if simulator is not None:
                sim_app, sim_client = simulator
                await stack.enter_async_context(sim_app.router.lifespan_context(sim_app))
                stack.push_async_callback(sim_client.aclose)
                log.warning("vlmrun.simulated", reason="RECEIVER_VLMRUN_API_KEY is not set")
            if not svc.webhook_secrets:
                log.warning("callbacks.unsigned", reason="RECEIVER_VLMRUN_WEBHOOK_SECRETS not set")
            if svc.store_ready:
                start_worker()
            log.info("service.started", sinks=list(sinks), worker=settings.worker)
            try:
                yield
            finally:
                log.info("service.stopping")
                if starting is not None:
                    starting.cancel()
                    await asyncio.gather(starting, return_exceptions=True)
                await dispatcher.stop()
                await reconciler.stop()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for sink in sinks.values():
                    await sink.close()
                await http.aclose()
                await store.close()
                log.info("service.stopped")
                # uvicorn re-raises SIGTERM once it has shut down: atexit may never run.
                logs.flush()

    # The callback route first: the router tries routes in order, and it is the hot path.
    routes: list[BaseRoute] = (
        [] if ops_only else [Route(CALLBACK_PATH, CallbackEndpoint(svc), methods=["POST"])]
    )
    routes += [
        Route("/healthz", ops.healthz),
        Route("/readyz", ops.readyz),
        Route("/metrics", ops.metrics),
    ]
    if not ops_only:
        # Wrong admin tokens count alike on the sign-in form and on /v1: one secret.
        guesses = SignInLimit(settings.signin_failures)
        admin = [
            Middleware(NoNulInUrl),
            Middleware(AdminOnly, token=settings.admin_token, guesses=guesses, clock=clock),
        ]
        routes += [
            Route("/openapi.json", openapi),
            Mount("/v1", routes=[*jobs.routes, *deliveries.routes], middleware=admin),
            *dashboard(settings, clock, guesses),
        ]
    restrict_hosts = "*" not in settings.allowed_hosts
    # Client address and scheme come from X-Forwarded-*/Forwarded only from a trusted proxy.
    prefix = settings.root_path.rstrip("/")
    middleware = [Middleware(RootPath, prefix=prefix)] if prefix else []
    middleware += [
        Middleware(ProxyHeaders, trusted_hosts=settings.trusted_proxies),
        Middleware(RequestContext),
    ]
    if restrict_hosts:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            BadRequest: _bad_request,
            StoreError: _store_failed,
            HTTPException: _http_error,
        },
    )
    app.state.services = svc
    app.state.dispatcher = dispatcher
    app.state.reconciler = reconciler  # the dashboard's overview and sinks pages read both
    app.state.sink_configs = sink_configs
    return app
