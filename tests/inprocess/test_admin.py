"""The admin API, in process: its token, its listings and its clear refusals."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest

from tests.inprocess.conftest import ADMIN, Service, running


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic inprocess-admin"])
async def test_every_admin_route_needs_the_token(service: Service, auth: str | None) -> None:
    """Without the admin token, or with a wrong one, every /v1 route answers 401. (Each
    request from its own address: wrong tokens from one address are limited, see
    test_ui.py.)"""
    headers = {"Authorization": auth} if auth else {}
    for i, (method, path) in enumerate(
        [
            ("GET", "/v1/jobs"),
            ("POST", "/v1/jobs"),
            ("GET", "/v1/jobs/job_x"),
            ("GET", "/v1/deliveries"),
            ("GET", "/v1/events/evt_x"),
            ("POST", "/v1/deliveries/1/retry"),
        ]
    ):
        transport = httpx.ASGITransport(app=service.app, client=(f"192.0.2.{i}", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://receiver.test") as c:
            answer = await c.request(method, path, headers=headers)
        assert answer.status_code == 401, (method, path)


async def test_jobs_list_newest_first_and_pages(service: Service) -> None:
    """Jobs list newest first; a cursor fetches the next page; an unknown job is 404."""
    ids = []
    for _ in range(3):
        ids.append((await service.submit())["id"])
        service.clock.now += 1
    first = (await service.client.get("/v1/jobs?limit=2", headers=ADMIN)).json()
    assert [j["id"] for j in first["items"]] == ids[::-1][:2]
    cursor = first["next_cursor"]
    rest = (await service.client.get(f"/v1/jobs?limit=2&cursor={cursor}", headers=ADMIN)).json()
    assert [j["id"] for j in rest["items"]] == [ids[0]] and rest["next_cursor"] is None
    missing = await service.client.get("/v1/jobs/job_nope", headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["error"]


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"next": value}
    return value


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"url": "https://e.test/a.pdf"}, "`domain`: Field required (a VLM Run domain"),
        ({"url": "https://e.test/a.pdf", "domain": "Invoice"}, "like document.invoice"),
        ({"domain": "document.invoice"}, "exactly one of"),
        ({"url": "ftp://e.test/a", "domain": "a.b"}, "`url`: String should match pattern"),
        ({"url": "https://e.test/a", "domain": "a.b", "kind": "text"}, "`kind`: Input should be"),
        ({"url": "https://e.test/a", "domain": "a.b", "config": nested(65)}, "deeper than 64"),
        ({"url": "https://e.test/a", "domain": "a.b", "config": {"detail": "x"}}, "config.detail"),
    ],
)
async def test_a_bad_submission_is_422_naming_the_fix(
    service: Service, body: dict[str, object], words: str
) -> None:
    """A submission missing or misnaming a field is refused with the field named."""
    answer = await service.client.post("/v1/jobs", json=body, headers=ADMIN)
    assert answer.status_code == 422 and words in answer.json()["error"]


async def test_a_job_shows_each_events_deliveries(tmp_path: Path) -> None:
    """GET /v1/jobs/{id} lists, under each event, its delivery to every sink that takes it;
    GET /v1/deliveries?event_id= lists the same."""
    sinks = tmp_path / "sinks.toml"
    sinks.write_text(
        f'[[sinks]]\nname = "all"\nurl = "file://{tmp_path}/all.jsonl"\n'
        f'[[sinks]]\nname = "failed"\nurl = "file://{tmp_path}/f.jsonl"\n'
        'statuses = ["failed"]\n'
    )
    async with running(tmp_path, sinks_file=str(sinks)) as service:
        job = await service.submit()
        pred = job["prediction_id"]
        body = orjson.dumps({"id": pred, "status": "completed"})
        assert (await service.callback(pred, body)).status_code == 200
        (event,) = await service.events(job["id"])
        assert [(d["sink"], d["state"]) for d in event["deliveries"]] == [("all", "pending")]
        listed = await service.client.get(f"/v1/deliveries?event_id={event['id']}", headers=ADMIN)
        shown = [{k: v for k, v in d.items() if k != "sends"} for d in event["deliveries"]]
        assert listed.json()["items"] == shown and event["deliveries"][0]["sends"] == []
