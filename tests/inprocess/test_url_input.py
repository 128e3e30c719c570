"""URLs no handler can answer: a NUL character, a time its zone takes out of the calendar.
Each is a 400 naming the problem, on both stores, never a 500 or a 503 (which a client
would retry) and never after a change was committed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.inprocess.conftest import ADMIN, Service, running
from tests.inprocess.test_ui import csrf_of, sign_in


@pytest.fixture
async def signed(tmp_path: Path, database_url: str) -> AsyncIterator[Service]:
    sinks = tmp_path / "sinks.toml"
    sinks.write_text(f'[[sinks]]\nname = "erp"\nurl = "file://{tmp_path}/erp.jsonl"\n')
    async with running(tmp_path, sinks_file=str(sinks), database_url=database_url) as svc:
        assert (await sign_in(svc.client)).status_code == 303
        yield svc


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs?q=a%00b",
        "/v1/jobs?domain=document.invoice%00",
        "/v1/jobs/job_1%00",
        "/v1/deliveries?sink=erp%00",
        "/ui/jobs?q=a%00b",
        "/ui/jobs/job_1%00",
        "/ui/find?id=a%00b",
        "/ui/deliveries?sink=erp%00",
    ],
)
async def test_a_nul_in_the_url_is_a_400(signed: Service, path: str) -> None:
    """A NUL anywhere in the path or query is refused with 400 and the reason (PostgreSQL
    text cannot hold one: the lookup used to fail as "store unavailable", 503)."""
    answer = await signed.client.get(path, headers=ADMIN)
    assert answer.status_code == 400, answer.text
    assert "NUL" in answer.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs?since=9999-12-31T23:59:59-14:00",
        "/ui/jobs?since=9999-12-31T23:59:59-14:00",
        "/ui/deliveries?until=0001-01-01T00:00:00%2B14:00",
        "/ui/deliveries/retry?state=dead&since=9999-12-31T23:59:59-14:00",
    ],
)
async def test_a_time_out_of_range_in_utc_is_a_400(signed: Service, path: str) -> None:
    """A time whose zone takes it past year 9999 (or before year 1) once in UTC is refused
    with 400 naming the field, not a 500 while showing it."""
    answer = await signed.client.get(path, headers=ADMIN)
    assert answer.status_code == 400, answer.text
    assert "out of range" in answer.text


async def test_a_bulk_retry_with_a_time_out_of_range_changes_nothing(signed: Service) -> None:
    """The bulk retry's confirmation with such a time is refused before anything is written:
    the user never sees an error for a retry that in fact went through."""
    csrf = csrf_of(await signed.client.get("/ui/deliveries"))
    answer = await signed.client.post(
        "/ui/deliveries/retry",
        data={"csrf": csrf, "state": "dead", "since": "9999-12-31T23:59:59-14:00", "upto": "9"},
        headers={"Origin": "http://receiver.test"},
    )
    assert answer.status_code == 400, answer.text
