"""Operations: health and readiness, Prometheus metrics, graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.acceptance.conftest import ADMIN_TOKEN, FakeVlmRun, Process, free_port, signed, submit

pytestmark = pytest.mark.acceptance
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SINK_SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()


class CompletingVlmRun(FakeVlmRun):
    """The scripted API, except that a polled prediction has completed."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and "/predictions/" in scope["path"]
        ):
            pred_id = scope["path"].rsplit("/", 1)[1]
            body = orjson.dumps({"id": pred_id, "status": "completed", "response": {"ok": 1}})
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await super().__call__(scope, receive, send)


class SlowVlmRun(FakeVlmRun):
    """The scripted API, taking `delay` seconds to accept each job."""

    delay = 1.5

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/generate"):
            await asyncio.sleep(self.delay)
        await super().__call__(scope, receive, send)


def fake_api(asgi_server: Any, fake: FakeVlmRun) -> FakeVlmRun:
    fake.url = f"{asgi_server(fake)}/v1"
    return fake


def call_back(fake: FakeVlmRun, job: dict[str, Any], status: str = "completed") -> httpx.Response:
    body = orjson.dumps({"id": job["prediction_id"], "status": status})
    return httpx.post(fake.callback_urls[job["prediction_id"]], content=body, headers=signed(body))


