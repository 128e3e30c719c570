"""Reconciliation end to end: lost callbacks are recovered by polling, late ones deduplicated,
endless jobs timed out, and what fell overdue while the service was down is caught up at start."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from tests.acceptance.conftest import (
    API_KEY,
    WEBHOOK_SECRET,
    FakeVlmRun,
    Process,
    free_port,
    signed,
    submit,
    wait_for,
)

pytestmark = pytest.mark.acceptance

RECONCILE = {
    "RECEIVER_RECONCILE_AFTER": "0.5",
    "RECEIVER_RECONCILE_MAX_INTERVAL": "1",
    "RECEIVER_RECONCILE_RATE_PER_MINUTE": "6000",
    "RECEIVER_POLL_INTERVAL": "0.2",
}


class ScriptedPredictions(FakeVlmRun):
    """FakeVlmRun whose `GET /v1/predictions/{id}` answers what the test set in `predictions`
    (default: running), so the test decides what polling finds."""

    def __init__(self) -> None:
        super().__init__()
        self.predictions: dict[str, dict[str, Any]] = {}
        self.polls: list[str] = []

    def finish(self, pred_id: str, status: str = "completed") -> bytes:
        """Complete the prediction as the API would; returns the callback body it would send."""
        self.predictions[pred_id] = {
            "id": pred_id,
            "status": status,
            "domain": "document.invoice",
            "response": {"invoice_id": f"INV-{pred_id}", "total_amount": 42},
        }
        return orjson.dumps(self.predictions[pred_id])

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "GET" or "/predictions/" not in path:
            await super().__call__(scope, receive, send)
            return
        pred_id = path.rsplit("/", 1)[1]
        self.polls.append(pred_id)
        answer = self.predictions.get(pred_id, {"id": pred_id, "status": "running"})
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": orjson.dumps(answer)})


def job_state(admin: httpx.Client, service: Process, job_id: str) -> dict[str, Any]:
    r = admin.get(f"{service.url}/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    state: dict[str, Any] = r.json()
    return state


def metric(service: Process, name: str) -> float:
    text = httpx.get(f"{service.url}/metrics").text
    found = re.search(rf"^{name} ([\d.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def scripted_api(asgi_server: Callable[[Any], str]) -> ScriptedPredictions:
    api = ScriptedPredictions()
    api.url = asgi_server(api) + "/v1"
    return api


def test_every_job_completes_through_polling_when_every_callback_is_dropped(
    start_service: Callable[..., Process], admin: httpx.Client
) -> None:
    """The simulator drops every callback; each job still completes within its deadline,
    recovered by the reconciler: one terminal event each, with source "poll"."""
    port = free_port()
    start_service(
        "simulate",
        "--port",
        str(port),
        "--drop-rate",
        "1",
        "--delay",
        "0.05",
        "--api-key",
        API_KEY,
        "--webhook-secret",
        WEBHOOK_SECRET,
        env={"RECEIVER_PORT": str(port)},
        ready="/v1/health",
        name="simulator",
    )
    service = start_service(
        "serve",
        env={
            **RECONCILE,
            "RECEIVER_VLMRUN_API_KEY": API_KEY,
            "RECEIVER_VLMRUN_BASE_URL": f"http://127.0.0.1:{port}/v1",
            "RECEIVER_JOB_DEADLINE": "30",
        },
    )
    jobs = submit(service, 20)

    def all_done() -> list[dict[str, Any]] | None:
        states = [job_state(admin, service, j["id"]) for j in jobs]
        return states if all(s["status"] == "completed" for s in states) else None

    states = wait_for(all_done, 20, "every job to complete")
    for state in states:
        (event,) = state["events"]
        assert (event["status"], event["source"], event["verification"]) == (
            "completed",
            "poll",
            "poll",
        )
        assert event["prediction"]["response"]["invoice_id"]
    assert metric(service, "receiver_reconciler_recoveries_total") == 20
    assert metric(service, "receiver_jobs_timed_out_total") == 0
    assert '"simulator.callback.dropped"' in (service.log.parent / "simulator.log").read_text()


def test_a_late_callback_after_recovery_creates_no_second_event(
    start_service: Callable[..., Process], scripted_api: ScriptedPredictions, admin: httpx.Client
) -> None:
    """The API finishes a job without calling back; polling records it; when the callback
    finally arrives it is answered as a duplicate and the job keeps one event."""
    service = start_service(
        "serve",
        env={
            **RECONCILE,
            "RECEIVER_VLMRUN_API_KEY": API_KEY,
            "RECEIVER_VLMRUN_BASE_URL": scripted_api.url,
        },
    )
    (job,) = submit(service)
    body = scripted_api.finish(job["prediction_id"])
    wait_for(lambda: job_state(admin, service, job["id"])["status"] == "completed", 10, "poll")

    late = httpx.post(
        scripted_api.callback_urls[job["prediction_id"]], content=body, headers=signed(body)
    )
    assert late.status_code == 200 and late.json()["status"] == "duplicate"
    state = job_state(admin, service, job["id"])
    assert [(e["status"], e["source"]) for e in state["events"]] == [("completed", "poll")]
    assert state["completed_at"] is not None


def test_a_job_that_never_finishes_is_timed_out(
    start_service: Callable[..., Process], scripted_api: ScriptedPredictions, admin: httpx.Client
) -> None:
    """A prediction still running past the job deadline: the job becomes timed_out, in the API
    (`GET /v1/jobs/{id}`, `?status=timed_out`) and in receiver_jobs_timed_out."""
    service = start_service(
        "serve",
        env={
            **RECONCILE,
            "RECEIVER_VLMRUN_API_KEY": API_KEY,
            "RECEIVER_VLMRUN_BASE_URL": scripted_api.url,
            "RECEIVER_JOB_DEADLINE": "2",
        },
    )
    (job,) = submit(service)
    started = time.monotonic()
    wait_for(lambda: job_state(admin, service, job["id"])["status"] == "timed_out", 10, "timeout")
    assert time.monotonic() - started >= 1.5  # not before its deadline
    assert len(scripted_api.polls) >= 2  # it was polled while it ran
    listed = admin.get(f"{service.url}/v1/jobs", params={"status": "timed_out"}).json()
    assert [j["id"] for j in listed["items"]] == [job["id"]]
    assert metric(service, "receiver_jobs_timed_out_total") == 1


def test_what_fell_overdue_while_down_is_reconciled_at_start(
    start_service: Callable[..., Process], scripted_api: ScriptedPredictions, admin: httpx.Client
) -> None:
    """Jobs finish while the service is stopped and their callbacks are lost; restarted, it
    polls them at once (long before its idle timer) and they complete."""
    service = start_service(
        "serve",
        env={
            **RECONCILE,
            "RECEIVER_VLMRUN_API_KEY": API_KEY,
            "RECEIVER_VLMRUN_BASE_URL": scripted_api.url,
            "RECEIVER_POLL_INTERVAL": "60",  # idle: only the start-up round can find them
        },
    )
    jobs = submit(service, 3)
    service.stop()
    for job in jobs:
        scripted_api.finish(job["prediction_id"])
        # The callback the API would send now finds nobody listening.
        with pytest.raises(httpx.ConnectError):
            httpx.post(scripted_api.callback_urls[job["prediction_id"]], content=b"{}")
    time.sleep(0.6)  # past reconcile_after: overdue
    assert scripted_api.polls == []  # the first run never got to them
    service.start()
    restarted = time.monotonic()

    def done() -> bool:
        return all(job_state(admin, service, j["id"])["status"] == "completed" for j in jobs)

    wait_for(done, 10, "the jobs missed while down")
    assert time.monotonic() - restarted < 10
    for job in jobs:
        (event,) = job_state(admin, service, job["id"])["events"]
        assert event["source"] == "poll"
