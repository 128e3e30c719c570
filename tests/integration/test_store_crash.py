"""Group commit and a crash: a process recording callbacks is killed with SIGKILL while its
batches are being written; every callback it was told was recorded is in the store after.

Runs on SQLite and on a real PostgreSQL, like the store contract suite.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from receiver.models import Outcome
from receiver.store import open_store
from tests.integration.test_store import ROUTES, callback, new_job

JOBS = 400

# The recording process: the jobs' token hashes on stdin; it records each job's running and
# completed states, 50 callbacks at a time from concurrent tasks (so batches are being
# committed all the time), and prints each one the store acknowledged as recorded.
RECORDER = textwrap.dedent(
    """
    import asyncio, json, sys
    from receiver.models import Incoming
    from receiver.store import open_store
    from tests.integration.test_store import ROUTES, callback

    async def main() -> None:
        store = open_store(sys.argv[1], ROUTES)
        tokens = json.loads(sys.stdin.readline())

        async def one(token: str, pred: str, status: str) -> None:
            result = await store.record(callback(token, pred, status))
            if result.outcome == "recorded":
                print(pred, status, flush=True)

        for status in ("running", "completed"):
            for i in range(0, len(tokens), 50):
                await asyncio.gather(
                    *(one(t, f"pred_{i + j}", status) for j, t in enumerate(tokens[i : i + 50]))
                )

    asyncio.run(main())
    """
)


@pytest.fixture(params=["sqlite", "postgres"])
def crash_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'receiver.db'}"
    return str(request.getfixturevalue("postgres_url"))


async def _jobs(url: str) -> list[tuple[str, str]]:
    store = open_store(url, ROUTES)
    await store.migrate()
    try:
        return [((job := await new_job(store))[0].id, job[1]) for _ in range(JOBS)]
    finally:
        await store.close()


async def _events(url: str, job_ids: list[str]) -> set[tuple[str, str]]:
    store = open_store(url, ROUTES)
    try:
        found = set()
        for job_id in job_ids:
            job = await store.get_job(job_id)
            assert job is not None
            found |= {(e.prediction_id, e.status) for e in job[1]}
        # And the store works on: a new state of a job recorded after the crash.
        result = await store.record(callback(None, "pred_0", "failed", job_id=job_ids[0]))
        assert result.outcome in (Outcome.RECORDED, Outcome.STALE)
        return found
    finally:
        await store.close()


def test_every_acknowledged_callback_survives_sigkill_during_a_batch(crash_url: str) -> None:
    """SIGKILL lands while batches are being committed; after it, every callback the store
    had answered "recorded" is there, with none half-written."""
    jobs = asyncio.run(_jobs(crash_url))
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", RECORDER, crash_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=root,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps([token for _, token in jobs]) + "\n")
    proc.stdin.flush()
    acknowledged: list[tuple[str, str]] = []
    deadline = time.monotonic() + 60
    while len(acknowledged) < JOBS // 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        pred, status = line.split()
        acknowledged.append((pred, status))
    proc.send_signal(signal.SIGKILL)
    # What it printed before it died was acknowledged too.
    for line in proc.stdout.read().splitlines():
        pred, status = line.split()
        acknowledged.append((pred, status))
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the recorder should still have been writing"
    assert len(acknowledged) >= JOBS // 2
    recorded = asyncio.run(_events(crash_url, [job_id for job_id, _ in jobs]))
    assert set(acknowledged) <= recorded
