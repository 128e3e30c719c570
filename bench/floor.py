"""The floor for bench/ingest.py: the least a durable, verified callback endpoint can do on this
stack, to tell what the service's own design costs from what the job itself costs.

The bare endpoint (bench/bare.py) plus the work no correct service can skip: check the HMAC
signature over the raw body, parse the JSON, and record the callback durably before the 2xx:
concurrent callbacks INSERTed together (`executemany`, a unique key for dedupe) and committed
with `synchronous=FULL` in one thread hop per batch. No token lookup, no job state, no outbox,
no middleware, no log line: each of those is something the service does on top.

    python bench/floor.py PORT SQLITE_PATH SECRET
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import sqlite3
import sys
from collections.abc import AsyncIterator

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

PORT, PATH, SECRET = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
conn = sqlite3.connect(PATH, isolation_level=None, check_same_thread=False)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA synchronous=FULL")
conn.execute(
    "CREATE TABLE IF NOT EXISTS floor_events (prediction_id TEXT, status TEXT, body BLOB,"
    " UNIQUE (prediction_id, status))"
)
queue: list[tuple[tuple[str, str, bytes], asyncio.Future[None]]] = []
wake = asyncio.Event()


async def writer() -> None:
    loop = asyncio.get_running_loop()
    while True:
        await wake.wait()
        wake.clear()
        batch = queue[:]
        del queue[:]
        conn.execute("BEGIN")
        rows = [row for row, _ in batch]
        conn.executemany("INSERT OR IGNORE INTO floor_events VALUES (?, ?, ?)", rows)
        await loop.run_in_executor(None, conn.execute, "COMMIT")
        for _, future in batch:
            future.set_result(None)


async def callback(request: Request) -> JSONResponse:
    raw = await request.body()
    given = request.headers.get("x-vlmrun-signature", "").removeprefix("sha256=")
    if not hmac.compare_digest(given, hmac.new(SECRET, raw, hashlib.sha256).hexdigest()):
        return JSONResponse({"error": "bad signature"}, 401)
    data = orjson.loads(raw)
    done = asyncio.get_running_loop().create_future()
    queue.append(((data["id"], data["status"], raw), done))
    wake.set()
    await done
    return JSONResponse({"status": "recorded", "id": data["id"]})


async def lifespan(app: Starlette) -> AsyncIterator[None]:
    task = asyncio.create_task(writer())
    yield
    task.cancel()


app = Starlette(
    routes=[Route("/callbacks/vlmrun/{token}", callback, methods=["POST"])],
    lifespan=contextlib.asynccontextmanager(lifespan),
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=PORT, access_log=False, log_level="warning")
