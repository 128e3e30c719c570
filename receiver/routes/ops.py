"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from receiver.errors import StoreError
from receiver.routes import JSON, services

PING_SECONDS = 3.0  # probes time out after a few seconds: answer before they do


async def healthz(request: Request) -> Response:
    """The process is alive and serving."""
    return JSON({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready for traffic: the store answers (and its schema is in place) and, if this process
    runs one, the worker runs. A 503 takes the replica out of rotation without restarting it."""
    svc = services(request)
    problems = []
    try:
        async with asyncio.timeout(PING_SECONDS):
            await svc.store.ping()
    except (StoreError, TimeoutError):
        problems.append("store unreachable")
    else:
        if not svc.store_ready:
            problems.append("store not migrated yet")
    if svc.settings.worker and not svc.worker_running():
        problems.append("worker not running")
    if problems:
        return JSON({"status": "unavailable", "problems": problems}, status_code=503)
    return JSON({"status": "ready"})


async def metrics(request: Request) -> Response:
    """Prometheus text format; the outbox and job gauges are read from the store per scrape."""
    svc = services(request)
    try:
        stats = await svc.store.stats(svc.clock())
    except StoreError:
        stats = None
    m = svc.metrics
    if stats is not None:
        m.outbox_due.set(stats.outbox_due)
        m.outbox_oldest_age.set(stats.oldest_due_age)
        m.dead.set(stats.dead)
        m.jobs_outstanding.set(stats.jobs_outstanding)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
