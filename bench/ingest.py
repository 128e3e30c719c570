"""Callback ingest rate: the service (one uvicorn worker, commit before 2xx) against a bare
Starlette endpoint, with the same stream of signed callbacks at 64 connections.

    python bench/ingest.py [--stream one|burst] [--database-url postgresql://...]
                           [--rounds 3] [--seconds 5] [--spread] [--floor]

By default (`--cpus 1`) both servers are pinned to the same single core and the load generator
(wrk) to the other, so the service gets the CPU its baseline gets: a writer thread cannot hide
its cost on a second core. `--spread` leaves all three unpinned (the layout of earlier figures).
Rounds alternate between the two servers; medians are printed with their ranges, and the
service's resident memory under load.

Streams: `one`, one terminal callback per job (what the API sends); `burst`, each job's
pending, running and completed callbacks with a retry of running and of completed, sent
together (so a job's states and duplicates land in one batch). Afterwards the store is read
back: every callback acknowledged with a 2xx must be there.

`--floor` adds a third server to the rounds, bench/floor.py: the bare endpoint plus only what
no durable, verified endpoint can skip (signature, JSON, a batched INSERT committed with
`synchronous=FULL` into its own SQLite file). Its ratio tells what the job itself costs on this
stack; the service's ratio to the floor, what the service's own design costs on top.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import cpu_seconds, free_port, fresh_database, prediction, wait_up  # noqa: E402

from receiver.models import Job, hash_token, new_callback_token, new_id  # noqa: E402
from receiver.store import open_store  # noqa: E402

SECRET = "bench-webhook-secret"
LUA = r"""
-- Each wrk thread walks its own slice of the request file, so no request is sent twice; a
-- job's lines (a block of args[3]) stay together in one slice, sent one after the other.
local requests, counter = {}, 0
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function init(args)
  local nthreads = tonumber(args[2])
  local block = tonumber(args[3])
  local i = 0
  for line in io.lines(args[1]) do
    if math.floor(i / block) % nthreads == tid then
      local path, sig, body = line:match("^(%S+)\t(%S+)\t(.*)$")
      table.insert(requests, wrk.format("POST", path,
        {["Content-Type"] = "application/json", ["X-VLMRun-Signature"] = sig}, body))
    end
    i = i + 1
  end
end
function request()
  counter = counter + 1
  if counter > #requests then counter = 1 end
  return requests[counter]
