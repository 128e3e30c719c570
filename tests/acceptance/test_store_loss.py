"""The SQLite store lost under a running service: its files removed, or writes failing as on a
full disk. The service answers 503 and fails /readyz instead of acknowledging what it cannot
keep, and never starts afresh on an empty database by itself."""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from tests.acceptance.conftest import (
    FakeVlmRun,
    Process,
    _pg_admin,
    api_env,
    signed,
    submit,
    terminal_callback,
    wait_for,
)

pytestmark = pytest.mark.acceptance


def ready(service: Process) -> int:
    return httpx.get(f"{service.url}/readyz", timeout=10).status_code


def test_removed_database_files_answer_503_and_are_not_recreated(
    tmp_path: Path, start_service: Callable[..., Process], fake_vlmrun: FakeVlmRun
) -> None:
    """After `rm receiver.db*` the next callbacks get 503, /readyz fails, `store.lost` is
    logged at error level, and a restart refuses to create an empty database."""
    service = start_service("serve", env=api_env(fake_vlmrun.url))
    assert terminal_callback(service, fake_vlmrun) == 200
    jobs = submit(service, 3)  # submitted before the loss: their callbacks come after it
    for path in tmp_path.glob("receiver.db*"):
        path.unlink()
    answers = []
    for job in jobs:
        pred = str(job["prediction_id"])
        body = orjson.dumps({"id": pred, "status": "completed"})
        url = fake_vlmrun.callback_urls[pred]
        answers.append(httpx.post(url, content=body, headers=signed(body)).status_code)
    assert answers == [503, 503, 503]  # checked before each commit batch: no 200 at all
    assert ready(service) == 503
    lost = [line for line in service.logs().splitlines() if '"event":"store.lost"' in line]
    assert len(lost) == 1 and '"level":"error"' in lost[0]
    service.stop()
    assert not list(tmp_path.glob("receiver.db*"))
    again = subprocess.run(
        [sys.executable, "-m", "receiver", "serve"],
        env=service.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode != 0 and "receiver migrate" in again.stderr + again.stdout
    assert not list(tmp_path.glob("receiver.db*"))


def test_readyz_fails_while_writes_fail_and_passes_again_by_itself(
    start_service: Callable[..., Process], fake_vlmrun: FakeVlmRun
) -> None:
    """With every file write refused (a 1-byte file-size limit: as a full disk), callbacks get
    503 and /readyz fails; once writes work again /readyz passes with no other traffic."""
    service = start_service("serve", env=api_env(fake_vlmrun.url))
    assert service.proc is not None
    pid = service.proc.pid
    (job,) = submit(service)
    pred = str(job["prediction_id"])
    body = orjson.dumps({"id": pred, "status": "completed"})
    url = fake_vlmrun.callback_urls[pred]
    before = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, before[1]))  # the soft limit only
    try:
        assert httpx.post(url, content=body, headers=signed(body)).status_code == 503
        assert ready(service) == 503
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, before)
    wait_for(lambda: ready(service) == 200, 10, "/readyz to pass again")
    answer = httpx.post(url, content=body, headers=signed(body))
    assert answer.status_code == 200 and answer.json()["status"] == "recorded"


def test_postgresql_readyz_fails_while_writes_fail_and_passes_again(
    start_service: Callable[..., Process], fake_vlmrun: FakeVlmRun, postgres_database: str
) -> None:
    """On PostgreSQL made read-only (writes refused, as on a full disk) callbacks get 503 and
    /readyz fails; once writes are allowed again /readyz passes by itself."""
    name = postgres_database.rsplit("/", 1)[1]
    service = start_service(
        "serve", env=api_env(fake_vlmrun.url, RECEIVER_DATABASE_URL=postgres_database)
    )
    (job,) = submit(service)
    pred = str(job["prediction_id"])
    body = orjson.dumps({"id": pred, "status": "completed"})
    url = fake_vlmrun.callback_urls[pred]
    kick = f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    _pg_admin(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    _pg_admin(kick)  # new connections, with the new default
    try:
        wait_for(lambda: ready(service) == 503, 15, "/readyz to fail")
        assert httpx.post(url, content=body, headers=signed(body)).status_code == 503
    finally:
        _pg_admin(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        _pg_admin(kick)
    wait_for(lambda: ready(service) == 200, 15, "/readyz to pass again")
    answer = httpx.post(url, content=body, headers=signed(body))
    assert answer.status_code == 200 and answer.json()["status"] == "recorded"
