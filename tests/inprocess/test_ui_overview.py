"""The dashboard's overview, Submit and Sinks pages, in process, on SQLite and PostgreSQL
where the store answers."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from receiver.store import Attempt, Store
from tests.inprocess.conftest import Service, running
from tests.inprocess.test_ui import csrf_of, sign_in

LIVE = re.compile(r'<div id="overview" data-live="([^"]+)"')


def figure(page: str, name: str) -> int:
    """The number shown for `name` (data-figure) on the overview."""
    found = re.search(rf'data-figure="{re.escape(name)}">(\d+)<', page)
    assert found, f"no figure {name} on the page"
    return int(found[1])


@pytest.fixture
async def signed(tmp_path: Path, sinks_file: Path, database_url: str) -> AsyncIterator[Service]:
    """Two file sinks, no worker, signed in; the clock at the real time, since event ids
    carry the real time they were made at (the overview finds the hour's events by id)."""
    async with running(tmp_path, sinks_file=str(sinks_file), database_url=database_url) as svc:
        svc.clock.now = time.time()
        assert (await sign_in(svc.client)).status_code == 303
        yield svc


def store_of(svc: Service) -> Store:
    store: Store = svc.app.state.services.store
    return store


async def complete(svc: Service, job: dict[str, Any]) -> None:
    pred = job["prediction_id"]
    body = orjson.dumps({"id": pred, "status": "completed", "response": {"total": 1}})
    assert (await svc.callback(pred, body)).status_code == 200


async def send(svc: Service, outcomes: dict[str, tuple[str, str | None]], took: float) -> None:
    """Play the worker `took` seconds after the callback: each sink's due deliveries end as
    its (state, error)."""
    svc.clock.now += took
    now = svc.clock()
    claimed = await store_of(svc).claim(now, 100, 30)
    attempts = []
    for c in claimed:
        state, error = outcomes[c.delivery.sink]
        code = 500 if error else 200
        attempts.append(
            Attempt(c.delivery.id, 1, now, 5.0, code, error, "", state, now, c.lease_until, c.lease)
        )
    await store_of(svc).finish(attempts, now)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/ui/"),
        ("GET", "/ui/overview/live"),
        ("GET", "/ui/submit"),
        ("POST", "/ui/submit"),
        ("GET", "/ui/sinks"),
        ("POST", "/ui/sinks/erp/test"),
    ],
)
async def test_without_a_session_these_pages_show_nothing(
    tmp_path: Path, sinks_file: Path, method: str, path: str
) -> None:
    """Without signing in, the overview, Submit and Sinks pages and their actions lead to
    the sign-in form and show no data; nothing is submitted nor sent."""
    async with running(tmp_path, sinks_file=str(sinks_file)) as svc:
        await svc.submit()
        answer = await svc.client.request(
            method, path, data={"domain": "a.b", "url": "https://e.test/x"}
        )
        assert answer.status_code == 303
        assert answer.headers["location"] == "http://receiver.test/ui/signin"
        assert "job_" not in answer.text and "erp" not in answer.text
        assert list(svc.api.callback_paths) == ["pred_1"]  # only the job made above
    assert not (tmp_path / "erp.jsonl").exists()


async def test_the_store_sums_up_jobs_deliveries_and_the_last_hour(signed: Service) -> None:
    """store.overview counts jobs by status and deliveries by state per sink, finds each
    sink's oldest waiting row and last error, the overdue jobs, and the last hour's
    callbacks, deliveries, failed sends and latencies, by minute (both stores)."""
    start = signed.clock()
    first = await signed.submit()
    await signed.submit()
    await complete(signed, first)
    await send(signed, {"erp": ("dead", "HTTP 500"), "audit": ("delivered", None)}, took=0.25)
    found = await store_of(signed).overview(signed.clock())
    assert found.jobs == {"pending": 1, "completed": 1}
    assert found.deliveries == {"erp": {"dead": 1}, "audit": {"delivered": 1}}
    assert found.last_errors["erp"][0] == "HTTP 500" and "audit" not in found.last_errors
    assert found.oldest_undelivered == {}
    assert sum(m.callbacks for m in found.minutes) == 1
    assert sum(m.delivered for m in found.minutes) == 1
    assert sum(m.failed for m in found.minutes) == 1
    assert found.minutes[-1].callbacks == 1  # the current minute, the last of sixty
    assert len(found.minutes) == 60
    [(_, latency)] = found.latencies
    assert latency == pytest.approx(0.25, abs=0.01)
    # An hour and a minute later the activity has left the window; the pending job is due.
    signed.clock.now = start + 3660
    later = await store_of(signed).overview(signed.clock())
    assert sum(m.callbacks + m.delivered + m.failed for m in later.minutes) == 0
    assert later.overdue == 1 and later.next_poll_at is not None


