"""The `receiver` command: serve, worker, submit, jobs, replay, migrate, prune, simulate."""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import httpx
import orjson
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Column, Table

from receiver.config import Settings, load_settings
from receiver.errors import ConfigError, ReceiverError
from receiver.logs import configure_logging

if TYPE_CHECKING:
    from starlette.applications import Starlette

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
out = Console()
err = Console(stderr=True)
TERMINAL = {"completed", "failed", "submit_failed", "timed_out"}

ServiceUrl = Annotated[
    str, typer.Option("--url", envvar="RECEIVER_URL", help="The running service's base URL.")
]
AdminToken = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="RECEIVER_ADMIN_TOKEN", help="Admin bearer token.", show_default=False
    ),
]


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def settings_or_exit(**overrides: Any) -> Settings:
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        fail(str(exc))


def running_settings(**overrides: Any) -> Settings:
    """Settings for `serve` and `worker`, which need a database `receiver migrate` made."""
    from receiver.store.sqlite import database_missing

    settings = settings_or_exit(**overrides)
    if reason := database_missing(settings.database_url):
        fail(reason)
    return settings


def _exit_cleanly(signum: int, frame: object) -> None:
    sys.exit(0)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [RECEIVER_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [RECEIVER_PORT].")] = None,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="Web only: no dispatcher.")
    ] = False,
) -> None:
    """Run the web service (and, unless --no-worker, the dispatcher and reconciler)."""
    from receiver.app import create_app

    overrides: dict[str, Any] = {"worker": False} if no_worker else {}
    overrides |= {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = running_settings(**overrides)
    configure_logging(settings.log_format, settings.log_level)
    try:
        application = create_app(settings)
    except ReceiverError as exc:
        fail(str(exc))
    _run_http(application, settings, settings.port)


def _run_http(application: Starlette, settings: Settings, port: int) -> None:
    """Serve `application` with uvicorn behind the connection guard (head timeout and size,
    header count, connection limit: receiver.connections), on `settings.host` and `port`."""
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from receiver.connections import Guard, Limits, default_max_connections, guarded

    # uvicorn re-raises SIGTERM after its graceful shutdown, which would kill the process with
    # the signal (exit -15) before atexit runs. A drained shutdown is a clean exit: 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    # Past a file-size limit (ulimit -f) a write fails like on a full disk (503, /readyz
    # failing until it works again) instead of the signal killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = Limits(
        head_timeout=settings.head_timeout,
        max_head_bytes=settings.max_head_bytes,
        max_headers=settings.max_headers,
        max_connections=settings.max_connections or default_max_connections(),
    )
    guard = Guard(limits, application.state.services.metrics.http_limits)
    uvicorn.run(
        application,
        host=settings.host,
        port=port,
        http=guarded(HttpToolsProtocol, guard),  # type: ignore[arg-type]
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout)),
        # No root_path here: the app applies RECEIVER_ROOT_PATH itself (stripped or not).
        access_log=False,  # ours redacts callback tokens (receiver.app.RequestContext)
        proxy_headers=False,  # handled by the app, for the configured trusted proxies only
        log_config=None,
        timeout_graceful_shutdown=int(settings.lease_seconds // 2) or 1,
        server_header=False,
    )


@app.command()
def worker(
    port: Annotated[
        int | None,
        typer.Option(help="Serve /healthz, /readyz and /metrics on this port (default: none)."),
    ] = None,
) -> None:
    """Run only the dispatcher and reconciler (scale-out, next to `serve --no-worker`)."""
    from receiver.app import create_app

    settings = running_settings(worker=True)
    configure_logging(settings.log_format, settings.log_level)
    try:
        application = create_app(settings, ops_only=True)
    except ReceiverError as exc:
        fail(str(exc))
    if port is not None:
        _run_http(application, settings, port)
        return

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with application.router.lifespan_context(application):
            await stop.wait()

    # The loop `serve` gets from uvicorn: uvloop where installed (uvicorn[standard] brings it
    # on Linux and macOS). Measured, it cut the dispatcher's CPU per delivery by a tenth.
    # (`asyncio.Runner` rather than `uvloop.run`, which older uvloop releases lack.)
    new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    with contextlib.suppress(ImportError):
        import uvloop

        new_loop = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main())


