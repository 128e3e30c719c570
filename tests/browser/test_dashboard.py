"""The dashboard in a real browser: sign in, find a job, read its prediction, replay it,
sign out; no data without a session; forged posts refused; filters; a bulk retry of the dead
deliveries of a sink that was down.

With RECEIVER_SCREENSHOTS=<directory> set (e.g. docs/screenshots), the tests save what they
show there (job.png, deliveries.png); otherwise under /tmp, so a plain run leaves the tree
as it was.
"""

from __future__ import annotations

import http.server
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

from tests.acceptance.conftest import Process, free_port, wait_for
from tests.browser.conftest import ADMIN_TOKEN, start_serve

SCREENSHOT = "/tmp/receiver-dashboard-job.png"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
VIEWPORT = {"width": 1280, "height": 800}


def screenshot(page: Page, name: str, full_page: bool = False) -> None:
    """Save what the page shows, where RECEIVER_SCREENSHOTS says (else /tmp)."""
    directory = Path(os.environ.get("RECEIVER_SCREENSHOTS") or "/tmp/receiver-screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(directory / name), full_page=full_page)


def submit(service: Process, **metadata: str) -> str:
    with httpx.Client(base_url=service.url, headers=ADMIN, timeout=30) as client:
        made = client.post(
            "/v1/jobs",
            json={
                "url": "https://e.test/invoice.pdf",
                "domain": "document.invoice",
                "metadata": metadata,
            },
        )
        assert made.status_code == 201, made.text
        job_id: str = made.json()["id"]
        return job_id


def job_of(service: Process, job_id: str) -> dict[str, Any]:
    with httpx.Client(base_url=service.url, headers=ADMIN, timeout=30) as client:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return job


def states(job: dict[str, Any]) -> dict[str, str]:
    return {d["sink"]: d["state"] for e in job["events"] for d in e["deliveries"]}


def completed_job(service: Process) -> dict[str, Any]:
    """A job submitted through the API, once the simulator's callback has completed it."""
    job_id = submit(service)

    def done() -> dict[str, Any] | None:
        job = job_of(service, job_id)
        delivered = "delivered" in states(job).values()
        return job if job["status"] == "completed" and delivered else None

    found: dict[str, Any] = wait_for(done, 20, "the job to complete and be delivered")
    return found


class Watched:
    """A browser page whose console errors and uncaught exceptions are collected."""

    def __init__(self, browser: Browser, timezone: str | None = None) -> None:
        self.context = browser.new_context(viewport=VIEWPORT, timezone_id=timezone)  # type: ignore[arg-type]
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"{message.location.get('url')}: {message.text}")

    def sign_in(self, url: str) -> None:
        self.page.goto(url + "/ui/signin")
        self.page.get_by_label("Admin token").fill(ADMIN_TOKEN)
        self.page.get_by_role("button", name="Sign in").click()
        expect(self.page.get_by_role("heading", name="Jobs")).to_be_visible()