end
"""


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk (apt-get) ...", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    return shutil.which("wrk") or sys.exit("wrk is not available: apt-get install wrk")


async def make_jobs(url: str, n: int) -> list[str]:
    """n jobs in the store; returns their callback tokens."""
    store = open_store(url)
    await store.migrate()
    tokens = [new_callback_token() for _ in range(n)]
    now = time.time()

    async def one(token: str) -> None:
        job = Job(
            new_id("job"),
            "document",
            "document.invoice",
            "pending",
            None,
            now,
            now,
            next_poll_at=now + 86400,
        )
        await store.create_job(job, hash_token(token))

    for i in range(0, n, 2000):
        await asyncio.gather(*(one(t) for t in tokens[i : i + 2000]))
    await store.close()
    return tokens


async def count_events(url: str) -> int:
    """Events in the store, read straight from the database after the service has stopped."""
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT COUNT(*) FROM events"))
    finally:
        await conn.close()


# The callbacks of one job in each stream: its prediction's statuses, in the order sent.
STREAMS = {
    "one": ("completed",),
    "burst": ("pending", "running", "completed", "running", "completed"),
}


def write_requests(path: Path, tokens: list[str], statuses: tuple[str, ...], first: int) -> None:
    with path.open("w") as out:
        for i, token in enumerate(tokens, start=first):
            for status in statuses:
                body = prediction(i, status)
                sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                out.write(f"/callbacks/vlmrun/{token}\t{sig}\t{body.decode()}\n")


def run_wrk(
    wrk: list[str], port: int, script: Path, reqs: Path, block: int, args: argparse.Namespace
) -> dict[str, float]:
    out = subprocess.run(
        [
            *wrk,
            "-t2",
            f"-c{args.connections}",
            f"-d{args.seconds}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
            "--",
            str(reqs),
            "2",
            str(block),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rate": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": ms("50%"),
        "p99": ms("99%"),
        "total": total,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "errors": sum(int(x) for x in errors.groups()) if errors else 0,
    }


def start(name: str, url: str, tmp: Path, pin: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if name == "bare":
        cmd = [*pin, sys.executable, str(ROOT / "bench" / "bare.py"), str(port)]
        env = dict(os.environ)
    elif name == "floor":
        floor = [str(ROOT / "bench" / "floor.py"), str(port), str(tmp / "floor.db"), SECRET]
        cmd = [*pin, sys.executable, *floor]
        env = dict(os.environ)
    else:
        cmd = [*pin, sys.executable, "-m", "receiver", "serve", "--port", str(port)]
        env = {
            **os.environ,
            "RECEIVER_DATABASE_URL": url,
            "RECEIVER_LOG_FORMAT": "json",
            "RECEIVER_VLMRUN_WEBHOOK_SECRETS": SECRET,
            "RECEIVER_VLMRUN_API_KEY": "unused",  # not simulated: no simulator in the process
        }
    with (tmp / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=ROOT)
    wait_up(f"http://127.0.0.1:{port}/healthz", proc)
    return proc, port


def rss_mib(pid: int) -> tuple[float, float]:
    """Resident memory now and at its peak (MiB), from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()

    def field(name: str) -> float:
        m = re.search(rf"^{name}:\s+(\d+) kB", status, re.M)
        return int(m.group(1)) / 1024 if m else float("nan")

    return field("VmRSS"), field("VmHWM")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream", choices=sorted(STREAMS), default="one")
    ap.add_argument("--seconds", type=int, default=5, help="per round and server")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--callbacks", type=int, default=300_000, help="callbacks prepared")
    ap.add_argument(
        "--cpus",
        type=int,
        default=1,
        help="cores both servers share (pinned: 0..N-1); the load generator gets the next one",
    )
    ap.add_argument(
        "--spread", action="store_true", help="pin nothing: servers and wrk share every core"
    )
    ap.add_argument("--floor", action="store_true", help="also measure bench/floor.py (see above)")
    ap.add_argument(
        "--database-url",
        default=None,
        help="default: a fresh SQLite file; with a PostgreSQL URL, a fresh database next to it",
    )
    args = ap.parse_args()
    wrk = ensure_wrk()
    tmp = Path(tempfile.mkdtemp(prefix="receiver-bench-"))
    missing = asyncio.run(measure(args, wrk, tmp))
    shutil.rmtree(tmp, ignore_errors=True)
    if missing:
        sys.exit(1)


async def measure(args: argparse.Namespace, wrk: str, tmp: Path) -> int:
    """Both servers, alternating rounds; prints the figures, returns how many acknowledged
    callbacks are missing from the store."""
    async with fresh_database(args.database_url, tmp, "ingest") as url:
        return await _measure(args, wrk, tmp, url)


def _spread(lo: list[float], fmt: str) -> str:
    return f"{statistics.median(lo):{fmt}} ({min(lo):{fmt}}-{max(lo):{fmt}})"


