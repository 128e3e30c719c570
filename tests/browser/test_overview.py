"""The overview, Submit and Sinks pages in a real browser: a job submitted from the page
completes on its page without a reload, the overview follows callbacks by itself, and a
failing sink shows its attempts and its last error.

With RECEIVER_SCREENSHOTS=<dir> set, the overview is saved as <dir>/overview.png (1280x800,
a laptop's screen): what docs/screenshots/overview.png is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

from tests.acceptance.conftest import API_KEY, Process, base_env, free_port
from tests.browser.conftest import ADMIN_TOKEN, WEBHOOK_SECRET, start_serve

LAPTOP = {"width": 1280, "height": 800}
LIVE_WAIT = 15_000  # ms: a few of the pages' polling rounds (2 s on a job, 5 s on the overview)


@pytest.fixture
def slow_simulator(tmp_path: Path) -> Iterator[Process]:
    """VLM Run's stand-in, taking 1.5 s from pending to running and again to completed: long
    enough to see a job pending on its page first."""
    port = free_port()
    args = ["simulate", "--port", str(port), "--api-key", API_KEY]
    args += ["--webhook-secret", WEBHOOK_SECRET, "--delay", "1.5"]
    proc = Process(args, base_env(), tmp_path / "simulator.log", port)
    proc.start("/v1/health")
    yield proc
    proc.stop()


@pytest.fixture
def service(tmp_path: Path, slow_simulator: Process) -> Iterator[Process]:
    """`receiver serve` with its worker, a file sink that works and an HTTP sink nobody
    listens at (three quick attempts, then dead)."""
    proc = start_serve(
        tmp_path,
        f'[[sinks]]\nname = "archive"\nurl = "file://{tmp_path}/archive.jsonl"\n'
        f'[[sinks]]\nname = "crm"\nurl = "http://127.0.0.1:{free_port()}/hooks"\n'
        'secret = "whsec_c2VjcmV0LXNpZ25pbmcta2V5"\nretry_schedule = [0, 0.5, 0.5]\n',
        RECEIVER_VLMRUN_API_KEY=API_KEY,
        RECEIVER_VLMRUN_BASE_URL=f"{slow_simulator.url}/v1",
    )
    yield proc
    proc.stop()


def signed_in(browser: Browser, service: Process, errors: list[str]) -> Page:
    """A laptop-sized page, signed in, on the overview; console errors go to `errors`."""
    page = browser.new_context(viewport=LAPTOP).new_page()

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(f"{message.location.get('url')}: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(service.url + "/")
    page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    return page


def submit_by_api(service: Process, count: int, domain: str = "document.invoice") -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=service.url, headers=admin, timeout=30) as client:
        for i in range(count):
            body = {"url": f"https://e.test/{i}.pdf", "domain": domain}
            made = client.post("/v1/jobs", json=body)
            assert made.status_code == 201, made.text


def mark(page: Page) -> None:
    """Leave a mark in the page's window: a reload would wipe it."""
    page.evaluate("window.receiverMark = 'not reloaded'")


def still_marked(page: Page) -> bool:
    return bool(page.evaluate("window.receiverMark === 'not reloaded'"))


def test_a_job_submitted_on_the_page_completes_there_without_a_reload(
    browser: Browser, service: Process
) -> None:
    """Submit a URL on the Submit page: the job's page opens pending and turns completed by
    itself; the sink nobody listens at shows its failed attempts there, and its last error on
    the Sinks page; no page logs a console error."""
    errors: list[str] = []
    page = signed_in(browser, service, errors)
    page.get_by_role("navigation").get_by_role("link", name="Submit").click()
    expect(page.get_by_role("heading", name="Submit a job")).to_be_visible()
    page.get_by_label("or URL").fill("https://e.test/invoice.pdf")
    page.get_by_label("Domain").fill("document.invoice")
    page.get_by_role("button", name="Submit").click()

    expect(page.get_by_role("heading", name=re.compile(r"^Job job_"))).to_be_visible()
    status = page.locator("dl.facts .status").first
    expect(status).to_have_text("pending")
    mark(page)
    expect(status).to_have_text("completed", timeout=LIVE_WAIT)
    crm = page.locator("tr", has=page.get_by_role("cell", name="crm", exact=True))
    expect(crm.locator(".status")).to_have_text("dead", timeout=LIVE_WAIT)
    expect(page.get_by_text("3 attempts")).to_be_visible()
    archive = page.locator("tr", has=page.get_by_role("cell", name="archive", exact=True))
    expect(archive.locator(".status")).to_have_text("delivered")
    assert still_marked(page)
    page.get_by_text("3 attempts").click()  # the attempts of the failing sink, opened
    expect(page.locator("tr.sends td.err").first).to_contain_text("Cannot connect")

    page.get_by_role("navigation").get_by_role("link", name="Sinks").click()
    section = page.locator("#sink-crm")
    expect(section.locator("[data-last-error]")).to_contain_text("Cannot connect")
    expect(section.locator(".circuit")).to_have_text("closed")
    section.get_by_role("button", name="Send a test event").click()
    expect(page.locator("#sink-crm").get_by_role("status")).to_contain_text("failed")
    page.locator("#sink-archive").get_by_role("button", name="Send a test event").click()
    expect(page.locator("#sink-archive").get_by_role("status")).to_contain_text("sent to archive")

    # A file, uploaded to VLM Run first, as POST /v1/jobs does with a multipart body.
    page.get_by_role("navigation").get_by_role("link", name="Submit").click()
    page.get_by_label("File").set_input_files(
        {"name": "receipt.pdf", "mimeType": "application/pdf", "buffer": b"%PDF-1.4 receipt"}
    )
    page.get_by_label("Domain").fill("document.receipt")
    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_role("heading", name=re.compile(r"^Job job_"))).to_be_visible()
    expect(page.locator("dl.facts")).to_contain_text("receipt.pdf")
    page.context.close()
    assert errors == []


def test_the_overview_follows_callbacks_by_itself(browser: Browser, service: Process) -> None:
    """With the overview open, jobs completing elsewhere show up in its figures without a
    reload; it shows each sink's deliveries and the failing one's last error."""
    errors: list[str] = []
    page = signed_in(browser, service, errors)
    callbacks = page.locator('[data-figure="callbacks"]')
    expect(callbacks).to_have_text("0")
    mark(page)
    submit_by_api(service, 5)
    submit_by_api(service, 2, domain="document.receipt")
    expect(callbacks).to_have_text("7", timeout=LIVE_WAIT * 2)  # one callback a job
    expect(page.locator('[data-figure="jobs-completed"]')).to_have_text("7")
    crm = page.locator('tr[data-sink="crm"]')
    expect(crm.locator("td.err")).to_contain_text("Cannot connect", timeout=LIVE_WAIT)
    expect(page.locator('[data-chart="activity"] canvas')).to_have_count(1)
    expect(page.locator('[data-chart="latency"] canvas')).to_have_count(1)
    assert still_marked(page)
    shots = os.environ.get("RECEIVER_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(shots) / "overview.png"))
    page.context.close()
    assert errors == []