def scrape(service: Process) -> dict[str, float]:
    """`/metrics` as {'name{labels}': value}."""
    r = httpx.get(f"{service.url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def wait_for(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def lines(proc: Process) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in proc.logs().splitlines() if raw.startswith("{")]


def test_healthz_and_readyz_answer_when_all_is_well(start_service: Any) -> None:
    """/healthz says the process is alive; /readyz says ready with the store and worker up,
    and without a worker too (`serve --no-worker`)."""
    service = start_service()
    assert httpx.get(f"{service.url}/healthz").json() == {"status": "ok"}
    wait_for(lambda: httpx.get(f"{service.url}/readyz").status_code == 200)
    assert httpx.get(f"{service.url}/readyz").json() == {"status": "ready"}
    web_only = start_service("serve", "--no-worker", name="web")
    ready = httpx.get(f"{web_only.url}/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


def test_readyz_is_503_while_the_store_is_unreachable(start_service: Any) -> None:
    """With PostgreSQL unreachable the service still starts: /healthz 200, /readyz 503 naming
    the store, callbacks 503 (so VLM Run retries); the password never reaches the log."""
    pytest.importorskip("asyncpg")
    closed = free_port()
    password = "pg-secret-" + str(closed)
    service = start_service(
        env={"RECEIVER_DATABASE_URL": f"postgresql://receiver:{password}@127.0.0.1:{closed}/r"}
    )
    assert httpx.get(f"{service.url}/healthz").status_code == 200
    ready = httpx.get(f"{service.url}/readyz")
    assert ready.status_code == 503
    assert "store unreachable" in ready.json()["problems"]
    assert "worker not running" in ready.json()["problems"]
    body = orjson.dumps({"id": "pred_1", "status": "completed"})
    callback = httpx.post(
        f"{service.url}/callbacks/vlmrun/some-token", content=body, headers=signed(body)
    )
    assert callback.status_code == 503
    assert service.stop() == 0
    events = [line["event"] for line in lines(service)]
    assert "store.unavailable" in events
    assert events[-1] == "service.stopped"
    assert password not in service.logs()


def test_readyz_turns_ready_when_the_store_comes_back(
    start_service: Any, require_service: Any
) -> None:
    """A service started while PostgreSQL was unreachable becomes ready once it is back,
    without a restart: the schema is applied and the worker starts."""
    asyncpg = pytest.importorskip("asyncpg")
    require_service("127.0.0.1", 5432, "PostgreSQL")
    database = f"receiver_ops_{free_port()}"

    async def admin(statement: str) -> None:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres", timeout=10)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    port = free_port()
    asyncio.run(admin(f"CREATE DATABASE {database}"))
    relay: subprocess.Popen[bytes] | None = None
    try:
        service = start_service(
            env={"RECEIVER_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/{database}"}
        )
        assert httpx.get(f"{service.url}/readyz").status_code == 503
        # The store "comes back": a TCP relay to the real server starts on the port.
        relay = subprocess.Popen([sys.executable, "-c", RELAY, str(port)])
        wait_for(lambda: httpx.get(f"{service.url}/readyz").status_code == 200, timeout=30)
        assert service.stop() == 0
        assert "store.ready" in [line["event"] for line in lines(service)]
    finally:
        if relay is not None:
            relay.kill()
            relay.wait()
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))


RELAY = """
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()

async def handle(reader, writer):
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def test_metrics_move_with_traffic(
    start_service: Any, asgi_server: Any, webhook_server: Any, tmp_path: Path
) -> None:
    """After callbacks, forgeries, deliveries to a working and a failing sink and a recovery
    by polling, /metrics shows each: callbacks by outcome, verification failures, deliveries by
    sink and outcome, delivery latency, outbox depth and age, jobs outstanding, reconciler
    recoveries and the failing sink's open circuit."""
    fake = fake_api(asgi_server, CompletingVlmRun())
    good, broken = webhook_server.endpoint(200), webhook_server.endpoint(500)
    sinks = tmp_path / "sinks.toml"
    sinks.write_text(
        f'[[sinks]]\nname = "good"\nurl = "{good}"\nsecret = "{SINK_SECRET}"\n\n'
        f'[[sinks]]\nname = "broken"\nurl = "{broken}"\nsecret = "{SINK_SECRET}"\n'
        "retry_schedule = [0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]\n"
    )
    service = start_service(
        env={
            "RECEIVER_VLMRUN_API_KEY": "key",
            "RECEIVER_VLMRUN_BASE_URL": fake.url,
            "RECEIVER_SINKS_FILE": str(sinks),
            "RECEIVER_RECONCILE_AFTER": "3",
            "RECEIVER_POLL_INTERVAL": "0.2",
            "RECEIVER_RECONCILE_RATE_PER_MINUTE": "600",
        }
    )
    before = scrape(service)
    assert before['receiver_sink_circuit_open{sink="broken"}'] == 0
    assert before["receiver_jobs_outstanding"] == 0

    jobs = submit(service, 7)
    assert scrape(service)["receiver_jobs_outstanding"] == 7
    for job in jobs[:6]:
        assert call_back(fake, job).json()["status"] == "recorded"
    forged = orjson.dumps({"id": jobs[0]["prediction_id"], "status": "failed"})
    url = fake.callback_urls[jobs[0]["prediction_id"]]
    assert httpx.post(url, content=forged, headers=signed(forged, "wrong")).status_code == 401
    unknown = httpx.post(
        url.rsplit("/", 1)[0] + "/no-such-token", content=forged, headers=signed(forged)
    )
    assert unknown.status_code == 404

    # The 7th job's callback never comes: the reconciler polls and recovers it.
    def settled() -> bool:
        m = scrape(service)
        return (
            m.get('receiver_deliveries_total{outcome="delivered",sink="good"}', 0) == 7
            and m.get('receiver_sink_circuit_open{sink="broken"}') == 1
            and m.get("receiver_reconciler_recoveries_total", 0) == 1
        )

    wait_for(settled, timeout=30)
    m = scrape(service)
    assert m['receiver_callbacks_total{outcome="recorded"}'] == 6
    assert m['receiver_callbacks_total{outcome="unauthorized"}'] == 1
    assert m['receiver_callbacks_total{outcome="unknown_token"}'] == 1
    assert m['receiver_verification_failures_total{reason="signature"}'] == 1
    assert m['receiver_verification_failures_total{reason="unknown_token"}'] == 1
    assert m['receiver_deliveries_total{outcome="pending",sink="broken"}'] >= 5
    assert m['receiver_delivery_seconds_count{sink="good"}'] == 7
    assert m['receiver_delivery_seconds_bucket{le="+Inf",sink="broken"}'] >= 5
    assert m["receiver_jobs_outstanding"] == 0
    # The broken sink's retries fall due while its circuit is open: the outbox backs up.
    assert before["receiver_outbox_due"] == 0
    wait_for(
        lambda: (
            (m := scrape(service))["receiver_outbox_due"] >= 1
            and m["receiver_outbox_oldest_due_seconds"] > 0.5
        ),
        timeout=10,
    )


def test_sigterm_during_traffic_answers_in_flight_requests_and_exits_0(
    start_service: Any, asgi_server: Any, webhook_server: Any, tmp_path: Path
) -> None:
    """SIGTERM while submissions (1.5 s each) and a slow delivery (3 s) are in flight: every
    request in flight is answered, new connections are refused, the delivery finishes and is
    recorded (not sent again after a restart), the process exits 0 and its last log line is
    `service.stopped`."""
    fake = fake_api(asgi_server, SlowVlmRun())
    slow_hook = webhook_server.endpoint(200, delay=3.0)
    sinks = tmp_path / "sinks.toml"
    sinks.write_text(f'[[sinks]]\nname = "slow"\nurl = "{slow_hook}"\nsecret = "{SINK_SECRET}"\n')
    service = start_service(
        env={
            "RECEIVER_VLMRUN_API_KEY": "key",
            "RECEIVER_VLMRUN_BASE_URL": fake.url,
            "RECEIVER_SINKS_FILE": str(sinks),
        }
    )
    (first,) = submit(service)  # 1.5 s
    assert call_back(fake, first).status_code == 200
    wait_for(lambda: len(webhook_server.received(slow_hook)) == 1)  # delivery now in flight

    async def traffic() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:

            async def one(i: int) -> int:
                r = await client.post(
                    f"{service.url}/v1/jobs",
                    json={"url": f"https://example.com/{i}.pdf", "domain": "document.invoice"},
                    headers=ADMIN,
                )
                return r.status_code

            pending = [asyncio.create_task(one(i)) for i in range(5)]
            await asyncio.sleep(0.5)  # all five are waiting on the slow API now
            assert service.proc is not None
            service.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            with pytest.raises(OSError):  # the listening socket is closed
                socket.create_connection(("127.0.0.1", service.port), timeout=1).close()
            return list(await asyncio.gather(*pending))

    started = time.monotonic()
    assert asyncio.run(traffic()) == [201] * 5
    assert service.proc is not None
    code = service.proc.wait(timeout=30)
    assert code == 0
    assert time.monotonic() - started < 15
    assert lines(service)[-1]["event"] == "service.stopped"
    # Restarted, the store shows the 6 jobs and the delivery done once (not left leased,
    # not sent again).
    service.proc = None
    service.start()
    assert len(httpx.get(f"{service.url}/v1/jobs", headers=ADMIN).json()["items"]) == 6
    (delivery,) = httpx.get(f"{service.url}/v1/deliveries", headers=ADMIN).json()["items"]
    assert (delivery["state"], delivery["attempts"]) == ("delivered", 1)
    time.sleep(1.0)
    assert len(webhook_server.received(slow_hook)) == 1


def test_worker_exits_0_on_sigterm(start_service: Any) -> None:
    """`receiver worker` stops on SIGTERM with exit code 0, its last log line written."""
    worker = start_service("worker", ready=None, name="worker")
    wait_for(lambda: "service.started" in worker.logs())
    assert worker.stop() == 0
    assert lines(worker)[-1]["event"] == "service.stopped"


def test_worker_serves_health_and_metrics_on_its_port(start_service: Any) -> None:
    """`receiver worker --port P` answers /healthz, /readyz and /metrics there, and nothing else:
    operators can probe and scrape a worker, which accepts no callbacks or admin calls."""
    port = free_port()
    worker = start_service("worker", "--port", str(port), ready=None, name="worker")
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(f"{base}/healthz"))
    assert httpx.get(f"{base}/readyz").status_code == 200
    assert "receiver_outbox_due" in httpx.get(f"{base}/metrics").text
    assert httpx.get(f"{base}/v1/jobs", headers=ADMIN).status_code == 404
    assert httpx.post(f"{base}/callbacks/vlmrun/abc", content=b"{}").status_code == 404
    assert worker.stop() == 0



def test_worker_port_has_the_same_connection_limits_as_serve(start_service: Any) -> None:
    """The worker's ops port is guarded like `serve`: a request head that stalls is cut off at
    RECEIVER_HEAD_TIMEOUT and an oversized head is refused with 431, so a port opened for
    probes and scrapes cannot be held open or fed without end."""
    port = free_port()
    worker = start_service(
        "worker",
        "--port",
        str(port),
        env={"RECEIVER_HEAD_TIMEOUT": "1", "RECEIVER_MAX_HEAD_BYTES": "8192"},
        ready=None,
        name="worker",
    )
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(f"{base}/healthz"))

    with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
        stalled.sendall(b"GET /healthz HTTP/1.1\r\nHost: worker\r\n")  # never finished
        started = time.monotonic()
        answer = stalled.recv(4096)  # the guard answers 408 and closes
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 5

    huge = httpx.get(f"{base}/healthz", headers={"X-Padding": "a" * 20_000})
    assert huge.status_code == 431
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert worker.stop() == 0


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