async def test_a_waiting_delivery_shows_as_queue_and_its_age(signed: Service) -> None:
    """Deliveries not yet sent count as the sink's queue, with the oldest one's time."""
    job = await signed.submit()
    await complete(signed, job)
    found = await store_of(signed).overview(signed.clock())
    assert found.deliveries == {"erp": {"pending": 1}, "audit": {"pending": 1}}
    assert found.oldest_undelivered["erp"] == pytest.approx(signed.clock())


async def test_the_overview_page_shows_the_figures_and_follows_a_callback(
    signed: Service,
) -> None:
    """The overview shows jobs by status, the hour's figures and each sink's deliveries; its
    live part, fetched again, shows a callback that arrived meanwhile."""
    job = await signed.submit()
    page = await signed.client.get("/ui/")
    assert page.status_code == 200
    assert figure(page.text, "jobs-pending") == 1 and figure(page.text, "callbacks") == 0
    live = LIVE.search(page.text)
    assert live, page.text
    await complete(signed, job)
    await send(signed, {"erp": ("dead", "HTTP 500"), "audit": ("delivered", None)}, took=0.5)
    again = await signed.client.get(live[1])
    assert again.status_code == 200 and "<html" not in again.text  # the live part alone
    assert figure(again.text, "jobs-completed") == 1 and figure(again.text, "callbacks") == 1
    assert figure(again.text, "delivered") == 1 and figure(again.text, "failed") == 1
    assert "HTTP 500" in again.text and "500 ms" in again.text  # erp's error; the p50
    assert 'data-chart="activity"' in again.text and 'data-chart="latency"' in again.text


@pytest.mark.parametrize("worker", [False, True])
async def test_breakers_are_shown_only_by_the_process_that_runs_them(
    tmp_path: Path, sinks_file: Path, worker: bool
) -> None:
    """A web process without the dispatcher says the circuits and the reconciler's pause are
    run by another process; one that runs them shows their state."""
    async with running(tmp_path, sinks_file=str(sinks_file), worker=worker) as svc:
        await sign_in(svc.client)
        page = (await svc.client.get("/ui/")).text
        sinks = (await svc.client.get("/ui/sinks")).text
    if worker:
        assert "run by another process" not in page + sinks
        assert page.count('class="circuit c-closed"') == 2
    else:
        assert page.count("run by another process") == 3  # two circuits, the pause
        assert sinks.count("run by another process") == 2


async def test_the_reconcilers_pause_after_a_429_is_shown(tmp_path: Path) -> None:
    """In the process that reconciles, a pause after a 429 shows with its end."""
    async with running(tmp_path, worker=True) as svc:
        await sign_in(svc.client)
        before = (await svc.client.get("/ui/")).text
        assert re.search(r"Paused after a 429</td><td>\s*no</td>", before), before
        svc.app.state.reconciler.throttled_until = svc.clock() + 60
        page = (await svc.client.get("/ui/")).text
    assert '<span class="err">until <time datetime="2027-01-15T08:01:00Z">' in page


async def test_a_job_page_follows_the_job_until_it_is_settled(signed: Service) -> None:
    """A pending job's page asks to be fetched again; once completed and delivered, not."""
    job = await signed.submit()
    path = f"/ui/jobs/{job['id']}"
    assert f'id="job-live" data-live="{path}"' in (await signed.client.get(path)).text
    await complete(signed, job)
    assert 'data-live="' in (await signed.client.get(path)).text  # deliveries still waiting
    await send(signed, {"erp": ("delivered", None), "audit": ("delivered", None)}, took=0.1)
    settled = (await signed.client.get(path)).text
    assert 'id="job-live">' in settled and "data-live" not in settled


async def submit_form(
    client: httpx.AsyncClient, fields: dict[str, str], **headers: str
) -> httpx.Response:
    form = await client.get("/ui/submit")
    assert form.status_code == 200
    data = {"csrf": csrf_of(form), **fields}
    empty_file = {"file": ("", b"", "application/octet-stream")}  # what a browser sends
    return await client.post("/ui/submit", data=data, files=empty_file, headers=headers)


