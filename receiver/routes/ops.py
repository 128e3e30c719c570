"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from receiver.errors import StoreError
from receiver.routes import JSON, services


async def healthz(request: Request) -> Response:
    """The process is alive and serving."""
    return JSON({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready for traffic: the store answers and, if this process runs one, the worker runs."""
    svc = services(request)
    problems = []
    try:
        await svc.store.ping()
    except StoreError:
        problems.append("store unreachable")
    if svc.settings.worker and not svc.worker_running():
        problems.append("worker not running")
    if problems:
        return JSON({"status": "unavailable", "problems": problems}, status_code=503)
    return JSON({"status": "ready"})


async def metrics(request: Request) -> Response:
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
