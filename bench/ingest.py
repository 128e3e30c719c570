"""Callback ingest rate: the service (one uvicorn worker, commit before 2xx) against a bare
Starlette endpoint, with the same stream of distinct signed callbacks at 64 connections.

    python bench/ingest.py [--seconds 10] [--connections 64] [--database-url postgresql://...]

Load comes from wrk (Debian package `wrk`, installed if missing), so the client is not the
bottleneck. Each request is a different prediction for a different job, signed as VLM Run
signs. Afterwards the store is read back: every callback acknowledged with a 2xx must be there.
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
-- Each wrk thread walks its own slice of the request file, so no request is sent twice.
local requests, counter = {}, 0
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function init(args)
  local nthreads = tonumber(args[2])
  local i = 0
  for line in io.lines(args[1]) do
    if i % nthreads == tid then
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


def write_requests(path: Path, tokens: list[str], first: int = 0) -> None:
    with path.open("w") as out:
        for i, token in enumerate(tokens, start=first):
            body = prediction(i)
            sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            out.write(f"/callbacks/vlmrun/{token}\t{sig}\t{body.decode()}\n")


def run_wrk(
    wrk: str, port: int, script: Path, reqs: Path, seconds: int, conns: int
) -> dict[str, float]:
    out = subprocess.run(
        [
            wrk,
            "-t2",
            f"-c{conns}",
            f"-d{seconds}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
            "--",
            str(reqs),
            "2",
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


def start(name: str, url: str, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if name == "bare":
        cmd = [sys.executable, str(ROOT / "bench" / "bare.py"), str(port)]
        env = dict(os.environ)
    else:
        cmd = [sys.executable, "-m", "receiver", "serve", "--port", str(port)]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="per round and server")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--callbacks", type=int, default=300_000, help="distinct callbacks prepared")
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


async def _measure(args: argparse.Namespace, wrk: str, tmp: Path, url: str) -> int:
    print(f"preparing {args.callbacks} jobs and signed callbacks in {url.split('@')[-1]} ...")
    tokens = await make_jobs(url, args.callbacks)
    script = tmp / "stream.lua"
    script.write_text(LUA)
    # One request file per round, so the service never sees a callback twice.
    per_round = len(tokens) // args.rounds
    files = []
    for r in range(args.rounds):
        files.append(tmp / f"requests-{r}.tsv")
        write_requests(files[-1], tokens[r * per_round : (r + 1) * per_round], r * per_round)

    servers = {name: start(name, url, tmp) for name in ("bare", "service")}
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "service": []}
    try:
        for r in range(args.rounds):
            for name, (proc, port) in servers.items():
                cpu = cpu_seconds(proc.pid)
                run = run_wrk(wrk, port, script, files[r], args.seconds, args.connections)
                run["cpu"] = (cpu_seconds(proc.pid) - cpu) / args.seconds
                runs[name].append(run)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    print(
        f"\n{args.rounds} alternating rounds of {args.seconds} s, {args.connections} connections"
        " (medians)"
    )
    print(f"{'':10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>10}{'CPU':>8}")
    for name in runs:
        print(
            f"{name:10}{median(name, 'rate'):>10.0f}{median(name, 'p50'):>10.2f}"
            f"{median(name, 'p99'):>10.2f}{sum(r['non2xx'] for r in runs[name]):>10.0f}"
            f"{median(name, 'cpu'):>8.0%}"
        )
    ratios = [s["rate"] / b["rate"] for s, b in zip(runs["service"], runs["bare"], strict=True)]
    print(
        f"\nratio service/bare: {statistics.median(ratios):.2f} (per round: "
        f"{', '.join(f'{x:.2f}' for x in ratios)}; target >= 0.6)"
    )
    acknowledged = sum(r["total"] - r["non2xx"] for r in runs["service"])
    events = await count_events(url)
    missing = max(0, int(acknowledged) - events)
    print(
        f"acknowledged with 2xx: {acknowledged:.0f}; events in the store: {events}; "
        f"missing: {missing}"
    )
    if any(r["total"] > per_round for r in runs["service"]):
        print("warning: a round sent more requests than prepared; raise --callbacks")
    return missing


if __name__ == "__main__":
    main()
