"""The CLI finishes the README's story: list jobs in an 80-column terminal with whole ids, then
show one job, its events and deliveries, as tables or as the API's JSON."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import orjson
import pytest

from tests.acceptance.conftest import ADMIN_TOKEN, Process, submit, wait_for

pytestmark = pytest.mark.acceptance


def cli(service: Process, *args: str) -> str:
    """`receiver ARGS` against the service in an 80-column terminal; its standard output."""
    env = {**os.environ, "COLUMNS": "80", "RECEIVER_ADMIN_TOKEN": ADMIN_TOKEN}
    run = subprocess.run(
        [sys.executable, "-m", "receiver", *args, "--url", service.url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_jobs_then_job_show_whole_ids_events_and_json(service: Process) -> None:
    """`receiver jobs` prints every id whole at 80 columns; `receiver job ID` shows the job's
    status and its events; `--json` on both is the API's JSON."""
    (job,) = submit(service)
    listing = cli(service, "jobs")
    row = next(line for line in listing.splitlines() if job["id"] in line)  # whole, one line
    assert str(job["prediction_id"]) in row and "document.invoice" in row
    assert [j["id"] for j in orjson.loads(cli(service, "jobs", "--json"))["items"]] == [job["id"]]

    def completed() -> bool:
        shown = orjson.loads(cli(service, "job", job["id"], "--json"))
        return bool(shown["status"] == "completed" and shown["events"])

    wait_for(completed, 15, "the job to complete")
    shown = cli(service, "job", job["id"])
    assert job["id"] in shown and "completed" in shown and "callback" in shown
    event_id = orjson.loads(cli(service, "job", job["id"], "--json"))["events"][0]["id"]
    assert event_id in shown


def test_an_unknown_job_is_a_clear_message(service: Process) -> None:
    """`receiver job` with an id the service does not know says so and fails."""
    env = {**os.environ, "RECEIVER_ADMIN_TOKEN": ADMIN_TOKEN}
    run = subprocess.run(
        [sys.executable, "-m", "receiver", "job", "job_nope", "--url", service.url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode != 0 and "job job_nope: no such job" in run.stdout + run.stderr


def test_jobs_are_found_by_metadata_value_and_filtered_by_time(service: Process) -> None:
    """`receiver jobs --find VALUE` lists only the job submitted with that metadata value;
    `--since` in the future lists none; a malformed time fails with the API's reason."""
    made = []
    for session in ("sess-cli-1", "sess-cli-2"):
        answer = httpx.post(
            f"{service.url}/v1/jobs",
            json={
                "url": "https://example.com/doc.pdf",
                "domain": "document.invoice",
                "metadata": {"session_id": session},
            },
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )
        assert answer.status_code == 201, answer.text
        made.append(answer.json()["id"])
    found = orjson.loads(cli(service, "jobs", "--find", "sess-cli-2", "--json"))
    assert [j["id"] for j in found["items"]] == [made[1]]
    later = orjson.loads(cli(service, "jobs", "--since", "2099-01-01T00:00:00Z", "--json"))
    assert later["items"] == []
    env = {**os.environ, "RECEIVER_ADMIN_TOKEN": ADMIN_TOKEN}
    run = subprocess.run(
        [sys.executable, "-m", "receiver", "jobs", "--since", "yesterday", "--url", service.url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode != 0 and "since" in run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