@app.command()
def migrate(
    existing: Annotated[
        bool,
        typer.Option("--existing", help="Only upgrade a database that is there, never create one."),
    ] = False,
) -> None:
    """Create or upgrade the store's schema (SQLite or PostgreSQL)."""
    from receiver.store import open_store

    settings = running_settings() if existing else settings_or_exit()

    async def main() -> int:
        store = open_store(settings.database_url)
        try:
            return await store.migrate()
        finally:
            await store.close()

    try:
        version = asyncio.run(main())
    except ReceiverError as exc:
        fail(str(exc))
    out.print(f"schema at version {version}")


@app.command()
def prune() -> None:
    """Delete attempts, delivered rows and payloads older than RECEIVER_RETENTION_DAYS."""
    from receiver.store import open_store

    settings = settings_or_exit()

    async def main() -> int:
        store = open_store(settings.database_url)
        try:
            await store.migrate()
            return await store.prune(time.time() - settings.retention_days * 86400)
        finally:
            await store.close()

    try:
        count = asyncio.run(main())
    except ReceiverError as exc:
        fail(str(exc))
    out.print(f"pruned {count} rows")


@app.command()
def simulate(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8001,
    api_key: Annotated[
        str | None, typer.Option(envvar="SIMULATOR_API_KEY", help="Required bearer (default: any).")
    ] = None,
    webhook_secret: Annotated[
        str | None, typer.Option(envvar="SIMULATOR_WEBHOOK_SECRET", help="Signs callbacks.")
    ] = None,
    fail_rate: Annotated[float, typer.Option(help="Fraction of jobs that fail.")] = 0.0,
    duplicate_rate: Annotated[float, typer.Option(help="Fraction of callbacks sent twice.")] = 0.0,
    drop_rate: Annotated[float, typer.Option(help="Fraction of callbacks never sent.")] = 0.0,
    intermediate: Annotated[bool, typer.Option(help="Also call back with `running`.")] = False,
    signature_header: Annotated[
        str, typer.Option(help="Header that carries the callback signature.")
    ] = "X-VLMRun-Signature",
    delay: Annotated[float, typer.Option(help="Seconds per job step.")] = 0.2,
) -> None:
    """Serve a stand-in for the VLM Run API (files, generate, predictions, callbacks)."""
    import uvicorn

    from receiver.simulator import SimulatorOptions, create_simulator_app

    configure_logging()
    options = SimulatorOptions(
        api_key=api_key,
        webhook_secret=webhook_secret,
        fail_rate=fail_rate,
        duplicate_rate=duplicate_rate,
        drop_rate=drop_rate,
        intermediate=intermediate,
        signature_header=signature_header,
        delay=delay,
    )
    signal.signal(signal.SIGTERM, _exit_cleanly)  # as in `serve`: exit 0, logs flushed
    uvicorn.run(
        create_simulator_app(options), host=host, port=port, log_config=None, access_log=False
    )


def _client(url: str, token: str | None) -> httpx.Client:
    if not token:
        fail("no admin token: set RECEIVER_ADMIN_TOKEN or pass --token")
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.ConnectError:
        fail(
            f"cannot reach the service at {client.base_url}: start it with `receiver serve` "
            "or pass --url"
        )
    except httpx.HTTPError as exc:
        fail(f"request to {client.base_url} failed: {type(exc).__name__}")
    if response.status_code == 401:
        fail("the service refused the admin token (RECEIVER_ADMIN_TOKEN / --token)")
    if not response.is_success:
        try:
            reason = response.json().get("error", response.text)
        except ValueError:
            reason = response.text[:200]
        raise _Refused(response.status_code, str(reason))
    return response.json()


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _submit_one(client: httpx.Client, item: str, form: dict[str, str]) -> dict[str, Any]:
    if item.startswith(("http://", "https://")):
        result: dict[str, Any] = _call(client, "POST", "/v1/jobs", json={**form, "url": item})
        return result
    path = Path(item)
    if not path.is_file():
        raise _Refused(0, f"{item}: no such file (give a path or an http(s) URL)")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    with path.open("rb") as fh:
        result = _call(client, "POST", "/v1/jobs", data=form, files={"file": (path.name, fh, mime)})
    return result