async def test_submitting_a_url_lands_on_the_jobs_page(signed: Service) -> None:
    """The Submit page sends a URL to VLM Run as POST /v1/jobs does and opens the job."""
    answer = await submit_form(
        signed.client, {"url": "https://e.test/a.pdf", "kind": "document", "domain": "a.b"}
    )
    assert answer.status_code == 303, answer.text
    job_path = answer.headers["location"].removeprefix("http://receiver.test")
    assert job_path.startswith("/ui/jobs/job_")
    page = await signed.client.get(job_path)
    assert "Submitted: job" in page.text and "pred_1" in page.text
    assert list(signed.api.callback_paths) == ["pred_1"]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"url": "https://e.test/a.pdf", "domain": "not a domain"}, "domain"),
        ({"domain": "document.invoice"}, "exactly one of"),
        ({"url": "ftp://e.test/a.pdf", "domain": "document.invoice"}, "url"),
        ({"url": "https://e.test/a.pdf", "domain": "a.b", "kind": "hologram"}, "kind"),
    ],
)
async def test_a_bad_submission_shows_the_form_again_with_the_reason(
    signed: Service, fields: dict[str, str], reason: str
) -> None:
    """What POST /v1/jobs refuses, the form refuses with its reason, keeping what was
    typed, and nothing is sent to VLM Run."""
    answer = await submit_form(signed.client, fields)
    assert answer.status_code == 422 and reason in answer.text
    assert 'role="alert"' in answer.text
    assert signed.api.callback_paths == {}


async def test_a_submission_without_the_token_or_from_elsewhere_is_refused(
    signed: Service,
) -> None:
    """The Submit form is refused (403) without the session's CSRF token or from another site."""
    fields = {"url": "https://e.test/a.pdf", "domain": "document.invoice"}
    no_token = await signed.client.post("/ui/submit", data=fields, files={"file": ("", b"")})
    assert no_token.status_code == 403
    elsewhere = await submit_form(signed.client, fields, origin="https://evil.test")
    assert elsewhere.status_code == 403
    plain = await signed.client.post("/ui/submit", data=fields)  # urlencoded: no token read
    assert plain.status_code == 403
    assert signed.api.callback_paths == {}


@pytest.fixture
async def with_http_sink(tmp_path: Path) -> AsyncIterator[Service]:
    """A file sink and an HTTP sink with credentials in its URL and headers, signed in."""
    sinks = tmp_path / "sinks.toml"
    sinks.write_text(
        f'[[sinks]]\nname = "archive"\nurl = "file://{tmp_path}/archive.jsonl"\n'
        '[[sinks]]\nname = "erp"\nurl = "http://ann:hunter2@127.0.0.1:1/in?token=tok-s3cret&x=1"\n'
        'secret = "whsec_c2VjcmV0LXNpZ25pbmcta2V5"\nstatuses = ["completed"]\n'
        'domains = ["document.invoice"]\nretry_schedule = [0, 30, 3600]\n'
        'headers = { Authorization = "Bearer head-s3cret" }\n'
    )
    async with running(tmp_path, sinks_file=str(sinks)) as svc:
        await sign_in(svc.client)
        yield svc


async def test_the_sinks_page_masks_credentials(with_http_sink: Service) -> None:
    """Each sink shows its URL, filters and retry schedule, with the URL's user and password,
    a webhook's path and query (where Slack, Teams or Azure put the credential), header values
    and signing secrets never shown."""
    page = (await with_http_sink.client.get("/ui/sinks")).text
    assert "http://***:***@127.0.0.1:1/***<" in page
    assert "Authorization: ***" in page and "1 secret (not shown)" in page
    assert "statuses: completed" in page and "domains: document.invoice" in page
    assert "0 s, 30 s, 1 h (3 attempts" in page
    for secret in ("ann", "hunter2", "tok-s3cret", "/in?", "head-s3cret", "c2VjcmV0"):
        assert secret not in page


async def test_a_test_event_is_sent_to_the_sink_and_its_answer_shown(
    with_http_sink: Service, tmp_path: Path
) -> None:
    """Send a test event: a sink that takes it is said to have, and has the event; one that
    cannot be reached is said to have failed, with the reason."""
    client = with_http_sink.client
    csrf = csrf_of(await client.get("/ui/sinks"))
    answer = await client.post("/ui/sinks/archive/test", data={"csrf": csrf})
    assert answer.status_code == 303
    assert answer.headers["location"].endswith("/ui/sinks#sink-archive")
    shown = (await client.get("/ui/sinks")).text
    assert re.search(r"Test event evt_test_\w+ sent to archive", shown), shown
    [line] = (tmp_path / "archive.jsonl").read_text().splitlines()
    assert orjson.loads(line)["type"] == "receiver.test"
    await client.post("/ui/sinks/erp/test", data={"csrf": csrf})
    failed = (await client.get("/ui/sinks")).text
    assert "Test event to erp failed" in failed and "hunter2" not in failed


async def test_a_test_event_needs_the_token_and_a_configured_sink(with_http_sink: Service) -> None:
    """A test event without the CSRF token is refused; to an unknown sink it is a 404."""
    client = with_http_sink.client
    assert (await client.post("/ui/sinks/archive/test", data={})).status_code == 403
    csrf = csrf_of(await client.get("/ui/sinks"))
    assert (await client.post("/ui/sinks/nope/test", data={"csrf": csrf})).status_code == 404
