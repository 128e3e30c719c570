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
    assert '<span class="j-k">&#34;total&#34;</span>: <span class="j-num">42.5</span>' in text
    assert "&#34;total&#34;: 42.5" in text  # and as indented text
    assert text.count("s-pending") == 2  # erp and audit


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


# -- the prediction as a tree -------------------------------------------------------------------


async def job_with_prediction(svc: Service, response: Any) -> str:
    """The page of a job completed with `response` (JSON, or its text) as its prediction's
    result."""
    job = await svc.submit()
    pred = job["prediction_id"]
    result = response.encode() if isinstance(response, str) else orjson.dumps(response)
    body = b'{"id": "%s", "status": "completed", "response": %s}' % (pred.encode(), result)
    assert (await svc.callback(pred, body)).status_code == 200
    page = await svc.client.get(f"/ui/jobs/{job['id']}")
    assert page.status_code == 200
    return page.text


async def test_a_many_page_prediction_opens_on_its_outline(signed: Service) -> None:
    """A result of 1,000 pages shows as a tree whose page list is closed, in runs of 100 pages
    each one click away; the top of the prediction is open."""
    pages = [{"page": i, "text": f"page {i} text"} for i in range(1000)]
    text = await job_with_prediction(signed, {"pages": pages, "total": 3})
    assert "<details open><summary>{…} 2 keys</summary>" in text  # the response, open
    assert "<details><summary>[…] 1000 items</summary>" in text  # the pages, closed
    runs = re.findall(r"<summary>items (\d+) to (\d+)</summary>", text)
    assert runs[0] == ("0", "99") and runs[-1] == ("900", "999") and len(runs) == 10
    assert '<span class="j-str">&#34;page 999 text&#34;</span>' in text


async def test_a_deeply_nested_prediction_still_shows(signed: Service) -> None:
    """A prediction nested 600 levels deep (more than Python's recursion allows) is shown."""
    deep = '{"next": ' * 600 + '"bottom"' + "}" * 600  # orjson would not write it
    text = await job_with_prediction(signed, deep)
    assert '<span class="j-str">&#34;bottom&#34;</span>' in text


async def test_prediction_text_is_escaped_in_the_tree(signed: Service) -> None:
    """Keys and values that look like HTML are shown as text, never run."""
    text = await job_with_prediction(signed, {"<b>k</b>": "<script>alert(1)</script>"})
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;b&gt;k&lt;/b&gt;" in text


# -- jobs filters -------------------------------------------------------------------------------


