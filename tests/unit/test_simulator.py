"""The VLM Run simulator, driven in-process through httpx.ASGITransport."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from structlog.testing import capture_logs

from receiver.simulator import SimulatorOptions, create_simulator_app

KEY = "sk-test"
TOKEN = "tok_s3cr3t_path_token"
CALLBACK_URL = f"http://hooks.test/callbacks/vlmrun/{TOKEN}"
FAST = SimulatorOptions(api_key=KEY, delay=0.0, callback_backoff=(0.0,))


class Target:
    """A callback receiver that records every POST and answers from a script of statuses."""

    def __init__(self, *statuses: int, hang: float = 0.0) -> None:
        self.statuses, self.hang = list(statuses), hang
        self.received: list[tuple[dict[str, str], bytes]] = []
        route = Route("/callbacks/vlmrun/{token}", self.endpoint, methods=["POST"])
        self.app = Starlette(routes=[route])

    async def endpoint(self, request: Request) -> Response:
        self.received.append((dict(request.headers), await request.body()))
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 0:  # 0: hang past the simulator's timeout, then answer 200
            await asyncio.sleep(self.hang)
        return Response(status_code=status or 200)

    def bodies(self) -> list[dict[str, Any]]:
        return [orjson.loads(body) for _, body in self.received]


@asynccontextmanager
async def simulator(
    options: SimulatorOptions = FAST, target: Target | None = None
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """A running simulator (lifespan entered) and an authenticated API client for it."""
    transport = httpx.ASGITransport(app=target.app) if target else None
    async with httpx.AsyncClient(transport=transport) as callbacks:
        app = create_simulator_app(options, client=callbacks if target else None)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://sim.test/v1",
                headers={"Authorization": f"Bearer {KEY}"},
            ) as api,
        ):
            yield app, api


async def settle(app: Starlette) -> None:
    """Wait until every background job (and its callbacks) has finished."""
    while app.state.tasks:
        await asyncio.gather(*app.state.tasks)


async def submit(api: httpx.AsyncClient, path: str = "/document/generate", **body: Any) -> Any:
    source = {} if "file_id" in body or "images" in body else {"url": "https://example.com/a.pdf"}
    body = source | {"domain": "document.invoice"} | body
    response = await api.post(path, json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def test_upload_then_generate_completes_with_invoice_fields() -> None:
    """An uploaded file's id can be submitted; the job ends completed with invoice fields."""
    async with simulator() as (app, api):
        files = {"file": ("inv.pdf", b"%PDF-1.7 hello", "application/pdf")}
        upload = await api.post("/files", params={"purpose": "assistants"}, files=files)
        assert upload.status_code == 201
        assert upload.json() | {"id": "x", "created_at": "t"} == {
            "id": "x",
            "filename": "inv.pdf",
            "bytes": 14,
            "purpose": "assistants",
            "created_at": "t",
            "object": "file",
            "public_url": None,
        }
        pred = await submit(api, file_id=upload.json()["id"])
        assert pred["id"].startswith("pred_")
        assert (pred["status"], pred["response"], pred["completed_at"]) == ("pending", None, None)
        await settle(app)
        done = (await api.get(f"/predictions/{pred['id']}")).json()
    assert done["status"] == "completed" and done["completed_at"]
    invoice_fields = {"invoice_id", "issuer_name", "items", "total_amount", "currency"}
    assert invoice_fields <= set(done["response"])
    assert done["usage"]["element_type"] == "page" and done["usage"]["credits_used"] > 0


async def test_callback_is_signed_over_the_exact_body() -> None:
    """The terminal callback carries X-VLMRun-Signature = sha256=HMAC(secret, raw body)."""
    target = Target()
    options = dataclasses.replace(FAST, webhook_secret="whsec-sim")
    async with simulator(options, target) as (app, api):
        pred = await submit(api, callback_url=CALLBACK_URL)
        await settle(app)
        current = (await api.get(f"/predictions/{pred['id']}")).json()
    [(headers, body)] = target.received
    expected = hmac.new(b"whsec-sim", body, hashlib.sha256).hexdigest()
    assert headers["x-vlmrun-signature"] == f"sha256={expected}"
    assert headers["content-type"] == "application/json"
    assert orjson.loads(body) == current and current["status"] == "completed"
    assert app.state.stats["callbacks_sent"] == 1


