"""The admin API and its OpenAPI document: schemathesis calls a live service with everything
/openapi.json allows (and much it forbids) and checks every answer against the document."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Mount, Route

from receiver.app import create_app
from receiver.config import Settings
from tests.acceptance.conftest import ADMIN_TOKEN, API_KEY, Process

pytestmark = pytest.mark.acceptance

# Rejections no schema can express, allowed for these two operations only: VLM Run does not
# know a (well-formed) file_id, and `since` is well-formed but no real date.
CONFIG = """
[[operations]]
include-name = "POST /v1/jobs"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "409", "422", "429"]

[[operations]]
include-name = "POST /v1/deliveries/replay"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "409", "422", "429"]
"""
METHODS = ("get", "post", "put", "patch", "delete")


def operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }


def test_every_route_is_in_the_document_and_nothing_else(tmp_path: Path) -> None:
    """The document describes exactly the operations the app routes: none missing, none extra."""
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path}/r.db"))

    def operations_of(routes: list[Any], prefix: str = "") -> set[tuple[str, str]]:
        found = set()
        for route in routes:
            if not getattr(route, "include_in_schema", True):  # pages (the dashboard), not API
                continue
            if isinstance(route, Mount):
                found |= operations_of(route.routes, prefix + route.path)
            elif isinstance(route, Route):
                found |= {(m, prefix + route.path) for m in route.methods or () if m != "HEAD"}
        return found

    routed = operations_of(app.routes)

    async def served() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            document: dict[str, Any] = (await client.get("/openapi.json")).json()
            return document

    assert routed == operations(asyncio.run(served()))


def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_document(
    simulator: Process, start_service: Any, tmp_path: Path
) -> None:
    """schemathesis (all checks, about 30 examples per operation, examples, coverage, fuzzing
    and stateful phases) against a live service: no 5xx, every status code, content type,
    header and body as documented, invalid input refused, valid input accepted, auth enforced."""
    executable = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[dev]'")
    sinks = tmp_path / "sinks.toml"
    sinks.write_text(f'[[sinks]]\nname = "archive"\nurl = "file://{tmp_path}/archive.jsonl"\n')
    service = start_service(
        env={
            "RECEIVER_VLMRUN_API_KEY": API_KEY,
            "RECEIVER_VLMRUN_BASE_URL": f"{simulator.url}/v1",
            "RECEIVER_SINKS_FILE": str(sinks),
            # schemathesis sends wrong tokens on purpose (auth checks) from the one address it
            # runs from, then the right one: with the limit on, those would all be 429.
            "RECEIVER_SIGNIN_FAILURES": "0",
        }
    )
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    document = httpx.get(f"{service.url}/openapi.json").json()
    run = subprocess.run(
        [
            executable,
            "--no-color",
            "--config-file",
            str(config),
            "run",
            f"{service.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {ADMIN_TOKEN}",
            "--checks",
            "all",
            "--max-examples",
            "30",
            "--seed",
            "20261124",
            "--request-timeout",
            "15",
            "--no-shrink",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    # Every operation was run (schemathesis leaves out GET /openapi.json, the document itself).
    selected = re.search(r"Selected:\s+(\d+)/(\d+)", output)
    tested = re.search(r"Tested:\s+(\d+)", output)
    assert selected is not None and tested is not None, output[-3000:]
    assert int(tested[1]) == int(selected[1]) == int(selected[2])
    assert int(tested[1]) >= len(operations(document) - {("GET", "/openapi.json")})
    assert "5xx" not in service.logs() and '"status":500' not in service.logs()
