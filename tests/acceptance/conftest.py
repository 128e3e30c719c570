"""Acceptance tier: real `receiver serve` and `receiver simulate` processes on loopback ports."""

from __future__ import annotations

import hashlib
import hmac
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from tests.conftest import read_body

ADMIN_TOKEN = "acceptance-admin-token"
API_KEY = "sim-api-key"
WEBHOOK_SECRET = "acceptance-webhook-secret"


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` until it returns something truthy (returned), failing after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


class Process:
    """A `receiver` subcommand running in the background, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, port: int) -> None:
        self.args, self.env, self.log, self.port = args, env, log, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.max_files: int | None = None  # set: the process's descriptor limit (ulimit -n)
        # `serve` and `worker` never create a SQLite database; as an operator would once, the
        # first start runs `receiver migrate` (False: start as is).
        url = env.get("RECEIVER_DATABASE_URL", "sqlite:")
        self.migrate_first = args[0] in ("serve", "worker") and url.startswith("sqlite:")

    def _limit_files(self) -> None:
        if self.max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_files, self.max_files))

    def migrate(self) -> None:
        """`receiver migrate` with this process's settings, once, if it is to run first."""
        if not self.migrate_first:
            return
        self.migrate_first = False
        run = subprocess.run(
            [sys.executable, "-m", "receiver", "migrate"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr

    def start(self, ready_path: str = "/healthz") -> Process:
        self.migrate()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "receiver", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=self._limit_files,
            )
        wait_ready(self.url + ready_path, self.proc, self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def api_env(api_url: str, **extra: str) -> dict[str, str]:
    """Service settings that point it at a VLM Run stand-in (`.../v1`), plus `extra`."""
    return {"RECEIVER_VLMRUN_API_KEY": API_KEY, "RECEIVER_VLMRUN_BASE_URL": api_url, **extra}


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    env.update(extra)
    return env


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Process]:
    """A VLM Run simulator that signs its callbacks."""
    port = free_port()
    proc = Process(
        [
            "simulate",
            "--port",
            str(port),
            "--api-key",
            API_KEY,
            "--webhook-secret",
            WEBHOOK_SECRET,
            "--delay",
            "0.05",
        ],
        base_env(),
        tmp_path / "simulator.log",
        port,
    )
    proc.start("/v1/health")
    yield proc
    proc.stop()


def service_env(tmp_path: Path, simulator: Process, port: int, **extra: str) -> dict[str, str]:
    return base_env(
        RECEIVER_DATABASE_URL=f"sqlite:///{tmp_path}/receiver.db",
        RECEIVER_PORT=str(port),
        RECEIVER_ADMIN_TOKEN=ADMIN_TOKEN,
        RECEIVER_VLMRUN_API_KEY=API_KEY,
        RECEIVER_VLMRUN_BASE_URL=f"{simulator.url}/v1",
        RECEIVER_VLMRUN_WEBHOOK_SECRETS=WEBHOOK_SECRET,
        RECEIVER_LOG_FORMAT="json",
        **extra,
    )


@pytest.fixture
def service(tmp_path: Path, simulator: Process) -> Iterator[Process]:
    """`receiver serve` on SQLite, talking to the simulator."""
    port = free_port()
    proc = Process(
        ["serve"], service_env(tmp_path, simulator, port), tmp_path / "service.log", port
    )
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def admin() -> Iterator[httpx.Client]:
    with httpx.Client(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30) as client:
        yield client


class FakeVlmRun:
    """A scripted VLM Run API (real HTTP, in a thread) that remembers each job's callback URL,
    so a test can play the API's part exactly: sign and send callbacks itself."""

    def __init__(self) -> None:
        self.callback_urls: dict[str, str] = {}  # prediction id -> callback URL
        self.url = ""
        self._count = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        status, answer = 404, {"detail": "not found"}
        if scope["method"] == "POST" and scope["path"].endswith("/generate"):
            self._count += 1
            pred_id = f"pred_fake_{self._count}"
            self.callback_urls[pred_id] = orjson.loads(body)["callback_url"]
            status, answer = 201, {"id": pred_id, "status": "pending", "created_at": "now"}
        elif scope["method"] == "GET" and scope["path"].startswith("/v1/predictions/"):
            status, answer = 200, {"id": scope["path"].rsplit("/", 1)[1], "status": "running"}
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": orjson.dumps(answer)})


@pytest.fixture
def fake_vlmrun() -> Iterator[FakeVlmRun]:
    app = FakeVlmRun()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    app.url = f"http://127.0.0.1:{port}/v1"
    yield app
    server.should_exit = True
    thread.join(timeout=10)


def signed(body: bytes, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    """Headers VLM Run would send with `body` (computed here, not with the service's code)."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-VLMRun-Signature": f"sha256={digest}", "Content-Type": "application/json"}


@pytest.fixture
def scripted_service(tmp_path: Path, fake_vlmrun: FakeVlmRun) -> Iterator[Process]:
    """`receiver serve` on SQLite, talking to the scripted API (the test sends callbacks)."""
    port = free_port()
    env = base_env(
        RECEIVER_DATABASE_URL=f"sqlite:///{tmp_path}/receiver.db",
        RECEIVER_PORT=str(port),
        RECEIVER_ADMIN_TOKEN=ADMIN_TOKEN,
        RECEIVER_VLMRUN_API_KEY=API_KEY,
        RECEIVER_VLMRUN_BASE_URL=fake_vlmrun.url,
        RECEIVER_VLMRUN_WEBHOOK_SECRETS=WEBHOOK_SECRET,
        RECEIVER_MAX_BODY_BYTES="100000",
        RECEIVER_LOG_FORMAT="json",
    )
    proc = Process(["serve"], env, tmp_path / "service.log", port)
    proc.start()
    yield proc
    proc.stop()


# --- Process and server factories for the operations tests (proxy, logs, ops, openapi). ---


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Any]:
    """A factory: `start_service("serve", env={...})` runs a `receiver` command with SQLite in
    tmp_path, the admin token, the webhook secret and JSON logs (each overridable by `env`),
    waits until it answers `ready` (None: does not wait, for `receiver worker`), and returns its
    Process; all are stopped at teardown. Logs go to tmp_path/<name>.log."""
    started: list[Process] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        ready: str | None = "/healthz",
        name: str = "service",
    ) -> Process:
        settings = {
            "RECEIVER_DATABASE_URL": f"sqlite:///{tmp_path}/receiver.db",
            "RECEIVER_PORT": str(free_port()),
            "RECEIVER_ADMIN_TOKEN": ADMIN_TOKEN,
            "RECEIVER_VLMRUN_WEBHOOK_SECRETS": WEBHOOK_SECRET,
            "RECEIVER_LOG_FORMAT": "json",
            **(env or {}),
        }
        proc = Process(
            list(args) or ["serve"],
            base_env(**settings),
            tmp_path / f"{name}.log",
            int(settings["RECEIVER_PORT"]),
        )
        started.append(proc)
        if ready is not None:
            return proc.start(ready)
        proc.migrate()
        with proc.log.open("ab") as out:
            proc.proc = subprocess.Popen(
                [sys.executable, "-m", "receiver", *proc.args],
                env=proc.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def asgi_server() -> Iterator[Any]:
    """A factory: `asgi_server(app)` serves an ASGI app on a free loopback port (uvicorn in a
    thread) and returns its base URL; all are shut down at teardown."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def serve(app: Any) -> str:
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test ASGI server did not start")
            time.sleep(0.01)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


# --- PostgreSQL for the scale-out tests. ---

PG_HOST, PG_PORT = "127.0.0.1", 5432


def _pg_admin(statement: str) -> None:
    """Run one statement on the server's `test` database (CREATE/DROP DATABASE), on a loop
    of its own in another thread, so it works from any test, sync or async."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test", timeout=10)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, run()).result()


@pytest.fixture
def postgres_database(require_service: Any) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database of this test's own (run `receiver
    migrate` on it), dropped afterwards; skipped (failed when CI=true) without a server."""
    import secrets

    require_service(PG_HOST, PG_PORT, "PostgreSQL")
    name = f"receiver_accept_{secrets.token_hex(6)}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    yield f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"
    _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def submit(service: Process, n: int = 1) -> list[dict[str, Any]]:
    """n invoice jobs submitted through the admin API (each must be accepted)."""
    jobs = []
    for i in range(n):
        r = httpx.post(
            f"{service.url}/v1/jobs",
            json={"url": f"https://example.com/doc-{i}.pdf", "domain": "document.invoice"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        jobs.append(r.json())
    return jobs


def terminal_callback(service: Process, api: FakeVlmRun) -> int:
    """A job submitted and its signed `completed` callback sent: the callback's status code."""
    (job,) = submit(service)
    pred = str(job["prediction_id"])
    body = orjson.dumps({"id": pred, "status": "completed"})
    url = api.callback_urls[pred]
    return httpx.post(url, content=body, headers=signed(body), timeout=10).status_code