def test_sign_in_open_a_job_replay_it_and_sign_out(browser: Browser, served: Process) -> None:
    """An operator signs in with the admin token, sees the job, opens it, reads its
    prediction, replays it to the sinks, and signs out; no page logs a console error."""
    job = completed_job(served)
    watched = Watched(browser)
    page, errors = watched.page, watched.errors

    page.goto(served.url + "/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("Admin token").fill("wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not the admin token")
    # The refusal is a 401, which Chromium reports on the console: that one is expected.
    assert len(errors) == 1 and "/ui/signin" in errors[0] and "401" in errors[0], errors
    errors.clear()
    page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()  # the landing page
    page.get_by_role("navigation").get_by_role("link", name="Jobs").click()

    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    link = page.get_by_role("link", name=job["id"])
    expect(link).to_be_visible()
    # Times are shown in the viewer's zone, with the UTC time on hover.
    assert page.locator("time").first.get_attribute("title") == job["created_at"]

    link.click()
    expect(page.get_by_role("heading", name=f"Job {job['id']}")).to_be_visible()
    # The prediction as a tree: its keys, and the id VLM Run gave it.
    tree = page.locator(".json-tree").last
    expect(tree).to_be_visible()
    expect(tree).to_contain_text(f'"id": "{job["prediction_id"]}"')
    expect(page.locator(".status.s-delivered")).to_have_count(1)
    page.screenshot(path=SCREENSHOT, full_page=True)

    page.get_by_role("button", name="Replay").click()
    expect(page.get_by_role("status")).to_contain_text("Requeued 1 delivery")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.goto(served.url + f"/ui/jobs/{job['id']}")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    watched.context.close()
    assert errors == []


def test_without_a_session_no_page_shows_data(browser: Browser, served: Process) -> None:
    """A browser that has not signed in is sent to the sign-in form from every data page,
    and no job id appears on what it sees."""
    job = completed_job(served)
    watched = Watched(browser)
    page = watched.page
    for path in ("/ui/", f"/ui/jobs/{job['id']}", "/ui/deliveries", "/ui/deliveries/retry"):
        page.goto(served.url + path)
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        assert page.url.endswith("/ui/signin")
        assert job["id"] not in page.content() and job["prediction_id"] not in page.content()
    watched.context.close()
    assert watched.errors == []


def test_forged_posts_are_refused(browser: Browser, served: Process) -> None:
    """With a live session, a POST from another origin, or one without the page's CSRF
    token, is refused with 403 and changes nothing."""
    job = completed_job(served)
    watched = Watched(browser)
    watched.sign_in(served.url)
    page = watched.page
    page.goto(served.url + f"/ui/jobs/{job['id']}")
    csrf = page.locator('input[name="csrf"]').first.get_attribute("value")
    assert csrf
    event_id = job["events"][0]["id"]
    replay = f"{served.url}/ui/events/{event_id}/replay"
    # The session cookie goes along (page.request shares the browser's cookies).
    other_site = page.request.post(
        replay, form={"csrf": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert other_site.status == 403 and "another site" in other_site.text()
    no_token = page.request.post(replay, form={"sink": ""})
    assert no_token.status == 403 and "CSRF" in no_token.text()
    assert states(job_of(served, job["id"])) == {"archive": "delivered"}
    # The same form, from the page itself, works: the refusals were about origin and token.
    page.get_by_role("button", name="Replay").click()
    expect(page.get_by_role("status")).to_contain_text("Requeued 1 delivery")
    watched.context.close()
    assert watched.errors == []


def test_filters_narrow_the_jobs(browser: Browser, served: Process) -> None:
    """The jobs page narrows by a metadata value typed in the find box, and by a time range
    typed in the viewer's zone (sent as UTC)."""
    mine = submit(served, session_id="sess-browser-1")
    other = submit(served, session_id="sess-browser-2")
    watched = Watched(browser, timezone="Asia/Tokyo")  # UTC+9 all year
    watched.sign_in(served.url)
    page = watched.page
    page.get_by_role("link", name="Jobs", exact=True).click()
    expect(page.get_by_role("link", name=mine)).to_be_visible()
    expect(page.get_by_role("link", name=other)).to_be_visible()
    page.get_by_label("Find").fill("sess-browser-1")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_role("link", name=mine)).to_be_visible()
    expect(page.get_by_role("link", name=other)).to_have_count(0)
    page.get_by_role("link", name="Clear").click()
    page.get_by_label("From").fill("2099-01-01T00:00")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_text("No jobs match these filters")).to_be_visible()
    # Typed in Tokyo, sent as UTC, shown back as typed.
    assert "since=2098-12-31T15%3A00%3A00.000Z" in page.url, page.url
    expect(page.get_by_label("From")).to_have_value(re.compile(r"^2099-01-01T00:00(:00)?$"))
    watched.context.close()
    assert watched.errors == []


class Sink:
    """An HTTP sink that is down until `start()`, then answers 204 to everything."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        class Answer(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Answer)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def flaky(tmp_path: Path) -> Iterator[tuple[Process, Sink]]:
    """`receiver serve` with a file sink and an HTTP sink (`erp`) that is down: two attempts
    a delivery, then dead."""
    sink = Sink()
    proc = start_serve(
        tmp_path,
        f'[[sinks]]\nname = "archive"\nurl = "file://{tmp_path}/archive.jsonl"\n'
        f'[[sinks]]\nname = "erp"\nurl = "http://127.0.0.1:{sink.port}/hooks"\n'
        'secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"\nretry_schedule = [0, 0.2]\n',
    )
    yield proc, sink
    proc.stop()
    sink.stop()


def test_dead_deliveries_are_retried_in_bulk_after_a_confirm(
    browser: Browser, flaky: tuple[Process, Sink]
) -> None:
    """The erp sink is down: its deliveries die, and the job's page shows each attempt. Once
    it is back, one is retried from its job's page, which follows it to delivered by itself;
    the deliveries page filtered to the other dead erp deliveries offers to retry them all,
    says how many, asks to confirm, and they are delivered."""
    served, sink = flaky
    jobs = [submit(served, session_id=f"sess-{i}") for i in range(3)]
    for job_id in jobs:
        wait_for(
            lambda j=job_id: states(job_of(served, j)) == {"archive": "delivered", "erp": "dead"},
            30,
            "erp's deliveries to die",
        )
    watched = Watched(browser)
    watched.sign_in(served.url)
    page = watched.page
    page.goto(served.url + f"/ui/jobs/{jobs[0]}")
    expect(page.locator(".status.s-dead")).to_have_count(1)
    attempts = page.get_by_text("2 attempts")
    attempts.click()  # open the attempts of the dead delivery
    expect(page.locator("tr.sends td.err").first).to_be_visible()
    screenshot(page, "job.png", full_page=True)

    sink.start()
    # One dead delivery retried from its job's page: the page follows it to delivered by
    # itself (no reload).
    page.get_by_role("button", name="Retry", exact=True).click()
    expect(page.get_by_role("status")).to_contain_text("Requeued 1 delivery")
    expect(page.locator(".status.s-delivered")).to_have_count(2, timeout=20_000)
    expect(page.locator(".status.s-dead")).to_have_count(0)
    wait_for(
        lambda: states(job_of(served, jobs[0])) == {"archive": "delivered", "erp": "delivered"},
        30,
        "the delivery retried from the job's page to arrive",
    )

    # The other two in bulk, from the deliveries page.
    page.goto(served.url + "/ui/deliveries")
    page.get_by_label("State").select_option("dead")
    page.get_by_label("Sink").select_option("erp")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator(".status.s-dead")).to_have_count(2)
    screenshot(page, "deliveries.png")
    page.get_by_role("link", name="Retry every dead delivery").click()
    expect(page.get_by_role("status")).to_contain_text("2 deliveries match these filters")
    page.get_by_role("button", name="Retry 2 deliveries").click()
    expect(page.get_by_role("status")).to_contain_text("Requeued 2 deliveries")
    for job_id in jobs:
        wait_for(
            lambda j=job_id: (
                states(job_of(served, j)) == {"archive": "delivered", "erp": "delivered"}
            ),
            30,
            "the retried deliveries to arrive",
        )
    page.reload()
    expect(page.get_by_text("No deliveries match these filters")).to_be_visible()
    watched.context.close()
    assert watched.errors == []
