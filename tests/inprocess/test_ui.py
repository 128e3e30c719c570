"""The dashboard, in process: sign-in, its cookie, CSRF refusals, and the pages and actions
over what the store holds."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from receiver.store import Attempt
from tests.inprocess.conftest import ADMIN, Service, running

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
TOKEN = ADMIN["Authorization"].removeprefix("Bearer ")


def csrf_of(page: httpx.Response) -> str:
    found = CSRF.search(page.text)
    assert found, page.text
    return found[1]


async def sign_in(client: httpx.AsyncClient, token: str = TOKEN) -> httpx.Response:
    """What a person does: open the form, type the token, press the button."""
    form = await client.get("/ui/signin")
    assert form.status_code == 200
    return await client.post("/ui/signin", data={"token": token, "csrf": csrf_of(form)})


async def post(client: httpx.AsyncClient, page: str, action: str, **fields: str) -> httpx.Response:
    """Press a button on `page`: POST its form to `action` with the page's CSRF token."""
    shown = await client.get(page)
    assert shown.status_code == 200, shown.text
    return await client.post(action, data={"csrf": csrf_of(shown), **fields})


@pytest.fixture
async def sinks_file(tmp_path: Path) -> Path:
    path = tmp_path / "sinks.toml"
    path.write_text(
        f'[[sinks]]\nname = "erp"\nurl = "file://{tmp_path}/erp.jsonl"\n'
        f'[[sinks]]\nname = "audit"\nurl = "file://{tmp_path}/audit.jsonl"\n'
    )
    return path


@pytest.fixture
async def signed(tmp_path: Path, sinks_file: Path) -> AsyncIterator[Service]:
    """The service with two file sinks, its client signed in to the dashboard."""
    async with running(tmp_path, sinks_file=str(sinks_file)) as svc:
        assert (await sign_in(svc.client)).status_code == 303
        yield svc


async def completed_job(svc: Service) -> tuple[dict[str, Any], dict[str, Any]]:
    """A submitted job whose completed callback arrived; returns it and its event."""
    job = await svc.submit()
    pred = job["prediction_id"]
    body = orjson.dumps({"id": pred, "status": "completed", "response": {"total": 42.5}})
    assert (await svc.callback(pred, body)).status_code == 200
    (event,) = await svc.events(job["id"])
    return job, event


async def send_all(svc: Service, state: str) -> None:
    """Play the worker: every due delivery ends `state` (delivered or dead)."""
    now = svc.clock()
    claimed = await svc.app.state.services.store.claim(now, 100, 30)
    attempts = [
        Attempt(
            c.delivery.id, 1, now, 1.0, 500, "HTTP 500", "no", state, now, c.lease_until, c.lease
        )
        for c in claimed
    ]
    await svc.app.state.services.store.finish(attempts, now)


async def deliveries(svc: Service, event_id: str) -> dict[str, str]:
    r = await svc.client.get(f"/v1/deliveries?event_id={event_id}", headers=ADMIN)
    return {d["sink"]: d["state"] for d in r.json()["items"]}


async def test_root_leads_to_the_dashboard(service: Service) -> None:
    """Opening the service's address leads to the dashboard."""
    answer = await service.client.get("/")
    assert answer.status_code == 303 and answer.headers["location"] == "http://receiver.test/ui/"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/ui/"),
        ("GET", "/ui/jobs/job_x"),
        ("GET", "/ui/deliveries"),
        ("GET", "/ui/events/evt_x"),
        ("POST", "/ui/deliveries/1/retry"),
        ("POST", "/ui/events/evt_x/replay"),
    ],
)
async def test_without_a_session_only_the_sign_in_form_shows(
    service: Service, method: str, path: str
) -> None:
    """Without signing in, every dashboard page sends you to the sign-in form, showing no data."""
    await service.submit()
    answer = await service.client.request(method, path)
    assert answer.status_code == 303
    assert answer.headers["location"] == "http://receiver.test/ui/signin"
    assert "job_" not in answer.text


async def test_the_right_token_signs_in_and_shows_the_jobs(service: Service) -> None:
    """Signing in with the admin token opens the dashboard, whose jobs page lists the job."""
    job = await service.submit()
    answer = await sign_in(service.client)
    assert answer.status_code == 303 and answer.headers["location"] == "http://receiver.test/ui/"
    jobs = await service.client.get("/ui/jobs")
    assert jobs.status_code == 200 and job["id"] in jobs.text


async def test_a_wrong_token_is_refused(service: Service) -> None:
    """A wrong token shows the form again with an error, and no page opens."""
    answer = await sign_in(service.client, "not-the-token")
    assert answer.status_code == 401 and "not the admin token" in answer.text
    assert (await service.client.get("/ui/")).status_code == 303


