"""Forwarding rate and latency: the outbox against a bare aiohttp loop, to one local HTTP sink.

    python bench/forward.py [--events 20000] [--rounds 5] [--database-url postgresql://...]
                            [--cpus 1 | --spread]

Both sides get the same CPU budget (as `bench/ingest.py` gives its servers): by default the
worker and the baseline loop each run pinned to core 0, the sink (and the bench's polling while
the worker runs) on the other cores; a sender that spreads over a second core would otherwise
hide its cost. `--spread` pins nothing (the layout of figures before 2026-12-04).

1. Rate. A minimal aiohttp app answers 200 in a process of its own on loopback (the sink).
   The baseline is the fastest bare client loop we know: aiohttp, `--concurrency` requests in
   flight, posting the same envelopes to the same sink. The service side: `--events`
   callbacks are recorded through the store API (one outbox row each, for the sink), then
   `receiver worker` starts and the store is polled until every delivery is `delivered`. The
   clock starts at the first delivered row, so process start-up is not counted. Rounds
   alternate baseline and outbox (the outbox is put back in the queue between rounds);
   medians are reported, since other work on the machine moves single runs a lot.
2. Latency at light load: `receiver serve` (its dispatcher inside) gets `--light` signed
   callbacks one at a time, about `--light-rate` per second; the sink notes when each event
   arrives; latency = arrival at the sink - the moment the callback was sent.

With `--database-url postgresql://...` each phase runs in a fresh database created next to the
one named (and dropped afterwards); the named database itself is not touched.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import cpu_seconds, free_port, fresh_database, prediction, wait_up  # noqa: E402

from receiver.models import (  # noqa: E402
    Incoming,
    Job,
    Route,
    hash_token,
    new_callback_token,
    new_id,
)
from receiver.store import open_store  # noqa: E402

SINK = "bench"
CALLBACK_SECRET = "bench-callback-secret"
SIGNING_SECRET = "whsec_" + base64.b64encode(b"bench-signing-secret-0123").decode()


# -- the sink: a process of its own ----------------------------------------------------------


class Cores:
    """Which cores the two senders get (`sender`) and which the sink and the bench's polling
    get (`rest`); empty sets: nothing pinned."""

    def __init__(self, cpus: int, spread: bool) -> None:
        every = sorted(os.sched_getaffinity(0))
        if spread or cpus >= len(every):
            self.sender: set[int] = set()
            self.rest: set[int] = set()
        else:
            self.sender, self.rest = set(every[:cpus]), set(every[cpus:])

    def taskset(self, cores: set[int]) -> list[str]:
        return ["taskset", "-c", ",".join(map(str, sorted(cores)))] if cores else []

    @contextlib.contextmanager
    def this_process_on(self, cores: set[int]) -> Iterator[None]:
        """Run this (the bench's) process on `cores` for the block."""
        before = os.sched_getaffinity(0)
        if cores:
            os.sched_setaffinity(0, cores)
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)

    def __str__(self) -> str:
        if not self.sender:
            return "unpinned (--spread)"
        return f"senders pinned to core(s) {sorted(self.sender)}, sink on {sorted(self.rest)}"


def serve_sink(port: int) -> None:
    """A minimal aiohttp app: 200 to every POST, the arrival time noted per `webhook-id`."""
    from aiohttp import web

    arrivals: dict[str, float] = {}

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        event_id = request.headers.get("webhook-id")
        if event_id:
            arrivals[event_id] = time.time()
        return web.Response(text="ok")

    async def dump(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(arrivals), content_type="application/json")

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/arrivals", dump)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