async def submit_with(svc: Service, **metadata: Any) -> dict[str, Any]:
    r = await svc.client.post(
        "/v1/jobs",
        json={"url": "https://e.test/a.pdf", "domain": "document.invoice", "metadata": metadata},
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    job: dict[str, Any] = r.json()
    return job


def listed(page: httpx.Response, *jobs: dict[str, Any]) -> list[bool]:
    assert page.status_code == 200, page.text
    return [j["id"] in page.text for j in jobs]


async def test_jobs_are_filtered_by_time_range(signed: Service) -> None:
    """From/to narrow the jobs to those created in that range (UTC, or any zone given)."""
    early = await signed.submit()  # 2027-01-15T08:00:00Z
    signed.clock.now += 3600
    late = await signed.submit()  # 09:00
    get = signed.client.get
    assert listed(await get("/ui/jobs?since=2027-01-15T08:30:00Z"), early, late) == [False, True]
    assert listed(await get("/ui/jobs?until=2027-01-15T08:30"), early, late) == [True, False]
    # The same instant in another zone; the page shows the range back in UTC for the script.
    page = await get("/ui/jobs?since=2027-01-15T09:30:00%2B01:00&until=2027-01-15T09:00:01Z")
    assert listed(page, early, late) == [False, True]
    assert 'value="2027-01-15T08:30:00" data-utc="2027-01-15T08:30:00Z"' in page.text
    api = await get("/v1/jobs", params={"since": "2027-01-15T08:30:00Z"}, headers=ADMIN)
    assert [j["id"] for j in api.json()["items"]] == [late["id"]]


async def test_a_job_is_found_by_id_prediction_or_metadata_value(signed: Service) -> None:
    """The find box matches a job's id, its prediction's id, or a top-level string value of
    its metadata, exactly; the admin API's `q` does the same."""
    mine = await submit_with(signed, session_id="sess-42", environment="prod")
    other = await submit_with(signed, session_id="sess-7")
    get = signed.client.get
    for text in (mine["id"], mine["prediction_id"], "sess-42"):
        assert listed(await get("/ui/jobs", params={"q": text}), mine, other) == [True, False]
    assert listed(await get("/ui/jobs", params={"q": "prod"}), mine, other) == [True, False]
    assert listed(await get("/ui/jobs", params={"q": "sess"}), mine, other) == [False, False]
    combined = await get("/ui/jobs", params={"q": "sess-42", "status": "completed"})
    assert "No jobs match these filters" in combined.text
    api = await get("/v1/jobs", params={"q": "sess-7"}, headers=ADMIN)
    assert [j["id"] for j in api.json()["items"]] == [other["id"]]


async def test_filtered_jobs_page_through_every_match_once(signed: Service) -> None:
    """With a filter on, the "older" link walks every matching job once, newest first."""
    made = [await submit_with(signed, team="blue" if i % 2 else "red") for i in range(7)]
    for i, _ in enumerate(made):
        signed.clock.now += 1 if i % 3 else 0  # some share a creation time
    blue = [j["id"] for j in made if j["id"] in {m["id"] for m in made[1::2]}]
    seen: list[str] = []
    url: str | None = "/ui/jobs?q=blue&limit=2"
    while url:
        page = await signed.client.get(url)
        seen += re.findall(r'<a href="[^"]*/ui/jobs/([^"]+)"><code', page.text)
        more = re.search(r'href="([^"]+)">Older jobs', page.text)
        url = more[1].replace("&amp;", "&") if more else None
    assert seen == sorted(blue, reverse=True)


@pytest.mark.parametrize(
    "path",
    [
        "/ui/jobs?since=yesterday",
        "/ui/jobs?until=2027-13-01T00:00",
        "/ui/jobs?cursor=nope",
        "/ui/deliveries?state=bogus",
        "/ui/deliveries?since=1800000000",
        "/ui/deliveries/retry",  # no state: nothing to retry by accident
    ],
)
async def test_bad_filters_are_a_400_page(signed: Service, path: str) -> None:
    """A malformed filter is refused with a page naming the field, not a crash."""
    answer = await signed.client.get(path)
    assert answer.status_code == 400 and "`" in answer.text, answer.text


# -- deliveries filters and the bulk retry ---------------------------------------------------------


async def dead_deliveries(svc: Service, n: int) -> list[dict[str, Any]]:
    """`n` completed jobs whose two deliveries (erp, audit) died; their events."""
    events = []
    for _ in range(n):
        _, event = await completed_job(svc)
        events.append(event)
        svc.clock.now += 60
    await send_all(svc, "dead")
    return events


async def test_deliveries_are_filtered_by_state_sink_and_time(signed: Service) -> None:
    """The deliveries page narrows by state (retrying: pending after a failed attempt), by
    sink, and by creation time."""
    await dead_deliveries(signed, 2)  # created 08:00 and 08:01
    get = signed.client.get
    assert (await get("/ui/deliveries?state=dead")).text.count("s-dead") == 4
    assert (await get("/ui/deliveries?state=dead&sink=erp")).text.count("s-dead") == 2
    late = await get("/ui/deliveries?state=dead&since=2027-01-15T08:00:30Z")
    assert late.text.count("s-dead") == 2
    # A failed attempt that will be tried again: retrying.
    _, event = await completed_job(signed)
    now = signed.clock()
    store = signed.app.state.services.store
    claimed = await store.claim(now, 100, 30)
    attempts = [
        Attempt(
            c.delivery.id,
            1,
            now,
            1.0,
            503,
            "HTTP 503",
            "",
            "pending",
            now + 60,
            c.lease_until,
            c.lease,
        )
        for c in claimed
    ]
    await store.finish(attempts, now)
    retrying = await get("/ui/deliveries?state=retrying")
    assert retrying.text.count("HTTP 503") == 2 and "s-dead" not in retrying.text
    api = await get("/v1/deliveries", params={"state": "retrying", "sink": "erp"}, headers=ADMIN)
    assert [d["event_id"] for d in api.json()["items"]] == [event["id"]]


async def test_every_matching_dead_delivery_is_retried_after_a_confirm(signed: Service) -> None:
    """ "Retry every dead delivery" shows how many match and asks to confirm; confirming
    requeues exactly those (not other sinks', not those that died after the count)."""
    await dead_deliveries(signed, 3)
    listing = await signed.client.get("/ui/deliveries?state=dead&sink=erp")
    link = re.search(r'href="([^"]+)">Retry every dead delivery', listing.text)
    assert link, listing.text
    confirm = await signed.client.get(link[1].replace("&amp;", "&"))
    assert confirm.status_code == 200 and "<strong>3</strong> deliveries match" in confirm.text
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', confirm.text))
    assert fields["state"] == "dead" and fields["sink"] == "erp"
    await dead_deliveries(signed, 1)  # one more dies for erp after the count
    answer = await signed.client.post("/ui/deliveries/retry", data=fields)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/deliveries?state=dead&sink=erp"
    after = await signed.client.get(answer.headers["location"])
    assert "Requeued 3 deliveries" in after.text and after.text.count("s-dead") == 1
    states = await signed.client.get("/v1/deliveries?limit=100", headers=ADMIN)
    by_state: dict[tuple[str, str], int] = {}
    for d in states.json()["items"]:
        by_state[(d["sink"], d["state"])] = by_state.get((d["sink"], d["state"]), 0) + 1
    assert by_state == {("erp", "pending"): 3, ("erp", "dead"): 1, ("audit", "dead"): 4}


async def test_a_bulk_retry_needs_the_csrf_token_and_our_origin(signed: Service) -> None:
    """The bulk retry is refused (403) without the page's CSRF token or from another site,
    and then nothing is requeued."""
    await dead_deliveries(signed, 1)
    confirm = await signed.client.get("/ui/deliveries/retry?state=dead")
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', confirm.text))
    forged = {k: v for k, v in fields.items() if k != "csrf"}
    assert (await signed.client.post("/ui/deliveries/retry", data=forged)).status_code == 403
    evil = {"Origin": "https://evil.test"}
    answer = await signed.client.post("/ui/deliveries/retry", data=fields, headers=evil)
    assert answer.status_code == 403
    dead = await signed.client.get("/v1/deliveries?state=dead", headers=ADMIN)
    assert len(dead.json()["items"]) == 2


async def test_a_bulk_retry_with_nothing_to_retry_says_so(signed: Service) -> None:
    """When no delivery matches, the confirm page says there is nothing to retry, no button."""
    page = await signed.client.get("/ui/deliveries/retry?state=dead&sink=erp")
    assert page.status_code == 200 and "nothing to retry" in page.text
    assert 'name="upto"' not in page.text  # no confirm button


async def test_the_api_retries_every_delivery_a_filter_matches(signed: Service) -> None:
    """POST /v1/deliveries/retry requeues what the filters match and says how many; a state
    is required and an unknown sink is refused."""
    await dead_deliveries(signed, 2)
    post_ = signed.client.post
    answer = await post_(
        "/v1/deliveries/retry", json={"state": "dead", "sink": "audit"}, headers=ADMIN
    )
    assert answer.status_code == 202 and answer.json() == {"requeued": 2}
    assert (await post_("/v1/deliveries/retry", json={}, headers=ADMIN)).status_code == 422
    unknown = await post_(
        "/v1/deliveries/retry", json={"state": "dead", "sink": "nope"}, headers=ADMIN
    )
    assert unknown.status_code == 422 and "nope" in unknown.text
    again = await post_(
        "/v1/deliveries/retry", json={"state": "dead", "sink": "audit"}, headers=ADMIN
    )
    assert again.json() == {"requeued": 0}


# -- sign-in attempts ----------------------------------------------------------------------------


def client_at(svc: Service, address: str) -> httpx.AsyncClient:
    """A browser at `address` (the socket peer the service sees)."""
    transport = httpx.ASGITransport(app=svc.app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://receiver.test")


async def test_repeated_wrong_tokens_are_slowed_per_client(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    """After 5 wrong tokens in a minute a client gets 429 with Retry-After, even with the
    right token, while another client can still sign in; a minute later it can try again.
    No log line carries a token."""
    async with (
        client_at(service, "198.51.100.7") as mallory,
        client_at(service, "198.51.100.8") as alice,
    ):
        for _ in range(5):
            assert (await sign_in(mallory, "guess-token-xyz")).status_code == 401
        limited = await sign_in(mallory, "guess-token-xyz")
        assert limited.status_code == 429 and limited.headers["retry-after"] == "60"
        assert "try again in 60 s" in limited.text
        assert (await sign_in(mallory)).status_code == 429  # the right token waits too
        assert (await sign_in(alice)).status_code == 303
        service.clock.now += 60
        assert (await sign_in(mallory)).status_code == 303
    logs = capsys.readouterr().out
    assert "ui.signin_limited" in logs and "198.51.100.7" in logs
    assert "guess-token-xyz" not in logs and TOKEN not in logs


async def test_wrong_bearer_tokens_on_the_api_count_as_wrong_sign_ins(service: Service) -> None:
    """The admin API's bearer token is the same secret as the sign-in form's: 5 wrong ones on
    /v1 from a client and both the API (even with the right token) and the form answer 429
    with Retry-After; requests without any token are not counted; another client is not
    affected; a minute later the client gets in."""
    async with (
        client_at(service, "198.51.100.21") as mallory,
        client_at(service, "198.51.100.22") as alice,
    ):
        for _ in range(10):
            assert (await mallory.get("/v1/jobs")).status_code == 401  # no token: no guess
        for i in range(5):
            wrong = {"Authorization": f"Bearer guess-{i}"}
            assert (await mallory.get("/v1/jobs", headers=wrong)).status_code == 401
        limited = await mallory.get("/v1/jobs", headers=ADMIN)
        assert limited.status_code == 429 and limited.headers["retry-after"] == "60"
        assert (await sign_in(mallory)).status_code == 429
        assert (await alice.get("/v1/jobs", headers=ADMIN)).status_code == 200
        service.clock.now += 60
        assert (await mallory.get("/v1/jobs", headers=ADMIN)).status_code == 200


async def test_the_wrong_token_limit_can_be_turned_off(tmp_path: Path) -> None:
    """RECEIVER_SIGNIN_FAILURES=0: wrong tokens are refused (401) but never lock a client out
    (for a test harness or a private network that wants none)."""
    async with running(tmp_path, signin_failures=0) as svc:
        for i in range(8):
            wrong = {"Authorization": f"Bearer guess-{i}"}
            assert (await svc.client.get("/v1/jobs", headers=wrong)).status_code == 401
        assert (await svc.client.get("/v1/jobs", headers=ADMIN)).status_code == 200


async def test_behind_a_trusted_proxy_each_forwarded_client_is_counted(service: Service) -> None:
    """Behind a trusted proxy (the socket peer), clients are told apart by the address the
    proxy forwards: one client's failures do not lock out another."""
    async with client_at(service, "127.0.0.1") as proxy:
        one = {"X-Forwarded-For": "203.0.113.1"}
        for _ in range(5):
            form = await proxy.get("/ui/signin", headers=one)
            await proxy.post("/ui/signin", data={"token": "x", "csrf": csrf_of(form)}, headers=one)
        form = await proxy.get("/ui/signin", headers=one)
        answer = await proxy.post(
            "/ui/signin", data={"token": "x", "csrf": csrf_of(form)}, headers=one
        )
        assert answer.status_code == 429
        two = {"X-Forwarded-For": "203.0.113.2"}
        form = await proxy.get("/ui/signin", headers=two)
        answer = await proxy.post(
            "/ui/signin", data={"token": TOKEN, "csrf": csrf_of(form)}, headers=two
        )
        assert answer.status_code == 303


async def test_an_untrusted_peer_cannot_dodge_the_limit_with_forwarded_headers(
    service: Service,
) -> None:
    """A client that is not a trusted proxy is counted by its own address, whatever
    X-Forwarded-For it sends."""
    async with client_at(service, "198.51.100.9") as mallory:
        for i in range(6):
            spoof = {"X-Forwarded-For": f"203.0.113.{i}"}
            form = await mallory.get("/ui/signin", headers=spoof)
            answer = await mallory.post(
                "/ui/signin", data={"token": "x", "csrf": csrf_of(form)}, headers=spoof
            )
        assert answer.status_code == 429


async def test_an_ipv6_client_is_counted_by_its_64_block(service: Service) -> None:
    """Addresses of one IPv6 /64 share one count (a host holds the block); another block
    does not."""
    async with (
        client_at(service, "2001:db8:1:1::a") as first,
        client_at(service, "2001:db8:1:1::b") as same_block,
        client_at(service, "2001:db8:1:2::a") as other_block,
    ):
        for _ in range(5):
            assert (await sign_in(first, "wrong")).status_code == 401
        assert (await sign_in(same_block)).status_code == 429
        assert (await sign_in(other_block)).status_code == 303