async def test_no_signature_header_without_a_secret() -> None:
    """Without a webhook secret the callback is sent unsigned."""
    target = Target()
    async with simulator(FAST, target) as (app, api):
        await submit(api, callback_url=CALLBACK_URL)
        await settle(app)
    assert "x-vlmrun-signature" not in target.received[0][0]


async def test_intermediate_running_callback_comes_before_the_terminal_one() -> None:
    """With intermediate=True the target sees `running`, then `completed`."""
    target = Target()
    async with simulator(dataclasses.replace(FAST, intermediate=True), target) as (app, api):
        await submit(api, callback_url=CALLBACK_URL)
        await settle(app)
    assert [b["status"] for b in target.bodies()] == ["running", "completed"]
    assert target.bodies()[0]["response"] is None


async def test_failed_job_reports_an_error_message() -> None:
    """At fail_rate=1 the job ends `failed` with an `error` text, and that is called back."""
    target = Target()
    async with simulator(dataclasses.replace(FAST, fail_rate=1.0), target) as (app, api):
        await submit(api, callback_url=CALLBACK_URL)
        await settle(app)
    [body] = target.bodies()
    assert body["status"] == "failed" and body["error"] and body["response"] is None


async def test_non_2xx_answer_is_retried_once_with_the_same_bytes() -> None:
    """A 500 from the target is followed by one retry of the identical body."""
    target = Target(500, 200)
    async with simulator(FAST, target) as (app, api):
        await submit(api, callback_url=CALLBACK_URL)
        await settle(app)
    assert len(target.received) == 2 and target.received[0][1] == target.received[1][1]
    assert app.state.stats["callbacks_sent"] == 1 and app.state.stats["callbacks_failed"] == 0


async def test_callback_gives_up_after_two_attempts() -> None:
    """A target that keeps failing gets exactly two attempts, then the callback is lost."""
    target = Target(503, 503, 503)
    async with simulator(FAST, target) as (app, api):
        pred = await submit(api, callback_url=CALLBACK_URL)
        await settle(app)
        current = (await api.get(f"/predictions/{pred['id']}")).json()
    assert len(target.received) == 2
    assert app.state.stats["callbacks_failed"] == 1 and app.state.stats["callbacks_sent"] == 0
    assert current["status"] == "completed"  # still recoverable by polling


async def test_backoff_sleeps_before_the_retry() -> None:
    """The retry waits callback_backoff[0] seconds after the failed attempt."""
    target = Target(500, 200)
    options = dataclasses.replace(FAST, callback_backoff=(0.3, 5.0))
    async with simulator(options, target) as (app, api):
        loop = asyncio.get_running_loop()
        started = loop.time()
        await submit(api, callback_url=CALLBACK_URL)
        await settle(app)
    assert 0.3 <= loop.time() - started < 2.0 and len(target.received) == 2


