"""The overview: `/ui/`, the landing page, and `/ui/overview/live`, the part of it that the
page fetches again every few seconds (receiver/ui/static/dashboard.js swaps it in).

Each figure comes from where it can be known honestly:
- from the store, whichever process asks (`store.overview`): jobs by status, deliveries by
  state per sink, each sink's queue depth, oldest undelivered row and last error, the
  overdue jobs and the next poll, and the last hour's callbacks, deliveries, failed sends and
  callback-to-sink latency;
- from this process, only when it runs the dispatcher and reconciler (`receiver serve`
  without `--no-worker`): each sink's circuit breaker and whether the reconciler is paused
  after a 429. A web process without them says "run by another process" instead of guessing
  (with PostgreSQL, the `receiver worker` processes keep that state, each its own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from receiver.models import DeliveryState
from receiver.outbox import Dispatcher
from receiver.reconcile import Reconciler
from receiver.routes import Services, services
from receiver.store import Overview
from receiver.ui.pages import JOB_STATUSES, page, render, templates

LIVE_SECONDS = 5  # how often an open overview asks again
STATES = tuple(s.value for s in DeliveryState)
ELSEWHERE = "run by another process"


@dataclass(frozen=True, slots=True)
class Circuit:
    """A sink's breaker as this process knows it; `state` is closed, open, half-open,
    disabled, or ELSEWHERE."""

    state: str
    detail: str = ""
    until: float | None = None


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def runs_worker(svc: Services) -> bool:
    """Whether the dispatcher and reconciler run in this process (and have not crashed)."""
    return svc.settings.worker and svc.worker_running()


def circuits(request: Request, svc: Services, now: float) -> dict[str, Circuit]:
    """Each configured sink's breaker: this process's own when it runs the dispatcher."""
    if not runs_worker(svc):
        return {name: Circuit(ELSEWHERE) for name in svc.sink_names}
    dispatcher: Dispatcher = request.app.state.dispatcher
    found: dict[str, Circuit] = {}
    for name, sender in dispatcher.senders.items():
        breaker = sender.breaker
        if sender.disabled is not None:
            found[name] = Circuit("disabled", f"until restart: {sender.disabled}")
        elif not breaker.allows(now):
            found[name] = Circuit("open", f"{breaker.failures} failures", breaker.open_until)
        elif breaker.probing:
            found[name] = Circuit("half-open", "the next send decides")
        else:
            failures = f"{breaker.failures} failures in a row" if breaker.failures else ""
            found[name] = Circuit("closed", failures)
    return found


def throttled_until(request: Request, svc: Services, now: float) -> float | str | None:
    """When the reconciler's pause after a 429 ends (None: not paused), or ELSEWHERE."""
    if not runs_worker(svc):
        return ELSEWHERE
    reconciler: Reconciler = request.app.state.reconciler
    return reconciler.throttled_until if reconciler.throttled_until > now else None


def charts(found: Overview) -> dict[str, Any]:
    """The charts' data, as uPlot takes it: x (minute starts, epoch seconds), then series."""
    xs = [m.start for m in found.minutes]
    by_minute: dict[int, list[float]] = {}
    start = xs[0]
    for at, seconds in found.latencies:
        by_minute.setdefault(int((at - start) // 60), []).append(seconds * 1000)
    p50 = [percentile(by_minute.get(i, []), 0.5) for i in range(len(xs))]
    p99 = [percentile(by_minute.get(i, []), 0.99) for i in range(len(xs))]
    return {
        "activity": [
            xs,
            [m.callbacks for m in found.minutes],
            [m.delivered for m in found.minutes],
            [m.failed for m in found.minutes],
        ],
        "latency": [xs, p50, p99],
    }


async def context(request: Request) -> dict[str, Any]:
    svc = services(request)
    now = svc.clock()
    found = await svc.store.overview(now)
    sinks = sorted(set(svc.sink_names) | set(found.deliveries))
    latencies = [seconds * 1000 for _, seconds in found.latencies]
    return {
        "now": now,
        "o": found,
        "statuses": [s for s in JOB_STATUSES if s in found.jobs]
        + sorted(set(found.jobs) - set(JOB_STATUSES)),
        "jobs_total": sum(found.jobs.values()),
        "states": STATES,
        "sinks": sinks,
        "configured": set(svc.sink_names),
        "circuits": circuits(request, svc, now),
        "throttled": throttled_until(request, svc, now),
        "elsewhere": ELSEWHERE,
        "totals": {
            "callbacks": sum(m.callbacks for m in found.minutes),
            "delivered": sum(m.delivered for m in found.minutes),
            "failed": sum(m.failed for m in found.minutes),
        },
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "charts": charts(found),
        "every": LIVE_SECONDS,
    }


@page
async def overview(request: Request) -> Response:
    return render(request, "overview.html", **await context(request))


@page
async def live(request: Request) -> Response:
    """The overview's live part alone: what the open page fetches every LIVE_SECONDS."""
    return render(request, "overview_live.html", **await context(request))


def milliseconds(value: float | None) -> str:
    """A latency in ms for the page (a dash for none)."""
    if value is None:
        return "\N{EN DASH}"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


templates.env.filters["ms"] = milliseconds