async def _measure(args: argparse.Namespace, wrk: str, tmp: Path, url: str) -> int:
    statuses = STREAMS[args.stream]
    jobs = args.callbacks // len(statuses)
    print(f"preparing {jobs} jobs and {jobs * len(statuses)} signed callbacks ...")
    tokens = await make_jobs(url, jobs)
    script = tmp / "stream.lua"
    script.write_text(LUA)
    # One request file per round, so the service never sees a callback twice.
    per_round = len(tokens) // args.rounds
    files = []
    for r in range(args.rounds):
        files.append(tmp / f"requests-{r}.tsv")
        chunk = tokens[r * per_round : (r + 1) * per_round]
        write_requests(files[-1], chunk, statuses, r * per_round)

    cores = os.cpu_count() or 1
    if args.spread or args.cpus >= cores:
        pin_servers: list[str] = []
        pin_wrk: list[str] = []
        layout = "unpinned (--spread)"
    else:
        pin_servers = ["taskset", "-c", ",".join(str(c) for c in range(args.cpus))]
        pin_wrk = ["taskset", "-c", ",".join(str(c) for c in range(args.cpus, cores))]
        layout = f"servers on cores {pin_servers[-1]}, wrk on {pin_wrk[-1]}"
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    names = ["bare", "service", "floor"] if args.floor else ["bare", "service"]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    try:
        for name in runs:
            servers[name] = start(name, url, tmp, pin_servers)
        for r in range(args.rounds):
            for name, (proc, port) in servers.items():
                cpu = cpu_seconds(proc.pid)
                run = run_wrk([*pin_wrk, wrk], port, script, files[r], len(statuses), args)
                run["cpu"] = (cpu_seconds(proc.pid) - cpu) / args.seconds
                run["rss"], run["peak"] = rss_mib(proc.pid)
                runs[name].append(run)
                print(
                    f"  round {r + 1} {name:8} {run['rate']:>8.0f} req/s"
                    f"  p99 {run['p99']:.1f} ms  CPU {run['cpu']:.0%}  RSS {run['rss']:.0f} MiB",
                    flush=True,
                )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)

    def col(name: str, key: str) -> list[float]:
        return [r[key] for r in runs[name]]

    print(
        f"\nstream {args.stream!r}, {url.split(':', 1)[0]}, {layout};"
        f" {args.rounds} alternating rounds of {args.seconds} s, {args.connections} connections"
    )
    print("median (range)")
    print(f"{'':9}{'req/s':>22}{'p50 ms':>20}{'p99 ms':>22}{'non-2xx':>9}{'CPU':>7}{'RSS MiB':>9}")
    for name in runs:
        print(
            f"{name:9}{_spread(col(name, 'rate'), '.0f'):>22}{_spread(col(name, 'p50'), '.1f'):>20}"
            f"{_spread(col(name, 'p99'), '.1f'):>22}{sum(col(name, 'non2xx')):>9.0f}"
            f"{statistics.median(col(name, 'cpu')):>7.0%}{max(col(name, 'peak')):>9.0f}"
        )
    print()
    pairs = [("service", "bare"), ("floor", "bare"), ("service", "floor")]
    for top, bottom in pairs if args.floor else pairs[:1]:
        ratios = [t["rate"] / b["rate"] for t, b in zip(runs[top], runs[bottom], strict=True)]
        print(
            f"ratio {top}/{bottom}: {statistics.median(ratios):.2f} (rounds: "
            f"{', '.join(f'{x:.2f}' for x in ratios)})"
        )
    acknowledged = sum(r["total"] - r["non2xx"] for r in runs["service"])
    events = await count_events(url)
    if len(statuses) == 1:
        missing = max(0, int(acknowledged) - events)
        print(
            f"acknowledged with 2xx: {acknowledged:.0f}; events in the store: {events}; "
            f"missing: {missing}"
        )
    else:
        # Retries are acknowledged (duplicate, stale) without a new event: 3 states in 5.
        missing = 0
        print(
            f"acknowledged with 2xx: {acknowledged:.0f}; events in the store: {events}"
            f" (each whole burst of {len(statuses)} records {len(set(statuses))})"
        )
    if any(r["total"] > per_round * len(statuses) for r in runs["service"]):
        print("warning: a round sent more requests than prepared; raise --callbacks")
    return missing


if __name__ == "__main__":
    main()
