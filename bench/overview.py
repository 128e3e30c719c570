"""The dashboard overview's store reads (`store.overview`) with many jobs in the store.

Fills a fresh store with N jobs, each completed by one callback, spread evenly over the last
`--hours` (1: all of them in the overview's hour, its worst case), and
forwarded to two sinks: `erp` delivers every event, `crm` fails every send (its rows left
waiting for a retry, one in ten dead). Then times `store.overview(now)`, what the overview
page and its live part run every 5 s while open, and prints the median and worst of the runs.

    python bench/overview.py                       # SQLite, 100,000 jobs in the last hour
    python bench/overview.py --hours 168           # the same jobs over a week
    python bench/overview.py --jobs 20000 --postgres postgresql://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fresh_database, prediction
from receiver import models
from receiver.models import Incoming, Job, Route, new_id
from receiver.store import Attempt, Store, open_store


class IdClock:
    """`receiver.models`' clock while filling: event ids carry the time they were made (the
    overview finds the hour's events by id), so a chunk's are made at its last callback's."""

    def __init__(self) -> None:
        self.at = time.time()

    def time_ns(self) -> int:
        return int(self.at * 1e9)


CHUNK = 1000  # callbacks recorded at once (group commit), rows claimed and finished at once


async def fill(store: Store, jobs: int, now: float, hours: float = 1.0) -> None:
    span = hours * 3600 - 100  # oldest first, the newest 100 s ago
    start = now - span - 100
    ids = IdClock()
    models.time = ids  # type: ignore[assignment]
    for first in range(0, jobs, CHUNK):
        batch = range(first, min(jobs, first + CHUNK))
        made = []
        for i in batch:
            at = start + span * i / jobs
            job = Job(
                new_id("job"),
                "document",
                "document.invoice",
                "pending",
                f"pred_bench_{i}",
                at,
                at,
                {"url": f"https://e.test/{i}.pdf"},
                next_poll_at=at + 300,
            )
            await store.create_job(job, f"token-{i}")
            made.append((job, at))
        ids.at = made[-1][1]
        await asyncio.gather(
            *(
                store.record(
                    Incoming(
                        None,
                        job.id,
                        job.prediction_id or "",
                        "completed",
                        None,
                        "callback",
                        "hmac-sha256",
                        prediction(i),
                        at,
                    )
                )
                for i, (job, at) in zip(batch, made, strict=True)
            )
        )
        claimed = await store.claim(now, 2 * CHUNK, 60)
        attempts = []
        for c in claimed:
            sent = c.event.received_at + 0.05
            if c.delivery.sink == "erp":
                outcome = ("delivered", None, 200, sent)
            else:
                dead = c.delivery.id % 10 == 0
                outcome = ("dead" if dead else "pending", "HTTP 503", 503, sent + 300)
            state, error, code, next_at = outcome
            attempts.append(
                Attempt(
                    c.delivery.id,
                    1,
                    sent,
                    12.0,
                    code,
                    error,
                    "busy",
                    state,
                    next_at,
                    c.lease_until,
                    c.lease,
                )
            )
        await store.finish(attempts, now)


async def vacuum(url: str) -> None:
    """What autovacuum does soon after a fill like this: planner statistics, and a visibility
    map that lets counts read the indexes alone. Without it the figures are a fresh table's."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


async def run(url: str | None, jobs: int, runs: int, hours: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with fresh_database(url, Path(tmp), "overview") as db:
            store = open_store(db, [Route("erp"), Route("crm")])
            try:
                await store.migrate()
                now = time.time()
                began = time.perf_counter()
                await fill(store, jobs, now, hours)
                filled = time.perf_counter() - began
                if db.startswith("postgresql"):
                    await vacuum(db)
                timings = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    found = await store.overview(now)
                    timings.append((time.perf_counter() - t0) * 1000)
                kind = db.split(":", 1)[0]
                callbacks = sum(m.callbacks for m in found.minutes)
                print(
                    f"{kind}: {jobs} jobs over {hours:g} h ({filled:.0f} s to fill),"
                    f" {callbacks} callbacks in the hour; store.overview median"
                    f" {statistics.median(timings):.1f} ms, worst {max(timings):.1f} ms"
                    f" over {runs} runs"
                )
            finally:
                await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--hours", type=float, default=1.0, help="the jobs spread over this")
    parser.add_argument("--postgres", help="a PostgreSQL URL: a new database is made beside it")
    args = parser.parse_args()
    asyncio.run(run(args.postgres, args.jobs, args.runs, args.hours))


if __name__ == "__main__":
    main()