@app.command()
def submit(
    items: Annotated[list[str], typer.Argument(help="Files or URLs to submit.")],
    domain: Annotated[str, typer.Option(help="VLM Run domain, e.g. document.invoice.")],
    kind: Annotated[str, typer.Option(help="document, image, audio or video.")] = "document",
    wait: Annotated[bool, typer.Option("--wait", help="Wait until all jobs finish.")] = False,
    timeout: Annotated[float, typer.Option(help="Longest --wait, in seconds.")] = 900.0,
    url: ServiceUrl = "http://127.0.0.1:8000",
    token: AdminToken = None,
) -> None:
    """Submit documents through the running service; --wait prints a summary when all finish."""
    form = {"domain": domain, "kind": kind}
    jobs: dict[str, dict[str, Any]] = {}
    refused: list[tuple[str, str]] = []
    with _client(url, token) as client, Progress(console=err, transient=True) as progress:
        task = progress.add_task("submitting", total=len(items))
        for item in items:
            try:
                job = _submit_one(client, item, form)
                jobs[job["id"]] = {**job, "item": item}
            except _Refused as exc:
                refused.append((item, exc.reason))
            progress.advance(task)
        if wait and jobs:
            task = progress.add_task("waiting", total=len(jobs))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                open_ids = [i for i, j in jobs.items() if j["status"] not in TERMINAL]
                for job_id in open_ids:
                    jobs[job_id].update(_call(client, "GET", f"/v1/jobs/{job_id}"))
                progress.update(task, completed=sum(j["status"] in TERMINAL for j in jobs.values()))
                if all(j["status"] in TERMINAL for j in jobs.values()):
                    break
                time.sleep(0.5)
    table = Table(
        "item", *_ids("job"), "status", *_ids("prediction"), title=f"{len(jobs)} submitted"
    )
    for job in jobs.values():
        table.add_row(job["item"], job["id"], job["status"], job.get("prediction_id") or "-")
    for item, reason in refused:
        table.add_row(item, "-", "[red]refused[/red]", reason)
    _print_table(table)
    unfinished = [j for j in jobs.values() if wait and j["status"] not in TERMINAL]
    failed = [j for j in jobs.values() if j["status"] in ("failed", "submit_failed", "timed_out")]
    if refused or failed or unfinished:
        raise typer.Exit(1)


def _ids(*names: str) -> list[Column]:
    """Table columns for ids: never cut (an id is copied into the next command)."""
    return [Column(name, no_wrap=True, overflow="fold", min_width=12) for name in names]


def _print_table(table: Table) -> None:
    """A table at its natural width: in a narrow terminal its lines wrap rather than have
    its columns (and ids) squeezed."""
    natural = out.measure(table, options=out.options.update_width(10_000)).maximum
    Console(width=max(out.width, natural), file=out.file).print(table)


def _print_json(data: Any) -> None:
    out.print_json(orjson.dumps(data).decode())