async def test_without_an_admin_token_nobody_signs_in(tmp_path: Path) -> None:
    """With no admin token configured, the form says to set one and never signs anyone in."""
    async with running(tmp_path, admin_token=None) as svc:
        answer = await sign_in(svc.client, "")
        assert answer.status_code == 403 and "RECEIVER_ADMIN_TOKEN" in answer.text
        assert (await svc.client.get("/ui/")).status_code == 303


def cookie_header(answer: httpx.Response) -> str:
    (header,) = [v for k, v in answer.headers.multi_items() if k == "set-cookie"]
    return header.lower()


async def test_the_session_cookie_is_locked_down(service: Service) -> None:
    """The session cookie is HttpOnly, SameSite=Strict, limited to /ui and to 12 hours, and
    (over plain HTTP) not Secure, so a laptop's http://127.0.0.1 still works."""
    header = cookie_header(await sign_in(service.client))
    assert header.startswith("receiver_ui=")
    for flag in ("httponly", "samesite=strict", "path=/ui;", "max-age=43200"):
        assert flag in header, header
    assert "secure" not in header


async def test_over_https_the_cookie_is_secure(service: Service) -> None:
    """Over HTTPS the session cookie is marked Secure (never sent in clear)."""
    transport = httpx.ASGITransport(app=service.app)
    async with httpx.AsyncClient(transport=transport, base_url="https://receiver.test") as client:
        header = cookie_header(await sign_in(client))
    assert "secure" in header and "httponly" in header


async def test_a_session_ends_twelve_hours_after_sign_in(service: Service) -> None:
    """Twelve hours after signing in, the dashboard asks to sign in again."""
    await sign_in(service.client)
    service.clock.now += 12 * 3600 - 1
    assert (await service.client.get("/ui/")).status_code == 200
    service.clock.now += 2
    assert (await service.client.get("/ui/")).status_code == 303


async def test_a_post_without_the_csrf_token_is_refused(signed: Service) -> None:
    """A form posted without the page's CSRF token (or with another) is refused with 403."""
    for fields in ({}, {"csrf": "forged"}):
        answer = await signed.client.post("/ui/signout", data=fields)
        assert answer.status_code == 403 and "CSRF" in answer.text
    assert (await signed.client.get("/ui/")).status_code == 200  # still signed in


