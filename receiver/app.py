"""`create_app(settings)`: the Starlette app, with its store, clients and background worker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from receiver import logs
from receiver.config import Settings, load_sinks
from receiver.errors import StoreError
from receiver.logs import redact_path
from receiver.metrics import Metrics
from receiver.models import new_id
from receiver.outbox import Dispatcher, RetryPolicy
from receiver.reconcile import Reconciler
from receiver.routes import BadRequest, Services, deliveries, error, jobs, ops
from receiver.routes.callbacks import CallbackEndpoint, callback_token
from receiver.routes.openapi import openapi
from receiver.sinks import open_sink
from receiver.store import Store, open_store
from receiver.vlmrun import VlmRunClient

log = structlog.get_logger("receiver.app")


class RequestContext:
    """Gives every request an id (X-Request-ID kept or made, and returned), binds it to every
    log line of the request, and writes one access line with the callback token redacted."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = next(
            (v.decode("latin-1")[:128] for k, v in scope["headers"] if k == b"x-request-id"),
            None,
        ) or new_id("req")
        logs.reset(request_id=request_id)
        if scope["path"].startswith("/callbacks/"):
            # The hot path answers with the id itself and logs its own outcome line.
            scope.setdefault("state", {})["request_id"] = request_id
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info(
                "http.request",
                method=scope["method"],
                path=redact_path(scope["path"]),
                status=status,
                client=(scope.get("client") or ("-",))[0],
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


async def _store_failed(request: Request, exc: Exception) -> Response:
    log.error("store.failed", error=str(exc))
    return error(503, "store unavailable, retry later")


class ReceiverApp(Starlette):
    """Starlette, with callbacks dispatched straight to their endpoint (see routes.callbacks)."""

    callbacks: CallbackEndpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if callback_token(scope) is not None:
            await self.callbacks(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    http: httpx.AsyncClient | None = None,
    clock: Callable[[], float] = time.time,
) -> Starlette:
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

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.migrate()
        async with contextlib.AsyncExitStack() as stack:
            if simulator is not None:
                sim_app, sim_client = simulator
                await stack.enter_async_context(sim_app.router.lifespan_context(sim_app))
                stack.push_async_callback(sim_client.aclose)
                log.warning("vlmrun.simulated", reason="RECEIVER_VLMRUN_API_KEY is not set")
            if not svc.webhook_secrets:
                log.warning("callbacks.unsigned", reason="RECEIVER_VLMRUN_WEBHOOK_SECRETS not set")
            if settings.worker:
                tasks.append(asyncio.create_task(dispatcher.run(), name="dispatcher"))
                tasks.append(asyncio.create_task(reconciler.run(), name="reconciler"))
            log.info("service.started", sinks=list(sinks), worker=settings.worker)
            try:
                yield
            finally:
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

    callback_endpoint = CallbackEndpoint(svc)
    routes = [
        Route("/healthz", ops.healthz),
        Route("/readyz", ops.readyz),
        Route("/metrics", ops.metrics),
        Route("/openapi.json", openapi),
        Route("/v1/jobs", jobs.create_job, methods=["POST"]),
        Route("/v1/jobs", jobs.list_jobs, methods=["GET"]),
        Route("/v1/jobs/{job_id}", jobs.get_job, methods=["GET"]),
        *deliveries.routes,
    ]
    middleware = [Middleware(RequestContext)]
    if settings.allowed_hosts != ["*"]:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts))
    # Client address and scheme come from X-Forwarded-* only when the peer is a trusted proxy.
    middleware.insert(0, Middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies))
    app = ReceiverApp(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={BadRequest: _bad_request, StoreError: _store_failed},
    )
    app.callbacks = callback_endpoint
    app.state.services = svc
    app.state.dispatcher = dispatcher
    return app
