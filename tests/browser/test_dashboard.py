"""The dashboard in a real browser: sign in, find a job, read its prediction, replay it,
sign out."""

from __future__ import annotations

from typing import Any

import httpx
from playwright.sync_api import Browser, ConsoleMessage, expect

from tests.acceptance.conftest import Process, wait_for
from tests.browser.conftest import ADMIN_TOKEN

SCREENSHOT = "/tmp/receiver-dashboard-job.png"


def completed_job(service: Process) -> dict[str, Any]:
    """A job submitted through the API, once the simulator's callback has completed it."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=service.url, headers=admin, timeout=30) as client:
        made = client.post(
            "/v1/jobs", json={"url": "https://e.test/invoice.pdf", "domain": "document.invoice"}
        )
        assert made.status_code == 201, made.text
        job_id = made.json()["id"]

        def done() -> dict[str, Any] | None:
            job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
            delivered = [
                d for e in job["events"] for d in e["deliveries"] if d["state"] == "delivered"
            ]
            return job if job["status"] == "completed" and delivered else None

        found: dict[str, Any] = wait_for(done, 20, "the job to complete and be delivered")
        return found


def test_sign_in_open_a_job_replay_it_and_sign_out(browser: Browser, served: Process) -> None:
    """An operator signs in with the admin token, sees the job, opens it, reads its
    prediction, replays it to the sinks, and signs out; no page logs a console error."""
    job = completed_job(served)
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(f"{message.location.get('url')}: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(str(exc)))

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
    prediction = page.locator("details pre").last
    expect(prediction).to_be_visible()
    expect(prediction).to_contain_text(f'"id": "{job["prediction_id"]}"')
    expect(page.locator(".status.s-delivered")).to_have_count(1)
    page.screenshot(path=SCREENSHOT, full_page=True)

    page.get_by_role("button", name="Replay").click()
    expect(page.get_by_role("status")).to_contain_text("Requeued 1 delivery")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.goto(served.url + f"/ui/jobs/{job['id']}")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    context.close()
    assert errors == []