async def test_a_post_from_another_origin_is_refused(signed: Service) -> None:
    """A form posted from another site is refused with 403, even carrying a valid token."""
    csrf = csrf_of(await signed.client.get("/ui/"))
    for headers in (
        {"Origin": "https://evil.test"},
        {"Origin": "https://receiver.test"},  # another scheme is another origin
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        answer = await signed.client.post("/ui/signout", data={"csrf": csrf}, headers=headers)
        assert answer.status_code == 403 and "another site" in answer.text
    same = {"Origin": "http://receiver.test", "Sec-Fetch-Site": "same-origin"}
    answer = await signed.client.post("/ui/signout", data={"csrf": csrf}, headers=same)
    assert answer.status_code == 303


async def test_behind_a_proxy_that_drops_the_port_forms_still_work(service: Service) -> None:
    """Behind a proxy that passes Host without the port, the dashboard's own forms still
    work, and another host is still refused."""
    await sign_in(service.client)
    csrf = csrf_of(await service.client.get("/ui/"))
    evil = {"Origin": "http://evil.test:8443"}
    answer = await service.client.post("/ui/signout", data={"csrf": csrf}, headers=evil)
    assert answer.status_code == 403
    mine = {"Origin": "http://receiver.test:8443"}
    answer = await service.client.post("/ui/signout", data={"csrf": csrf}, headers=mine)
    assert answer.status_code == 303


async def test_signing_in_needs_the_forms_token_too(service: Service) -> None:
    """The sign-in form itself is refused (403) without its CSRF token."""
    answer = await service.client.post("/ui/signin", data={"token": "inprocess-admin"})
    assert answer.status_code == 403
    assert (await service.client.get("/ui/")).status_code == 303


async def test_sign_out_ends_the_session(signed: Service) -> None:
    """After signing out, the dashboard asks to sign in again."""
    answer = await post(signed.client, "/ui/", "/ui/signout")
    assert answer.status_code == 303 and answer.headers["location"].endswith("/ui/signin")
    assert (await signed.client.get("/ui/")).status_code == 303


async def test_pages_forbid_framing_and_outside_scripts(signed: Service) -> None:
    """Every dashboard page forbids framing and scripts from elsewhere, and is not cached."""
    answer = await signed.client.get("/ui/")
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["cache-control"] == "no-store"
    assert "<script src=" in answer.text and "<script>" not in answer.text


async def test_the_jobs_page_lists_newest_first_filters_and_pages(signed: Service) -> None:
    """The jobs page lists jobs newest first with whole ids and UTC times, filters by
    status, and pages with an "older" link."""
    first = await signed.submit()
    signed.clock.now += 1
    second, _ = await completed_job(signed)
    page = (await signed.client.get("/ui/jobs")).text
    assert page.index(second["id"]) < page.index(first["id"])
    assert '<time datetime="2027-01-15T08:00:01Z">' in page
    done = (await signed.client.get("/ui/jobs?status=completed")).text
    assert second["id"] in done and first["id"] not in done
    assert first["id"] not in (await signed.client.get("/ui/jobs?domain=document.resume")).text
    one = await signed.client.get("/ui/jobs?limit=1")
    assert second["id"] in one.text and first["id"] not in one.text
    older = re.search(r'href="([^"]+)">Older jobs', one.text)
    assert older, one.text
    rest = await signed.client.get(older[1].replace("&amp;", "&"))
    assert first["id"] in rest.text and second["id"] not in rest.text


async def test_a_job_is_found_by_its_id_or_an_events(signed: Service) -> None:
    """Pasting a job's id, or one of its events' ids, opens the job's page."""
    job, event = await completed_job(signed)
    by_job = await signed.client.get("/ui/find", params={"id": f" {job['id']} "})
    assert by_job.headers["location"] == f"http://receiver.test/ui/jobs/{job['id']}"
    by_event = await signed.client.get("/ui/find", params={"id": event["id"]})
    assert by_event.headers["location"].endswith(f"/ui/jobs/{job['id']}#{event['id']}")
    missing = await signed.client.get("/ui/find", params={"id": "job_nope"})
    assert missing.status_code == 404 and "job_nope" in missing.text


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/ui/jobs?limit=0", 400),
        ("/ui/jobs?limit=abc", 400),
        ("/ui/deliveries?state=bogus", 400),
        ("/ui/jobs/job_nope", 404),
        ("/ui/events/evt_nope", 404),
        ("/ui/find", 404),
    ],
)
async def test_bad_input_is_a_readable_4xx_page(signed: Service, path: str, status: int) -> None:
    """A bad filter or unknown id shows an error page with a 4xx, not a crash."""
    answer = await signed.client.get(path)
    assert answer.status_code == status and "text/html" in answer.headers["content-type"]
    assert "Back to the jobs" in answer.text


async def test_a_jobs_page_shows_its_timeline_prediction_and_deliveries(signed: Service) -> None:
    """A job's page shows its events (status, source, verification), the prediction as
    formatted JSON, and each sink's delivery."""
    job, event = await completed_job(signed)
    page = await signed.client.get(f"/ui/jobs/{job['id']}")
    assert page.status_code == 200
    text = page.text
    assert job["id"] in text and job["prediction_id"] in text and event["id"] in text
    assert "by callback" in text and "verified: hmac-sha256" in text
    assert "&#34;total&#34;: 42.5" in text or "&quot;total&quot;: 42.5" in text
    assert text.count("<details") == 1 and text.count("s-pending") == 2  # erp and audit


async def test_a_jobs_page_shows_every_attempt_of_each_delivery(signed: Service) -> None:
    """Each delivery on a job's page lists its attempts: when, how long, the status code, the
    error and the first bytes of the sink's answer; the API's job shows the same."""
    job, _ = await completed_job(signed)
    await send_all(signed, "dead")
    page = (await signed.client.get(f"/ui/jobs/{job['id']}")).text
    assert page.count("1 attempt</summary>") == 2  # erp and audit
    assert "<td>500</td>" in page and "HTTP 500" in page and "<code>no</code>" in page
    api = (await signed.client.get(f"/v1/jobs/{job['id']}", headers=ADMIN)).json()
    sends = [d["sends"] for d in api["events"][0]["deliveries"]]
    assert [[(a["attempt"], a["status_code"], a["snippet"]) for a in s] for s in sends] == [
        [(1, 500, "no")],
        [(1, 500, "no")],
    ]