async def test_slow_target_times_out_and_is_retried_over_real_sockets() -> None:
    """A target on a loopback port that hangs past callback_timeout gets a second attempt."""
    target = Target(0, 200, hang=0.5)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(target.app, lifespan="off", log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/callbacks/vlmrun/{TOKEN}"
        options = dataclasses.replace(FAST, callback_timeout=0.2)
        async with simulator(options) as (app, api):  # no injected client: the app's own
            await submit(api, callback_url=url)
            await settle(app)
    finally:
        server.should_exit = True
        await serving
    assert len(target.received) == 2
    assert app.state.stats["callbacks_sent"] == 1 and app.state.stats["callback_attempts"] == 2


async def test_hanging_target_behind_an_asgi_client_is_cut_off_too() -> None:
    """callback_timeout bounds each attempt even on transports that ignore httpx timeouts."""
    target = Target(0, 200, hang=5.0)
    options = dataclasses.replace(FAST, callback_timeout=0.1)
    async with simulator(options, target) as (app, api):
        await submit(api, callback_url=CALLBACK_URL)
        await asyncio.wait_for(settle(app), 2.0)
    assert len(target.received) == 2 and app.state.stats["callbacks_sent"] == 1


async def test_duplicate_rate_posts_the_same_bytes_twice() -> None:
    """At duplicate_rate=1 the terminal callback arrives twice, byte for byte."""
    target = Target()
    async with simulator(dataclasses.replace(FAST, duplicate_rate=1.0), target) as (app, api):
        await submit(api, callback_url=CALLBACK_URL)
        await settle(app)
    assert len(target.received) == 2 and target.received[0][1] == target.received[1][1]
    assert app.state.stats["callbacks_duplicated"] == 1


async def test_dropped_callback_job_still_completes() -> None:
    """At drop_rate=1 nothing is POSTed, but GET /predictions/{id} shows the result."""
    target = Target()
    async with simulator(dataclasses.replace(FAST, drop_rate=1.0), target) as (app, api):
        pred = await submit(api, callback_url=CALLBACK_URL)
        await settle(app)
        current = (await api.get(f"/predictions/{pred['id']}")).json()
    assert target.received == [] and current["status"] == "completed"
    assert app.state.stats["callbacks_dropped"] == 1


async def test_batch_false_sends_no_callback() -> None:
    """Image jobs default to batch=false and never call back; batch=true does."""
    target = Target()
    async with simulator(FAST, target) as (app, api):
        image = {"images": ["https://example.com/a.png"], "domain": "image.caption"}
        await submit(api, "/image/generate", callback_url=CALLBACK_URL, **image)
        await settle(app)
        assert target.received == []
        await submit(api, "/image/generate", callback_url=CALLBACK_URL, batch=True, **image)
        await settle(app)
    assert [b["usage"]["element_type"] for b in target.bodies()] == ["image"]


@pytest.mark.parametrize("auth", [None, "Bearer", "Bearer wrong", "Basic sk-test", f"Token {KEY}"])
async def test_missing_or_wrong_bearer_is_rejected(auth: str | None) -> None:
    """Every /v1 endpoint answers 401 with an authentication_error without the right key."""
    async with simulator() as (_, api):
        headers = {"Authorization": auth} if auth else {}
        api.headers.pop("Authorization")
        for method, path in [("GET", "/health"), ("GET", "/predictions"), ("POST", "/files")]:
            response = await api.request(method, path, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"


async def test_any_bearer_is_accepted_without_an_api_key() -> None:
    """With api_key=None any non-empty bearer token works."""
    async with simulator(SimulatorOptions(delay=0.0)) as (_, api):
        response = await api.get("/health", headers={"Authorization": "Bearer whatever"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"url": "https://x/a.pdf"}, ["body", "domain"]),
        ({"url": "https://x/a.pdf", "domain": "invoice"}, ["body", "domain"]),
        ({"domain": "document.invoice"}, ["body"]),
        ({"url": "u", "domain": "a.b", "callback_url": "ftp://x/y"}, ["body", "callback_url"]),
        ({"url": "u", "domain": "document.invoice", "batch": "yes"}, ["body", "batch"]),
        ({"url": "u", "domain": "document.invoice", "config": []}, ["body", "config"]),
        ([1, 2], ["body"]),
    ],
)
async def test_invalid_body_answers_422_with_detail(body: Any, loc: list[str]) -> None:
    """A malformed submission answers 422 FastAPI-style, naming the bad field."""
    async with simulator() as (app, api):
        response = await api.post("/document/generate", json=body)
    assert response.status_code == 422
    assert loc in [issue["loc"] for issue in response.json()["detail"]]
    assert app.state.stats["jobs_created"] == 0


async def test_unknown_file_id_answers_404() -> None:
    """Submitting a file_id that was never uploaded answers 404 with an error body."""
    async with simulator() as (_, api):
        response = await api.post(
            "/document/generate", json={"file_id": "nope", "domain": "document.invoice"}
        )
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "id"}


@pytest.mark.parametrize("code", [402, 429, 500])
async def test_magic_domain_forces_an_api_error(code: int) -> None:
    """Domain simulate.error-<code> answers that status with a realistic error body."""
    async with simulator() as (app, api):
        response = await api.post(
            "/document/generate", json={"url": "u", "domain": f"simulate.error-{code}"}
        )
    assert response.status_code == code and response.json()["error"]["message"]
    assert response.headers.get("retry-after") == ("1" if code == 429 else None)
    assert app.state.stats["jobs_created"] == 0


