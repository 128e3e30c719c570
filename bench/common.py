"""What both benchmarks need: ports, start-up waits, CPU readings, the sample callback and a
database of their own."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Return once `url` answers; exit the benchmark if the process dies or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{url}: the process exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    sys.exit(f"{url} did not come up")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prediction(i: int, status: str = "completed") -> bytes:
    """The i-th invoice prediction in `status`, as VLM Run would call back with it."""
    return orjson.dumps(
        {
            "id": f"pred_bench_{i}",
            "status": status,
            "domain": "document.invoice",
            "created_at": "2026-11-24T08:00:00Z",
            "completed_at": "2026-11-24T08:00:09Z",
            "response": {
                "invoice_id": f"INV-{i}",
                "issuer_name": "Acme GmbH",
                "total_amount": 1234.5,
                "currency": "EUR",
                "items": [{"description": "Widget", "quantity": 3, "unit_price": 411.5}],
            },
            "usage": {"elements_processed": 1, "element_type": "page", "credits_used": 1},
        }
    )


@contextlib.asynccontextmanager
async def fresh_database(url: str | None, tmp: Path, name: str) -> AsyncIterator[str]:
    """A SQLite file in `tmp`; or, given a PostgreSQL URL, a new database next to the one named
    (which is not touched), dropped afterwards."""
    if url is None:
        yield f"sqlite:///{tmp}/{name}.db"
        return
    import asyncpg

    db = f"receiver_bench_{name}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'CREATE DATABASE "{db}"')
        yield urlunsplit(urlsplit(url)._replace(path=f"/{db}"))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()