@contextlib.contextmanager
def running(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, cwd=ROOT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the store ---------------------------------------------------------------------------------


async def fill(url: str, n: int, record: bool) -> list[str]:
    """n jobs and, with `record`, one completed callback each recorded through the store API
    (so one outbox row each). Returns the jobs' callback tokens."""
    store = open_store(url, [Route(SINK)])
    await store.migrate()
    tokens = [new_callback_token() for _ in range(n)]
    now = time.time()

    async def one(i: int, token: str) -> None:
        job = Job(new_id("job"), "document", "document.invoice", "pending", None, now, now)
        await store.create_job(job, hash_token(token))
        if record:
            incoming = Incoming(
                token_hash=hash_token(token),
                job_id=None,
                prediction_id=f"pred_bench_{i}",
                status="completed",
                domain=None,
                source="callback",
                verification="hmac-sha256",
                body=prediction(i),
                received_at=time.time(),
            )
            await store.record(incoming)

    try:
        for start in range(0, n, 2000):
            chunk = tokens[start : start + 2000]
            await asyncio.gather(*(one(i, t) for i, t in enumerate(chunk, start)))
    finally:
        await store.close()
    return tokens


async def envelopes(url: str) -> list[bytes]:
    """The bodies the outbox sends, read through the store API (for the baseline)."""
    store = open_store(url, [Route(SINK)])
    try:
        event_ids: list[str] = []
        cursor = None
        while True:
            page = await store.list_deliveries(None, SINK, 500, cursor)
            event_ids += [d.event_id for d in page.items]  # type: ignore[union-attr]
            if (cursor := page.next_cursor) is None:
                break
        bodies = []
        for start in range(0, len(event_ids), 500):
            events = await asyncio.gather(*map(store.get_event, event_ids[start : start + 500]))
            bodies += [e.envelope() for e in events if e is not None]
    finally:
        await store.close()
    return bodies


async def requeue(url: str) -> None:
    """Every delivery back in the queue, due now (as `receiver replay` would do)."""
    store = open_store(url, [Route(SINK)])
    try:
        await store.requeue(time.time(), sink=SINK, only_dead=False)
    finally:
        await store.close()


class Progress:
    """Cheap looks at the outbox: each answers from the (state, ...) index in microseconds,
    so polling often does not take CPU from the worker being measured."""

    ANY_DELIVERED = "SELECT 1 FROM deliveries WHERE state = 'delivered' LIMIT 1"
    ANY_LEFT = "SELECT 1 FROM deliveries WHERE state IN ('pending', 'leased') LIMIT 1"
    COUNT = "SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'"

    def __init__(self, url: str) -> None:
        self.url = url
        self._sqlite: sqlite3.Connection | None = None
        self._pg: Any = None

    async def __aenter__(self) -> Progress:
        if self.url.startswith("sqlite"):
            self._sqlite = sqlite3.connect(self.url.removeprefix("sqlite:///"))
        else:
            import asyncpg

            self._pg = await asyncpg.connect(self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None:
            await self._pg.close()

    async def value(self, query: str) -> int:
        if self._sqlite is not None:
            row = self._sqlite.execute(query).fetchone()
            return int(row[0]) if row else 0
        return int(await self._pg.fetchval(query) or 0)


# -- the two sides of the rate comparison ------------------------------------------------------


class Run:
    """One side of one round: the rate, and the sender's CPU microseconds per request (a
    figure other load on the machine moves much less than the rate)."""

    def __init__(self, count: int, seconds: float, cpu: float) -> None:
        self.rate = count / seconds
        self.cpu_us = cpu / count * 1e6


async def baseline(sink_url: str, bodies: list[bytes], concurrency: int) -> Run:
    """A bare aiohttp loop posting `bodies` to the sink."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        index = iter(range(len(bodies)))
        headers = {"content-type": "application/json"}

        async def worker() -> None:
            for i in index:
                async with session.post(sink_url, data=bodies[i], headers=headers) as resp:
                    await resp.read()
                    assert resp.status == 200

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Run(len(bodies), time.perf_counter() - started, time.process_time() - cpu)


def service_env(
    url: str, tmp: Path, sink_url: str, concurrency: int, **extra: str
) -> dict[str, str]:
    sinks = tmp / "sinks.toml"
    sinks.write_text(
        f'[[sinks]]\nname = "{SINK}"\nurl = "{sink_url}"\nsecret = "{SIGNING_SECRET}"\n'
        f"concurrency = {concurrency}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    return env | {
        "RECEIVER_DATABASE_URL": url,
        "RECEIVER_SINKS_FILE": str(sinks),
        "RECEIVER_LOG_FORMAT": "json",
        "RECEIVER_VLMRUN_API_KEY": "unused",  # not simulated; the jobs are never polled
        "RECEIVER_VLMRUN_WEBHOOK_SECRETS": CALLBACK_SECRET,
        "RECEIVER_DISPATCH_CONCURRENCY": str(concurrency),
        **extra,
    }


async def outbox_rate(
    url: str, tmp: Path, sink_url: str, n: int, concurrency: int, pin: list[str]
) -> Run:
    """`receiver worker` draining n due rows to the sink."""
    env = service_env(url, tmp, sink_url, concurrency)
    cmd = [*pin, sys.executable, "-m", "receiver", "worker"]
    async with Progress(url) as progress:
        with running(cmd, tmp / "worker.log", env) as proc:
            deadline = time.monotonic() + 600
            while not await progress.value(Progress.ANY_DELIVERED):
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the worker delivered nothing; see {tmp}/worker.log")
                await asyncio.sleep(0.005)
            started, cpu = time.perf_counter(), cpu_seconds(proc.pid)
            first = await progress.value(Progress.COUNT)
            while await progress.value(Progress.ANY_LEFT):
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"not every delivery was made; see {tmp}/worker.log")
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds(proc.pid) - cpu
            if await progress.value(Progress.COUNT) != n:
                sys.exit(f"deliveries not delivered (dead?); see {tmp}/worker.log")
    if elapsed < 0.5:
        sys.exit("too few events to measure a rate: raise --events")
    return Run(n - first, elapsed, cpu)


# -- latency at light load ---------------------------------------------------------------------


def signature(body: bytes) -> str:
    return "sha256=" + hmac.new(CALLBACK_SECRET.encode(), body, hashlib.sha256).hexdigest()


async def latency(
    url: str, tmp: Path, sink_url: str, n: int, rate: float, concurrency: int
) -> list[float]:
    """Milliseconds from sending each callback to its arrival at the sink."""
    tokens = await fill(url, n, record=False)
    port = free_port()
    env = service_env(url, tmp, sink_url, concurrency, RECEIVER_PORT=str(port))
    base = f"http://127.0.0.1:{port}"
    arrivals_url = sink_url.replace("/hook", "/arrivals")
    with running([sys.executable, "-m", "receiver", "serve"], tmp / "serve.log", env) as proc:
        wait_up(f"{base}/healthz", proc)
        sent: dict[str, float] = {}
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            for i, token in enumerate(tokens):
                body = prediction(1_000_000 + i)
                headers = {
                    "content-type": "application/json",
                    "x-vlmrun-signature": signature(body),
                }
                t0 = time.time()
                r = await client.post(f"/callbacks/vlmrun/{token}", content=body, headers=headers)
                r.raise_for_status()
                sent[r.json()["event_id"]] = t0
                await asyncio.sleep(max(0.0, 1 / rate - (time.time() - t0)))
            deadline = time.monotonic() + 30
            while True:
                arrivals = orjson.loads((await client.get(arrivals_url)).content)
                if all(e in arrivals for e in sent) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
    missing = [e for e in sent if e not in arrivals]
    if missing:
        sys.exit(f"{len(missing)} events never reached the sink; see {tmp}/serve.log")
    return [(arrivals[e] - t0) * 1000 for e, t0 in sent.items()]


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000, help="deliveries per rate round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians reported")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--light", type=int, default=200, help="callbacks for the latency phase")
    ap.add_argument("--light-rate", type=float, default=20.0, help="callbacks per second")
    ap.add_argument("--database-url", default=None, help="default: fresh SQLite files")
    ap.add_argument(
        "--cpus", type=int, default=1, help="cores the worker and the baseline loop each get"
    )
    ap.add_argument("--spread", action="store_true", help="pin nothing")
    ap.add_argument("--sink", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sink:  # the sink's own process
        serve_sink(args.sink)
    else:
        asyncio.run(run(args))


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="receiver-forward-"))
    port = free_port()
    sink_url = f"http://127.0.0.1:{port}/hook"
    where = "SQLite" if args.database_url is None else "PostgreSQL"
    cores = Cores(args.cpus, args.spread)
    print(cores, flush=True)
    bare: list[Run] = []
    outbox: list[Run] = []
    sink_cmd = [*cores.taskset(cores.rest), sys.executable, __file__, "--sink", str(port)]
    with running(sink_cmd, tmp / "sink.log") as sink, cores.this_process_on(cores.rest):
        wait_up(f"http://127.0.0.1:{port}/arrivals", sink)
        async with fresh_database(args.database_url, tmp, "rate") as url:
            print(f"recording {args.events} callbacks in {where} ...", flush=True)
            await fill(url, args.events, record=True)
            bodies = await envelopes(url)
            for r in range(args.rounds):
                if r:
                    await requeue(url)
                with cores.this_process_on(cores.sender):
                    bare.append(await baseline(sink_url, bodies, args.concurrency))
                pin = cores.taskset(cores.sender)
                outbox.append(
                    await outbox_rate(url, tmp, sink_url, args.events, args.concurrency, pin)
                )
                print(
                    f"round {r + 1}: bare aiohttp {bare[-1].rate:,.0f}/s"
                    f" ({bare[-1].cpu_us:.0f} us CPU each), outbox {outbox[-1].rate:,.0f}/s"
                    f" ({outbox[-1].cpu_us:.0f} us CPU each)",
                    flush=True,
                )
        async with fresh_database(args.database_url, tmp, "latency") as url:
            ms = await latency(url, tmp, sink_url, args.light, args.light_rate, args.concurrency)

    ratios = [o.rate / b.rate for o, b in zip(outbox, bare, strict=True)]

    def median(runs: list[Run], key: str) -> float:
        return statistics.median(getattr(r, key) for r in runs)

    print(
        f"\n{args.events} deliveries per round, {args.rounds} alternating rounds, "
        f"{args.concurrency} in flight, one local HTTP sink, {where}, {cores} (medians)"
    )
    print(
        f"  outbox (receiver worker):  {median(outbox, 'rate'):>8,.0f} deliveries/s,"
        f" {median(outbox, 'cpu_us'):.0f} us CPU per delivery"
    )
    print(
        f"  baseline (bare aiohttp):   {median(bare, 'rate'):>8,.0f} requests/s,"
        f" {median(bare, 'cpu_us'):.0f} us CPU per request"
    )
    print(
        f"  ratio: {statistics.median(ratios):.2f} (per round: "
        f"{', '.join(f'{x:.2f}' for x in ratios)}; target >= 0.5);"
        f" CPU per send, baseline/outbox: {median(bare, 'cpu_us') / median(outbox, 'cpu_us'):.2f}"
    )
    print(f"callback -> sink latency, {len(ms)} callbacks one at a time at {args.light_rate:g}/s:")
    print(
        f"  p50 {percentile(ms, 50):.1f} ms, p99 {percentile(ms, 99):.1f} ms, "
        f"max {max(ms):.1f} ms (target p50 < 20 ms)"
    )


if __name__ == "__main__":
    main()