async def test_replay_from_a_jobs_page_requeues_the_event(signed: Service) -> None:
    """Pressing replay on a job's page sends the event again to every sink, or to the one
    chosen, and says how many deliveries were requeued."""
    job, event = await completed_job(signed)
    await send_all(signed, "delivered")
    assert await deliveries(signed, event["id"]) == {"erp": "delivered", "audit": "delivered"}
    page = f"/ui/jobs/{job['id']}"
    action = f"/ui/events/{event['id']}/replay"
    answer = await post(signed.client, page, action, sink="erp", back=page)
    assert answer.status_code == 303 and answer.headers["location"] == page
    assert await deliveries(signed, event["id"]) == {"erp": "pending", "audit": "delivered"}
    assert "Requeued 1 delivery" in (await signed.client.get(page)).text
    await post(signed.client, page, action, sink="", back=page)
    assert await deliveries(signed, event["id"]) == {"erp": "pending", "audit": "pending"}
    assert "Requeued 2 deliveries" in (await signed.client.get(page)).text


async def test_replay_to_an_unknown_sink_is_422(signed: Service) -> None:
    """Replaying to a sink that is not configured is refused, naming it."""
    job, event = await completed_job(signed)
    page = f"/ui/jobs/{job['id']}"
    answer = await post(signed.client, page, f"/ui/events/{event['id']}/replay", sink="nope")
    assert answer.status_code == 422 and "nope" in answer.text


async def test_a_dead_delivery_is_retried_from_the_deliveries_page(signed: Service) -> None:
    """The deliveries page lists dead deliveries by sink, and Retry puts one back in the queue."""
    job, event = await completed_job(signed)
    await send_all(signed, "dead")
    dead = await signed.client.get("/ui/deliveries?state=dead&sink=erp")
    assert dead.status_code == 200
    assert dead.text.count("s-dead") == 1 and "HTTP 500" in dead.text
    (delivery_id,) = re.findall(r"/ui/deliveries/(\d+)/retry", dead.text)
    back = "/ui/deliveries?state=dead&sink=erp"
    answer = await post(signed.client, back, f"/ui/deliveries/{delivery_id}/retry", back=back)
    assert answer.status_code == 303 and answer.headers["location"] == back
    assert await deliveries(signed, event["id"]) == {"erp": "pending", "audit": "dead"}
    after = await signed.client.get(back)
    assert "Requeued 1 delivery" in after.text and "s-dead" not in after.text
    # The event's link leads to its job's page.
    link = await signed.client.get(f"/ui/events/{event['id']}")
    assert (
        link.status_code == 303
        and f"/ui/jobs/{job['id']}#{event['id']}" in link.headers["location"]
    )


async def test_a_dead_delivery_is_retried_from_its_jobs_page(signed: Service) -> None:
    """A job's page offers Retry on a dead delivery, and pressing it requeues it."""
    job, event = await completed_job(signed)
    await send_all(signed, "dead")
    page = f"/ui/jobs/{job['id']}"
    ids = re.findall(r"/ui/deliveries/(\d+)/retry", (await signed.client.get(page)).text)
    assert len(ids) == 2
    await post(signed.client, page, f"/ui/deliveries/{ids[0]}/retry", back=page)
    assert sorted((await deliveries(signed, event["id"])).values()) == ["dead", "pending"]


@pytest.mark.parametrize("back", ["https://evil.test/", "//evil.test/ui/", "/ui/../v1/jobs"])
async def test_an_action_never_returns_to_another_site(signed: Service, back: str) -> None:
    """After an action the browser returns to a dashboard page, whatever the form said."""
    answer = await post(signed.client, "/ui/", "/ui/deliveries/999/retry", back=back)
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/"


async def test_a_retry_of_a_bad_id_is_404(signed: Service) -> None:
    """Retrying a delivery id that cannot exist is a 404 page."""
    answer = await post(signed.client, "/ui/", "/ui/deliveries/%C2%B2/retry")
    assert answer.status_code == 404


async def test_the_dashboard_works_under_a_path_prefix(tmp_path: Path) -> None:
    """Under RECEIVER_ROOT_PATH every link, redirect and the cookie carry the prefix."""
    async with running(tmp_path, root_path="/receiver") as svc:
        root = await svc.client.get("/receiver/")
        assert root.headers["location"] == "http://receiver.test/receiver/ui/"
        away = await svc.client.get("/receiver/ui/")
        assert away.headers["location"] == "http://receiver.test/receiver/ui/signin"
        form = await svc.client.get("/receiver/ui/signin")
        assert 'href="http://receiver.test/receiver/ui/static/dashboard.css"' in form.text
        answer = await svc.client.post(
            "/receiver/ui/signin", data={"token": "inprocess-admin", "csrf": csrf_of(form)}
        )
        assert answer.status_code == 303 and "path=/receiver/ui;" in cookie_header(answer)
        assert (await svc.client.get("/receiver/ui/")).status_code == 200
        css = await svc.client.get("/receiver/ui/static/dashboard.css")
        assert css.status_code == 200 and "text/css" in css.headers["content-type"]