async def test_list_predictions_pages_newest_first_and_bounds_limit() -> None:
    """GET /predictions honours skip/limit, newest first, and refuses limit outside 1..1000."""
    async with simulator(dataclasses.replace(FAST, delay=5.0)) as (_, api):
        ids = [(await submit(api))["id"] for _ in range(3)]
        page = await api.get("/predictions", params={"skip": 1, "limit": 1})
        assert [p["id"] for p in page.json()] == [ids[1]]
        for limit in ("0", "1001", "ten"):
            response = await api.get("/predictions", params={"limit": limit})
            assert response.status_code == 422
            assert response.json()["detail"][0]["loc"] == ["query", "limit"]


async def test_unknown_prediction_answers_404() -> None:
    """GET /predictions/{id} for an unknown id answers 404 with an error body."""
    async with simulator() as (_, api):
        response = await api.get("/predictions/pred_missing")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("path", "domain", "key"),
    [
        ("/document/generate", "document.receipt", "merchant_name"),
        ("/document/generate", "document.markdown", "pages"),
        ("/document/generate", "document.resume", "contact_info"),
        ("/audio/generate", "audio.transcription", "segments"),
        ("/video/generate", "video.transcription", "segments"),
        ("/document/generate", "healthcare.patient-intake", "summary"),
    ],
)
async def test_each_domain_gets_a_plausible_response(path: str, domain: str, key: str) -> None:
    """The completed response has the shape its domain implies."""
    async with simulator() as (app, api):
        pred = await submit(api, path, domain=domain)
        await settle(app)
        done = (await api.get(f"/predictions/{pred['id']}")).json()
    assert done["domain"] == domain and key in done["response"]


async def test_status_moves_pending_running_completed() -> None:
    """GET shows pending, then running, then completed as the delays pass."""
    async with simulator(dataclasses.replace(FAST, delay=0.15)) as (_, api):
        pred = await submit(api)
        seen: list[str] = []
        while not seen or seen[-1] != "completed":
            status = (await api.get(f"/predictions/{pred['id']}")).json()["status"]
            if not seen or seen[-1] != status:
                seen.append(status)
            await asyncio.sleep(0.02)
    assert seen == ["pending", "running", "completed"]


async def test_shutdown_cancels_unfinished_jobs() -> None:
    """Leaving the lifespan cancels the background jobs; no callback is sent afterwards."""
    target = Target()
    async with simulator(dataclasses.replace(FAST, delay=30.0), target) as (app, api):
        await submit(api, callback_url=CALLBACK_URL)
        tasks = set(app.state.tasks)
        assert len(tasks) == 1
    assert all(task.cancelled() for task in tasks) and not app.state.tasks
    assert target.received == []


async def test_logs_name_the_callback_host_but_never_its_token_or_the_secret() -> None:
    """Log lines carry the callback host only: no URL path token, no webhook secret."""
    target = Target(500, 500)
    options = dataclasses.replace(FAST, webhook_secret="whsec-hidden", intermediate=True)
    with capture_logs() as logs:
        async with simulator(options, target) as (app, api):
            await submit(api, callback_url=CALLBACK_URL)
            await settle(app)
    events = {entry["event"] for entry in logs}
    assert {"simulator.callback.attempt_failed", "simulator.callback.failed"} <= events
    assert all(e.get("host") == "hooks.test" for e in logs if "callback" in e["event"])
    assert TOKEN not in repr(logs) and "whsec-hidden" not in repr(logs)


async def test_seed_makes_fault_injection_reproducible() -> None:
    """Two simulators with the same seed fail the same jobs."""
    outcomes = []
    for _ in range(2):
        options = dataclasses.replace(FAST, fail_rate=0.5, seed=7)
        async with simulator(options) as (app, api):
            ids = [(await submit(api))["id"] for _ in range(12)]
            await settle(app)
            outcomes.append([app.state.predictions[i]["status"] for i in ids])
    assert outcomes[0] == outcomes[1] and {"completed", "failed"} == set(outcomes[0])
