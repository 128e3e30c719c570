"""Forwarding end to end: real `receiver serve` / `receiver worker` processes, real consumers.

VLM Run is played by the scripted API (the test signs and sends the callbacks itself); the
sinks file names an HTTP sink (a real consumer on loopback) and, where said, a JSONL file
sink. What is checked is what a consumer and an operator see: the requests that arrive (ids,
bytes, signatures checked with the `standardwebhooks` library), the file's lines, and the
admin API's view of the deliveries.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from standardwebhooks import Webhook

from tests.acceptance.conftest import ADMIN_TOKEN, API_KEY, FakeVlmRun, Process, signed
from tests.conftest import read_body

pytestmark = pytest.mark.acceptance

SINK_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


@dataclass(frozen=True)
class Arrival:
    status: int  # what the consumer answered
    headers: dict[str, str]
    body: bytes

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]


class Consumer:
    """A webhook consumer whose answer the test changes (`consumer.status = 200`)."""

    def __init__(self, status: int) -> None:
        self.status = status
        self._arrivals: list[Arrival] = []
        self._lock = threading.Lock()

    def arrivals(self, status: int | None = None) -> list[Arrival]:
        with self._lock:
            return [a for a in self._arrivals if status is None or a.status == status]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = await read_body(receive)
        with self._lock:
            status = self.status
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            self._arrivals.append(Arrival(status, headers, body))
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok" if status < 300 else b"nope"})


def wait_for(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return result


def sinks_file(tmp_path: Path, *tables: str) -> Path:
    path = tmp_path / "sinks.toml"
    path.write_text("\n".join(f"[[sinks]]\n{t}\n" for t in tables))
    return path


def http_table(url: str, schedule: str | None = None, name: str = "erp") -> str:
    table = f'name = "{name}"\nurl = "{url}"\nsecret = "{SINK_SECRET}"'
    return table + (f"\nretry_schedule = {schedule}" if schedule else "")


def service_env(fake: FakeVlmRun, sinks: Path, **extra: str) -> dict[str, str]:
    return {
        "RECEIVER_VLMRUN_API_KEY": API_KEY,
        "RECEIVER_VLMRUN_BASE_URL": fake.url,
        "RECEIVER_SINKS_FILE": str(sinks),
        "RECEIVER_POLL_INTERVAL": "0.2",
        **extra,
    }


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def callbacks(
    service: Process, fake: FakeVlmRun, n: int, statuses: tuple[str, ...] = ("completed",)
) -> list[str]:
    """Submit n jobs, then send each job's callbacks as VLM Run would; the event ids, in order."""
    events = []
    for i in range(n):
        r = httpx.post(
            f"{service.url}/v1/jobs",
            json={"url": f"https://example.com/doc-{i}.pdf", "domain": "document.invoice"},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        prediction_id = r.json()["prediction_id"]
        for status in statuses:
            body = orjson.dumps(
                {"id": prediction_id, "status": status, "response": {"invoice_id": f"INV-{i}"}}
            )
            answer = httpx.post(
                fake.callback_urls[prediction_id], content=body, headers=signed(body)
            )
            assert answer.json()["status"] == "recorded", answer.text
            events.append(answer.json()["event_id"])
    return events


def deliveries(service: Process, state: str | None = None) -> list[dict[str, Any]]:
    params = {"limit": 500, **({"state": state} if state else {})}
    r = httpx.get(f"{service.url}/v1/deliveries", params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def verified(arrival: Arrival) -> dict[str, Any]:
    """The envelope, once the reference library has checked its signature."""
    envelope: dict[str, Any] = Webhook(SINK_SECRET).verify(arrival.body, arrival.headers)
    assert envelope["id"] == arrival.id
    return envelope


def test_every_event_reaches_each_sink_signed_and_identical(
    start_service: Any, fake_vlmrun: FakeVlmRun, webhook_server: Any, tmp_path: Path
) -> None:
    """Callbacks for 5 jobs (running, then completed) reach the HTTP sink, signed so the
    consumer's library accepts them, and the file sink that wants only `completed`; the same
    event has the same id and the same bytes in both."""
    hook = webhook_server.endpoint()
    journal = tmp_path / "events.jsonl"
    sinks = sinks_file(
        tmp_path,
        http_table(hook),
        f'name = "journal"\nurl = "file://{journal}"\nstatuses = ["completed"]',
    )
    service = start_service(env=service_env(fake_vlmrun, sinks))

    events = callbacks(service, fake_vlmrun, 5, ("running", "completed"))
    completed = events[1::2]

    received = wait_for(lambda: len(r := webhook_server.received(hook)) == 10 and r)
    by_id = {r.headers["webhook-id"]: r for r in received}
    assert sorted(by_id) == sorted(events)
    for r in received:
        envelope = Webhook(SINK_SECRET).verify(r.body, r.headers)
        assert envelope["id"] == r.headers["webhook-id"]
        assert envelope["type"] == f"prediction.{envelope['status']}"
    lines = wait_for(
        lambda: journal.exists() and len(ls := journal.read_bytes().splitlines()) == 5 and ls
    )
    assert [orjson.loads(line)["id"] for line in lines] == completed
    for line in lines:
        assert line == by_id[orjson.loads(line)["id"]].body
    wait_for(lambda: len(deliveries(service, "delivered")) == 15)


def test_a_sink_down_for_a_while_gets_every_event_once_it_is_back(
    start_service: Any, fake_vlmrun: FakeVlmRun, asgi_server: Any, tmp_path: Path
) -> None:
    """The consumer answers 503 while 8 events come in, then recovers: each event arrives
    (once) with a 200, none is left dead, and while it was down the circuit breaker kept the
    requests to a handful."""
    consumer = Consumer(503)
    url = asgi_server(consumer) + "/hook"
    sinks = sinks_file(tmp_path, http_table(url, "[0, 1, 1, 1, 1, 1, 1, 1, 1, 1]"))
    service = start_service(env=service_env(fake_vlmrun, sinks))

    events = callbacks(service, fake_vlmrun, 8)
    wait_for(lambda: len(consumer.arrivals()) >= 5)  # the breaker opens at the 5th failure
    time.sleep(2.0)
    during_outage = len(consumer.arrivals())
    assert during_outage <= 10  # 8 first tries and a probe, not a retry of every event
    consumer.status = 200

    wait_for(lambda: len(deliveries(service, "delivered")) == 8, timeout=60)
    ok = [a.id for a in consumer.arrivals(200)]
    assert sorted(ok) == sorted(events)
    assert deliveries(service, "dead") == []
    for a in consumer.arrivals(200):
        verified(a)


def test_a_sigkilled_worker_loses_nothing_and_repeats_carry_the_same_id(
    start_service: Any, fake_vlmrun: FakeVlmRun, webhook_server: Any, tmp_path: Path
) -> None:
    """`receiver worker` is SIGKILLed while it holds deliveries in flight; a new worker
    delivers every event once the dead one's leases run out. What the consumer saw twice
    came with the same id and the same bytes."""
    hook = webhook_server.endpoint(200, delay=1.0)
    sinks = sinks_file(tmp_path, http_table(hook))
    env = service_env(fake_vlmrun, sinks, RECEIVER_LEASE_SECONDS="2")
    service = start_service("serve", "--no-worker", env=env)
    worker = start_service("worker", env=env, ready=None, name="worker")
    wait_for(lambda: "service.started" in worker.logs())

    events = callbacks(service, fake_vlmrun, 20)
    wait_for(lambda: len(webhook_server.received(hook)) >= 10)  # in flight: 1 s each
    worker.stop(signal.SIGKILL)
    assert len(deliveries(service, "delivered")) < 20  # it died holding deliveries

    again = start_service("worker", env=env, ready=None, name="worker2")
    wait_for(lambda: "service.started" in again.logs())
    wait_for(lambda: len(deliveries(service, "delivered")) == 20, timeout=60)

    received = webhook_server.received(hook)
    ids = [r.headers["webhook-id"] for r in received]
    assert sorted(set(ids)) == sorted(events)
    repeated = {i for i in ids if ids.count(i) > 1}
    assert repeated, "the rows in flight at the kill should have been sent again"
    for event_id in repeated:
        copies = [r for r in received if r.headers["webhook-id"] == event_id]
        assert len({r.body for r in copies}) == 1
        for r in copies:
            assert Webhook(SINK_SECRET).verify(r.body, r.headers)["id"] == event_id


def dead_deliveries(
    start_service: Any, fake: FakeVlmRun, asgi_server: Any, tmp_path: Path
) -> tuple[Process, Consumer, list[str], list[dict[str, Any]]]:
    """A service whose consumer failed every attempt of 2 events: both deliveries dead."""
    consumer = Consumer(500)
    url = asgi_server(consumer) + "/hook"
    # Two attempts each: 4 failures stay under the circuit breaker's 5.
    sinks = sinks_file(tmp_path, http_table(url, "[0, 0.2]"))
    service = start_service(env=service_env(fake, sinks))
    events = callbacks(service, fake, 2)
    dead = wait_for(lambda: len(d := deliveries(service, "dead")) == 2 and d)
    for d in dead:
        assert d["attempts"] == 2 and "HTTP 500" in d["last_error"]
    assert len(consumer.arrivals(500)) == 4
    consumer.status = 200
    return service, consumer, events, sorted(dead, key=lambda d: d["id"])


def test_dead_deliveries_replayed_through_the_api_are_delivered(
    start_service: Any, fake_vlmrun: FakeVlmRun, asgi_server: Any, tmp_path: Path
) -> None:
    """An operator lists the dead deliveries, retries one, replays the rest of the sink's dead
    ones, then replays a delivered event: each arrives, with the id it had all along."""
    service, consumer, events, dead = dead_deliveries(
        start_service, fake_vlmrun, asgi_server, tmp_path
    )
    first, second = dead

    r = httpx.post(f"{service.url}/v1/deliveries/{first['id']}/retry", headers=ADMIN)
    assert (r.status_code, r.json()) == (202, {"requeued": 1})
    wait_for(lambda: [a.id for a in consumer.arrivals(200)] == [first["event_id"]])

    r = httpx.post(f"{service.url}/v1/deliveries/replay", json={"sink": "erp"}, headers=ADMIN)
    assert (r.status_code, r.json()) == (202, {"requeued": 1})  # only what is still dead
    wait_for(lambda: len(deliveries(service, "delivered")) == 2)
    assert sorted(a.id for a in consumer.arrivals(200)) == sorted(events)
    assert deliveries(service, "dead") == []

    # Deliver an event again although it was delivered (a consumer lost its copy).
    r = httpx.post(f"{service.url}/v1/events/{second['event_id']}/replay", headers=ADMIN)
    assert (r.status_code, r.json()) == (202, {"requeued": 1})
    wait_for(lambda: len(consumer.arrivals(200)) == 3)
    copies = [a for a in consumer.arrivals() if a.id == second["event_id"]]
    assert len(copies) == 4  # two failures, the replay of the dead one, this replay
    assert len({a.body for a in copies}) == 1
    for a in copies:
        verified(a)

    # What cannot be replayed says why.
    for path, body, status in [
        ("/v1/deliveries/999999/retry", None, 404),
        ("/v1/events/evt_nope/replay", None, 404),
        ("/v1/deliveries/replay", {}, 422),
        ("/v1/deliveries/replay", {"sink": "nope"}, 422),
        (f"/v1/events/{second['event_id']}/replay", {"sink": "nope"}, 422),
    ]:
        r = httpx.post(f"{service.url}{path}", json=body, headers=ADMIN)
        assert r.status_code == status, (path, r.text)
        assert r.json()["error"]


def replay_cli(service: Process, *args: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "receiver", "replay", *args, "--url", service.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RECEIVER_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout.strip()


def test_dead_deliveries_replayed_with_the_cli_are_delivered(
    start_service: Any, fake_vlmrun: FakeVlmRun, asgi_server: Any, tmp_path: Path
) -> None:
    """`receiver replay --delivery`, `--dead --sink` (with and without `--since`) and
    `--event` put deliveries back; each arrives with its original id."""
    service, consumer, events, dead = dead_deliveries(
        start_service, fake_vlmrun, asgi_server, tmp_path
    )
    first, second = dead

    assert replay_cli(service, "--delivery", str(first["id"])) == "requeued 1 deliveries"
    wait_for(lambda: [a.id for a in consumer.arrivals(200)] == [first["event_id"]])

    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    assert replay_cli(service, "--dead", "--sink", "erp", "--since", later) == (
        "requeued 0 deliveries"
    )
    assert replay_cli(service, "--dead", "--sink", "erp") == "requeued 1 deliveries"
    wait_for(lambda: len(deliveries(service, "delivered")) == 2)
    assert sorted(a.id for a in consumer.arrivals(200)) == sorted(events)

    out = replay_cli(service, "--event", second["event_id"], "--sink", "erp")
    assert out == "requeued 1 deliveries"
    wait_for(lambda: len(consumer.arrivals(200)) == 3)
    copies = [a for a in consumer.arrivals() if a.id == second["event_id"]]
    assert [a.status for a in copies] == [500, 500, 200, 200]
    assert len({a.body for a in copies}) == 1
