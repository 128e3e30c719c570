"""Scale-out on PostgreSQL: web replicas and workers as separate processes on one database."""

from __future__ import annotations

import asyncio
import base64
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from receiver.models import Incoming, Job, Route, hash_token, new_callback_token, new_id
from receiver.store import Attempt, open_store
from tests.acceptance.conftest import Process, base_env, signed
from tests.conftest import Received, WebhookServer

pytestmark = pytest.mark.acceptance

EVENTS = 2000
LEASE = 3.0
CONCURRENCY = 16  # sends in flight per worker; it claims at most twice that many rows ahead


def migrate(url: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "receiver", "migrate"],
        env=base_env(RECEIVER_DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


async def create_jobs(url: str, n: int) -> list[tuple[str, str]]:
    """n submitted jobs, written through the store; returns (job id, callback token) pairs."""
    store = open_store(url)
    now = time.time()
    made = []
    try:
        for i in range(n):
            job = Job(
                id=new_id("job"),
                kind="document",
                domain="document.invoice",
                status="pending",
                prediction_id=f"pred_{i}",
                created_at=now,
                updated_at=now,
                next_poll_at=now + 3600,  # nobody polls during the test
            )
            made.append((job, new_callback_token()))
        for i in range(0, n, 200):
            await asyncio.gather(
                *(store.create_job(job, hash_token(token)) for job, token in made[i : i + 200])
            )
    finally:
        await store.close()
    return [(job.id, token) for job, token in made]


def wait_started(proc: Process, timeout: float = 20) -> None:
    """A `receiver worker` has no port: it is up once it logs `service.started`."""
    deadline = time.monotonic() + timeout
    while '"service.started"' not in proc.logs():
        assert proc.proc is not None and proc.proc.poll() is None, proc.logs()[-3000:]
        assert time.monotonic() < deadline, proc.logs()[-3000:]
        time.sleep(0.05)


async def db_rows(url: str, query: str) -> list[Any]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


def test_two_web_replicas_and_two_workers_deliver_every_event_once_per_attempt(
    postgres_database: str,
    start_service: Callable[..., Process],
    webhook_server: WebhookServer,
    tmp_path: Path,
) -> None:
    """2,000 signed callbacks spread over two `serve --no-worker` replicas, delivered by two
    `receiver worker`s to an HTTP sink; one worker is SIGKILLed halfway. Every event arrives;
    per event and attempt there is one delivery; the only repeats are rows the killed worker
    held (same webhook-id, same bytes), retried once their lease ran out."""
    started = time.monotonic()
    assert "schema at version" in migrate(postgres_database)
    sink_url = webhook_server.endpoint(delay=0.02)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()

    def sinks_file(worker: str) -> str:
        path = tmp_path / f"sinks-{worker}.toml"
        path.write_text(
            f'[[sinks]]\nname = "hook"\nurl = "{sink_url}"\nsecret = "{secret}"\n'
            f'headers = {{ "x-worker" = "{worker}" }}\n'
        )
        return str(path)

    env = {
        "RECEIVER_DATABASE_URL": postgres_database,
        "RECEIVER_VLMRUN_API_KEY": "unused",
        "RECEIVER_VLMRUN_BASE_URL": "http://127.0.0.1:9/v1",
        "RECEIVER_LEASE_SECONDS": str(LEASE),
        "RECEIVER_POLL_INTERVAL": "0.5",
        "RECEIVER_DISPATCH_CONCURRENCY": str(CONCURRENCY),
    }
    webs = [
        start_service(
            "serve", "--no-worker", env={**env, "RECEIVER_SINKS_FILE": sinks_file("web")}, name=n
        )
        for n in ("web1", "web2")
    ]
    workers = {
        name: start_service(
            "worker", env={**env, "RECEIVER_SINKS_FILE": sinks_file(name)}, ready=None, name=name
        )
        for name in ("w1", "w2")
    }
    for proc in workers.values():
        wait_started(proc)
    jobs = asyncio.run(create_jobs(postgres_database, EVENTS))

    recorded: dict[str, str] = {}  # event id -> job id
    killed_after = 0

    async def pour() -> None:
        nonlocal killed_after
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            queue = list(enumerate(jobs))

            async def sender() -> None:
                while queue:
                    i, (job_id, token) = queue.pop()
                    body = orjson.dumps(
                        {"id": f"pred_{i}", "status": "completed", "domain": "document.invoice"}
                    )
                    web = webs[i % 2]
                    r = await client.post(
                        f"{web.url}/callbacks/vlmrun/{token}", content=body, headers=signed(body)
                    )
                    assert r.status_code == 200 and r.json()["status"] == "recorded", r.text
                    recorded[r.json()["event_id"]] = job_id

            async def killer() -> None:
                nonlocal killed_after
                for _ in range(6000):  # 30 s at most
                    if len(webhook_server.received(sink_url)) >= EVENTS // 2:
                        break
                    await asyncio.sleep(0.005)
                workers["w1"].stop(signal.SIGKILL)
                killed_after = len(webhook_server.received(sink_url))

            await asyncio.gather(killer(), *(sender() for _ in range(32)))

    asyncio.run(pour())
    assert len(recorded) == EVENTS

    deadline = time.monotonic() + 40
    while {r.headers["webhook-id"] for r in webhook_server.received(sink_url)} != set(recorded):
        assert time.monotonic() < deadline, "not every event reached the sink"
        time.sleep(0.1)
    undelivered = "SELECT id FROM deliveries WHERE state <> 'delivered'"
    while asyncio.run(db_rows(postgres_database, undelivered)):
        assert time.monotonic() < deadline, "deliveries not all marked delivered"
        time.sleep(0.1)
    time.sleep(0.5)  # anything still in flight would show up now

    requests = webhook_server.received(sink_url)
    by_event: dict[str, list[Received]] = defaultdict(list)
    for r in requests:
        by_event[r.headers["webhook-id"]].append(r)
    assert set(by_event) == set(recorded)
    senders = Counter(r.headers["x-worker"] for r in requests)
    assert senders["w1"] > 0 and senders["w2"] > 0, senders
    assert senders["w1"] <= killed_after  # nothing from the killed worker after the kill
    repeats = {e: rs for e, rs in by_event.items() if len(rs) > 1}
    for event_id, rs in by_event.items():
        # Each worker sent an event at most once; a repeat is the killed worker's unfinished
        # send, taken over by the survivor: same id, same bytes.
        assert len(rs) <= 2 and len({r.headers["x-worker"] for r in rs}) == len(rs), event_id
        assert len({r.body for r in rs}) == 1
        assert orjson.loads(rs[0].body)["job_id"] == recorded[event_id]
    assert all({r.headers["x-worker"] for r in rs} == {"w1", "w2"} for rs in repeats.values())

    # The store's record: one attempt per delivery (every send succeeded), none recorded twice;
    # the killed worker's sends of the repeated events were never recorded at all.
    query = "SELECT d.event_id, a.attempt FROM attempts a JOIN deliveries d ON d.id = a.delivery_id"
    attempts = asyncio.run(db_rows(postgres_database, query))
    assert sorted((r["event_id"], r["attempt"]) for r in attempts) == sorted(
        (e, 1) for e in recorded
    )
    assert len(repeats) <= 2 * CONCURRENCY  # at most what the killed worker held leased
    assert time.monotonic() - started < 60


def test_migrate_and_prune_commands_on_postgresql(postgres_database: str) -> None:
    """`receiver migrate` creates the schema and is a no-op the second time; `receiver prune`
    forgets delivered rows, attempts and payloads older than RECEIVER_RETENTION_DAYS."""
    first, again = migrate(postgres_database), migrate(postgres_database)
    assert "schema at version" in first and first == again

    async def old_delivered_event() -> str:
        store = open_store(postgres_database, [Route("hook")])
        try:
            ((_, token),) = await create_jobs(postgres_database, 1)
            then = time.time() - 3 * 86400
            body = orjson.dumps({"id": "pred_0", "status": "completed"})
            result = await store.record(
                Incoming(
                    hash_token(token),
                    None,
                    "pred_0",
                    "completed",
                    None,
                    "callback",
                    "hmac-sha256",
                    body,
                    then,
                )
            )
            (claimed,) = await store.claim(then, 10, 30)
            await store.finish(
                [
                    Attempt(
                        claimed.delivery.id,
                        1,
                        then,
                        5.0,
                        200,
                        None,
                        "",
                        "delivered",
                        then,
                        claimed.lease_until,
                        claimed.lease,
                    )
                ],
                then,
            )
            assert result.event_id is not None
            return result.event_id
        finally:
            await store.close()

    event_id = asyncio.run(old_delivered_event())
    run = subprocess.run(
        [sys.executable, "-m", "receiver", "prune"],
        env=base_env(RECEIVER_DATABASE_URL=postgres_database, RECEIVER_RETENTION_DAYS="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pruned 3 rows" in run.stdout  # the attempt, the delivery, the payload
    left = asyncio.run(db_rows(postgres_database, "SELECT id, body FROM events"))
    assert [(r["id"], r["body"]) for r in left] == [(event_id, None)]
    assert asyncio.run(db_rows(postgres_database, "SELECT id FROM deliveries")) == []
