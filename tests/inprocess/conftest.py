"""In-process tier: `create_app` over `httpx.ASGITransport`, a scripted VLM Run API in the same
process, an injected clock, no subprocess and no socket. Fast enough to run on every change
(`make test-fast`)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette

from receiver.app import create_app
from receiver.config import load_settings
from tests.conftest import read_body
from tests.integration.conftest import postgres_template, postgres_url  # noqa: F401 (fixtures)

ADMIN = {"Authorization": "Bearer inprocess-admin"}
SECRET = "inprocess-webhook-secret"


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    """The headers VLM Run sends with `body` (computed here, not with the service's code)."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-VLMRun-Signature": f"sha256={digest}", "Content-Type": "application/json"}


@dataclass
class ScriptedApi:
    """The VLM Run API as far as submission goes: each generate gets a new prediction id, and
    the callback URL it was given is remembered (the test plays the callbacks)."""

    callback_paths: dict[str, str] = field(default_factory=dict)  # prediction id -> path

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = orjson.loads(await read_body(receive))
        pred = f"pred_{len(self.callback_paths) + 1}"
        self.callback_paths[pred] = httpx.URL(body["callback_url"]).path
        answer = orjson.dumps({"id": pred, "status": "pending", "created_at": "now"})
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


class Clock:
    """The service's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Service:
    app: Starlette
    client: httpx.AsyncClient
    api: ScriptedApi
    clock: Clock
    db: Path

    async def submit(self) -> dict[str, Any]:
        r = await self.client.post(
            "/v1/jobs",
            json={"url": "https://e.test/a.pdf", "domain": "document.invoice"},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        job: dict[str, Any] = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}"
        return job

    async def callback(self, pred: str, body: bytes, **headers: str) -> httpx.Response:
        return await self.client.post(
            self.api.callback_paths[pred], content=body, headers=headers or signed(body)
        )

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        r = await self.client.get(f"/v1/jobs/{job_id}", headers=ADMIN)
        assert r.status_code == 200, r.text
        found: list[dict[str, Any]] = r.json()["events"]
        return found


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **settings: Any) -> AsyncIterator[Service]:
    """The service on SQLite in tmp_path, without its worker, against the scripted API;
    `settings` override the defaults."""
    api, clock, db = ScriptedApi(), Clock(), tmp_path / "receiver.db"
    settings = {
        "database_url": f"sqlite:///{db}",
        "admin_token": "inprocess-admin",
        "vlmrun_api_key": "k",
        "vlmrun_base_url": "http://api.test/v1",
        "vlmrun_webhook_secrets": SECRET,
        "public_url": "http://receiver.test",
        "worker": False,
        "max_body_bytes": 64 * 1024,
    } | settings
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api)) as http:
        app = create_app(load_settings(**settings), http=http, clock=clock)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://receiver.test"
            ) as client,
        ):
            yield Service(app, client, api, clock, db)


@pytest.fixture
def sinks_file(tmp_path: Path) -> Path:
    """Two file sinks, `erp` and `audit`, writing into tmp_path."""
    path = tmp_path / "sinks.toml"
    path.write_text(
        f'[[sinks]]\nname = "erp"\nurl = "file://{tmp_path}/erp.jsonl"\n'
        f'[[sinks]]\nname = "audit"\nurl = "file://{tmp_path}/audit.jsonl"\n'
    )
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each store in turn, for what the store answers: SQLite in tmp_path, then a fresh
    PostgreSQL database (skipped where none is reachable, failing under CI)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/receiver.db"
    else:
        yield request.getfixturevalue("postgres_url")


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    """The service with its defaults (no sinks)."""
    async with running(tmp_path) as svc:
        yield svc