@app.command("jobs")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="Only this status.")] = None,
    domain: Annotated[str | None, typer.Option(help="Only this domain.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Created at or after (ISO-8601; UTC if no zone).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Created before (ISO-8601; UTC if no zone).")
    ] = None,
    find: Annotated[
        str | None,
        typer.Option(help="A job id, a prediction id, or a top-level metadata value."),
    ] = None,
    limit: Annotated[int, typer.Option(help="How many.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="The API's JSON, not a table.")] = False,
    url: ServiceUrl = "http://127.0.0.1:8000",
    token: AdminToken = None,
) -> None:
    """List jobs, newest first (`receiver job ID` shows one); the filters are the API's."""
    wanted = {
        "status": status,
        "domain": domain,
        "since": since,
        "until": until,
        "q": find,
        "limit": limit,
    }
    params = {k: v for k, v in wanted.items() if v}
    with _client(url, token) as client:
        try:
            page = _call(client, "GET", "/v1/jobs", params=params)
        except _Refused as exc:
            fail(exc.reason)
    if as_json:
        _print_json(page)
        return
    table = Table(*_ids("job"), "domain", "status", *_ids("prediction"), "created")
    for job in page["items"]:
        table.add_row(
            job["id"], job["domain"], job["status"], job["prediction_id"] or "-", job["created_at"]
        )
    _print_table(table)


@app.command("job")
def show_job(
    job_id: Annotated[str, typer.Argument(help="The job's id (from `receiver jobs`).")],
    as_json: Annotated[bool, typer.Option("--json", help="The API's JSON, not tables.")] = False,
    url: ServiceUrl = "http://127.0.0.1:8000",
    token: AdminToken = None,
) -> None:
    """One job: its status, each event it received, and each event's deliveries to sinks."""
    with _client(url, token) as client:
        try:
            job = _call(client, "GET", f"/v1/jobs/{job_id}")
        except _Refused as exc:
            fail(f"job {job_id}: {exc.reason}")
    if as_json:
        _print_json(job)
        return
    out.print(
        f"[bold]{job['id']}[/bold]  {job['kind']} {job['domain']}  status [bold]{job['status']}"
        f"[/bold]  prediction {job['prediction_id'] or '-'}  created {job['created_at']}"
    )
    if job.get("error"):
        out.print(f"[red]error:[/red] {job['error']}")
    events = Table(*_ids("event"), "status", "source", "verified", "received", title="events")
    deliveries = Table(
        *_ids("delivery", "event"), "sink", "state", "attempts", "last error", title="deliveries"
    )
    for event in job["events"]:
        events.add_row(
            event["id"],
            event["status"],
            event["source"],
            event["verification"],
            event["received_at"],
        )
        for d in event.get("deliveries", []):
            deliveries.add_row(
                str(d["id"]),
                event["id"],
                d["sink"],
                d["state"],
                str(d["attempts"]),
                d["last_error"] or "-",
            )
    _print_table(events)
    if deliveries.row_count:
        _print_table(deliveries)


@app.command()
def replay(
    delivery: Annotated[int | None, typer.Option(help="Retry this delivery id.")] = None,
    event: Annotated[str | None, typer.Option(help="Deliver this event again.")] = None,
    sink: Annotated[str | None, typer.Option(help="Only to this sink.")] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Every dead delivery of --sink.")] = False,
    since: Annotated[str | None, typer.Option(help="With --dead: died since (ISO time).")] = None,
    url: ServiceUrl = "http://127.0.0.1:8000",
    token: AdminToken = None,
) -> None:
    """Put deliveries back in the queue: one, one event's, or everything dead for a sink."""
    with _client(url, token) as client:
        try:
            if delivery is not None:
                result = _call(client, "POST", f"/v1/deliveries/{delivery}/retry")
            elif event is not None:
                result = _call(
                    client,
                    "POST",
                    f"/v1/events/{event}/replay",
                    json={"sink": sink} if sink else {},
                )
            elif dead and sink:
                body = {"sink": sink, **({"since": since} if since else {})}
                result = _call(client, "POST", "/v1/deliveries/replay", json=body)
            else:
                fail("say what to replay: --delivery ID, --event ID [--sink S], or --dead --sink S")
        except _Refused as exc:
            fail(exc.reason)
    out.print(f"requeued {result['requeued']} deliveries")


@app.command("config-doc")
def config_doc() -> None:
    """Print the configuration reference (Markdown), generated from the settings themselves."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = (
            "(unset)"
            if default is None
            else ",".join(default)
            if isinstance(default, list)
            else default
        )
        lines.append(f"| `RECEIVER_{name.upper()}` | `{shown}` | {field.description} |")
    out.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
