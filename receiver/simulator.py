"""The bundled VLM Run API simulator (`receiver simulate`).

It stands in for `https://api.vlm.run/v1` in tests, demos and benchmarks. It accepts uploads and
`/<kind>/generate` jobs, moves each job pending -> running -> completed|failed in a background
task, and POSTs the prediction to `callback_url` as the real API does: signed with
`X-VLMRun-Signature`, 2 attempts in all, a timeout per request, a backoff sleep before the retry.
It can fail, duplicate or drop callbacks on purpose, and a `simulate.error-<code>` domain forces
that error at submission. State lives in memory on `app.state`; nothing is persisted.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import structlog
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

log = structlog.get_logger(__name__)

Json = dict[str, Any]
Handler = Callable[[Request], Awaitable[Response]]

CALLBACK_ATTEMPTS = 2  # the real API: "maximum 2 attempts"
STATS = (  # the counters in app.state.stats
    "jobs_created",
    "callback_attempts",
    "callbacks_sent",
    "callbacks_failed",
    "callbacks_dropped",
    "callbacks_duplicated",
)
ELEMENT_TYPES = {"document": "page", "image": "image", "audio": "audio", "video": "video"}
_DOMAIN = re.compile(r"^[\w-]+\.[\w.-]+$")
_MAGIC = re.compile(r"^simulate\.error-([45]\d\d)$")
_ERRORS = {  # status -> (error type, message), as the real API words them
    400: ("invalid_request_error", "Bad request: the input could not be processed."),
    401: ("authentication_error", "Invalid API key."),
    402: ("insufficient_credits_error", "Payment required: your account is out of credits."),
    403: ("permission_error", "Your plan does not allow this request."),
    404: ("not_found_error", "Resource not found."),
    429: ("rate_limit_error", "Rate limit exceeded: 10 requests per minute on your plan."),
    500: ("server_error", "Internal server error."),
    504: ("timeout_error", "Gateway timeout: the request took too long."),
}
_SEGMENTS = [
    {"start_time": 0.0, "end_time": 4.2, "content": "Welcome to the quarterly review."},
    {"start_time": 4.2, "end_time": 9.8, "content": "Let us start with the numbers."},
]
_SAMPLES: dict[str, Json] = {  # a plausible `response` per domain name (after the dot)
    "invoice": {
        "invoice_id": "INV-2024-0042",
        "invoice_issue_date": "2024-05-02",
        "issuer_name": "Acme Consulting GmbH",
        "customer_name": "Globex Corp.",
        "items": [
            {"description": "Consulting", "quantity": 10, "unit_price": 120, "total_price": 1200},
            {"description": "Travel", "quantity": 1, "unit_price": 85.5, "total_price": 85.5},
        ],
        "subtotal": 1285.5,
        "tax": 244.25,
        "total_amount": 1529.75,
        "currency": "EUR",
    },
    "receipt": {
        "merchant": "Corner Cafe",
        "date": "2024-05-02",
        "items": [{"name": "Cappuccino", "quantity": 2, "price": 7.0}],
        "total": 7.0,
        "currency": "USD",
    },
    "markdown": {"markdown": "# Quarterly report\n\n## Summary\n\nRevenue grew 12%.\n"},
    "resume": {
        "contact_info": {"full_name": "Jane Doe", "email": "jane.doe@example.com"},
        "skills": ["Python", "PostgreSQL"],
        "work_experience": [{"company": "Initech", "title": "Senior Engineer"}],
        "education": [{"institution": "TU Berlin", "degree": "MSc Computer Science"}],
    },
    "transcription": {"metadata": {"duration": 9.8, "language": "en"}, "segments": _SEGMENTS},
}


@dataclass(frozen=True)
class SimulatorOptions:
    """How the simulator behaves; the rates are fractions of jobs (0.0 .. 1.0)."""

    api_key: str | None = None  # None: any non-empty bearer is accepted
    webhook_secret: str | None = None  # set: callbacks carry X-VLMRun-Signature
    fail_rate: float = 0.0
    duplicate_rate: float = 0.0  # every callback of such a job is POSTed twice, same bytes
    drop_rate: float = 0.0  # the job completes but never calls back
    intermediate: bool = False  # also POST a `running` callback
    delay: float = 0.2  # seconds pending->running, and again running->terminal
    seed: int | None = None
    callback_timeout: float = 30.0  # per request
    callback_backoff: tuple[float, ...] = (1.0, 2.0)  # sleep before retry n: backoff[n-1]


@dataclass
class _Job:
    prediction: Json
    kind: str
    callback_url: str | None  # None: no callback (no URL, or batch=false)
    failed: bool
    dropped: bool
    duplicate: bool


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


def _error(status: int, msg: str, type_: str, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": msg, "type": type_, "id": f"req_{uuid.uuid4().hex[:24]}"}}
    return _json(body, status, headers)


def _issue(loc: tuple[str, ...], msg: str, type_: str, value: Any = None) -> Json:
    return {"type": type_, "loc": list(loc), "msg": msg, "input": value}


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _domain(value: Any) -> bool:
    return _text(value) and bool(_DOMAIN.match(value))


def _texts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(map(_text, value))


def _http_url(value: Any) -> bool:
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError):
        return False
    return url.scheme in ("http", "https") and bool(url.host)


_FIELDS: dict[str, tuple[Callable[[Any], bool], str, str]] = {  # field -> check, msg, type
    "domain": (_domain, "Input should be a domain like 'document.invoice'", "value_error"),
    "file_id": (_text, "Input should be a non-empty string", "string_type"),
    "url": (_text, "Input should be a non-empty string", "string_type"),
    "model": (_text, "Input should be a non-empty string", "string_type"),
    "images": (_texts, "Input should be a non-empty list of strings", "list_type"),
    "callback_url": (_http_url, "Input should be an http(s) URL", "url_parsing"),
    "batch": (lambda v: isinstance(v, bool), "Input should be a valid boolean", "bool_type"),
    "config": (lambda v: isinstance(v, dict), "Input should be a valid dictionary", "dict_type"),
    "metadata": (lambda v: isinstance(v, dict), "Input should be a valid dictionary", "dict_type"),
}


def _validate(kind: str, body: Any) -> list[Json]:
    """FastAPI-style validation issues for a `/<kind>/generate` body (empty when valid)."""
    if not isinstance(body, dict):
        return [_issue(("body",), "Input should be a valid dictionary", "dict_type", body)]
    issues = [
        _issue(("body", name), msg, type_, body[name])
        for name, (check, msg, type_) in _FIELDS.items()
        if body.get(name) is not None and not check(body[name])
    ]
    if body.get("domain") is None:
        issues.append(_issue(("body", "domain"), "Field required", "missing", body))
    sources = ("file_id", "url", "images") if kind == "image" else ("file_id", "url")
    if not any(body.get(name) for name in sources):
        issues.append(_issue(("body",), f"Provide one of {', '.join(sources)}", "value_error"))
    return issues


def _fake_response(domain: str, kind: str) -> Any:
    name = domain.split(".", 1)[1]
    if name in _SAMPLES:
        return _SAMPLES[name]
    if kind in ("audio", "video"):
        return _SAMPLES["transcription"]
    return {"domain": domain, "content": f"Simulated {kind} result.", "confidence": 0.93}


class _Simulator:
    """The simulator's state and endpoints (one per app)."""

    def __init__(self, options: SimulatorOptions, client: httpx.AsyncClient | None) -> None:
        self.options = options
        self.client = client
        self.owns_client = False
        self.rng = random.Random(options.seed)
        self.files: dict[str, Json] = {}
        self.predictions: dict[str, Json] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.stats = dict.fromkeys(STATS, 0)

    def guard(self, handler: Handler) -> Handler:
        """Wrap an endpoint with the bearer-key check."""

        async def guarded(request: Request) -> Response:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            key, token = self.options.api_key, token.strip()
            if (scheme.lower(), bool(token)) == ("bearer", True) and (
                key is None or hmac.compare_digest(token.encode(), key.encode())
            ):
                return await handler(request)
            log.info("simulator.auth.rejected", path=request.url.path)
            headers = {"www-authenticate": "Bearer"}
            return _error(401, "Invalid or missing API key.", "authentication_error", headers)

        return guarded

    async def upload(self, request: Request) -> Response:
        async with request.form() as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                issue = _issue(("body", "file"), "Field required", "missing")
                return _json({"detail": [issue]}, 422)
            file_id, size = str(uuid.uuid4()), upload.size or 0
            name = upload.filename or "upload"
        purpose = request.query_params.get("purpose", "assistants")
        record = {"id": file_id, "filename": name, "bytes": size, "purpose": purpose}
        self.files[file_id] = record | {"created_at": _now(), "object": "file"}
        log.info("simulator.file.uploaded", file_id=file_id, bytes=size)
        return _json(self.files[file_id], 201)

    async def generate(self, request: Request) -> Response:
        kind = request.path_params["kind"]
        if kind not in ELEMENT_TYPES:
            raise HTTPException(404, f"No endpoint /v1/{kind}/generate.")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            issue = _issue(("body",), "JSON decode error", "json_invalid")
            return _json({"detail": [issue]}, 422)
        if issues := _validate(kind, body):
            return _json({"detail": issues}, 422)
        if magic := _MAGIC.match(body["domain"]):
            code = int(magic[1])
            type_, msg = _ERRORS.get(code, ("api_error", f"Simulated error {code}."))
            return _error(code, msg, type_, {"retry-after": "1"} if code == 429 else None)
        if body.get("file_id") is not None and body["file_id"] not in self.files:
            return _error(404, f"File {body['file_id']} not found.", "not_found_error")
        o = self.options
        rates = (o.fail_rate, o.drop_rate, o.duplicate_rate)
        failed, dropped, duplicate = (self.rng.random() < rate for rate in rates)
        batch = body["batch"] if body.get("batch") is not None else kind != "image"
        pred: Json = {"id": f"pred_{uuid.uuid4().hex}", "created_at": _now()}
        pred |= {"completed_at": None, "status": "pending", "response": None, "usage": None}
        pred["domain"] = body["domain"]
        callback_url = body.get("callback_url") if batch else None
        self.predictions[pred["id"]] = pred
        self.stats["jobs_created"] += 1
        self.spawn(self.run(_Job(pred, kind, callback_url, failed, dropped, duplicate)))
        log.info("simulator.job.created", prediction_id=pred["id"], domain=pred["domain"])
        return _json(pred, 201)

    async def get_prediction(self, request: Request) -> Response:
        pred_id = request.path_params["id"]
        if pred_id not in self.predictions:
            return _error(404, f"Prediction {pred_id} not found.", "not_found_error")
        return _json(self.predictions[pred_id])

    async def list_predictions(self, request: Request) -> Response:
        values, issues = {}, []
        for name, default, low, high in (("skip", 0, 0, 2**31), ("limit", 10, 1, 1000)):
            raw = request.query_params.get(name, str(default))
            try:
                values[name] = int(raw)
            except ValueError:
                issues.append(_issue(("query", name), "Should be an integer", "int_parsing", raw))
                continue
            if not low <= values[name] <= high:
                msg = f"Input should be between {low} and {high}"
                issues.append(_issue(("query", name), msg, "value_error", raw))
        if issues:
            return _json({"detail": issues}, 422)
        newest_first = list(reversed(self.predictions.values()))
        return _json(newest_first[values["skip"] :][: values["limit"]])

    async def health(self, request: Request) -> Response:
        return _json({"status": "ok"})

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self, job: _Job) -> None:
        """Move one job pending -> running -> completed|failed, calling back on the way."""
        pred, o = job.prediction, self.options
        try:
            await asyncio.sleep(o.delay)
            pred["status"] = "running"
            if o.intermediate:
                await self.callback(job, terminal=False)
            await asyncio.sleep(o.delay)
            pred["completed_at"] = _now()
            if job.failed:
                pred["status"] = "failed"
                pred["error"] = "Simulated failure: the model could not process the input."
            else:
                pages = 2 if job.kind == "document" else 1
                usage = {"elements_processed": pages, "element_type": ELEMENT_TYPES[job.kind]}
                usage["credits_used"] = pages * (1 if job.kind in ("document", "image") else 5)
                pred["response"] = _fake_response(pred["domain"], job.kind)
                pred.update(status="completed", usage=usage)
            log.info("simulator.job.finished", prediction_id=pred["id"], status=pred["status"])
            await self.callback(job, terminal=True)
        except Exception:
            log.exception("simulator.job.crashed", prediction_id=pred["id"])

    async def callback(self, job: _Job, *, terminal: bool) -> None:
        """POST the prediction as it stands now (twice when the job duplicates)."""
        if job.callback_url is None:
            return
        pred_id, host = job.prediction["id"], httpx.URL(job.callback_url).host
        if job.dropped:
            if terminal:
                self.stats["callbacks_dropped"] += 1
                log.info("simulator.callback.dropped", prediction_id=pred_id, host=host)
            return
        body = orjson.dumps(job.prediction)
        headers = {"content-type": "application/json", "user-agent": "receiver-simulator"}
        if (secret := self.options.webhook_secret) is not None:
            digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            headers["x-vlmrun-signature"] = f"sha256={digest}"
        for _ in range(2 if job.duplicate else 1):
            await self.deliver(job.callback_url, body, headers, prediction_id=pred_id, host=host)
        if job.duplicate:
            self.stats["callbacks_duplicated"] += 1

    async def deliver(self, url: str, body: bytes, headers: dict[str, str], **log_ids: str) -> None:
        """One delivery: up to CALLBACK_ATTEMPTS requests; a 2xx ends it."""
        timeout, backoff = self.options.callback_timeout, self.options.callback_backoff
        if self.client is None:
            self.client, self.owns_client = httpx.AsyncClient(timeout=timeout), True
        for attempt in range(1, CALLBACK_ATTEMPTS + 1):
            if attempt > 1 and backoff:
                await asyncio.sleep(backoff[min(attempt - 2, len(backoff) - 1)])
            self.stats["callback_attempts"] += 1
            try:
                post = self.client.post(url, content=body, headers=headers, timeout=timeout)
                answer = await asyncio.wait_for(post, timeout)  # bounds ASGI transports too
            except (httpx.HTTPError, TimeoutError) as exc:
                outcome = type(exc).__name__  # not str(exc): it may quote the URL's token
            else:
                if answer.is_success:
                    self.stats["callbacks_sent"] += 1
                    log.info("simulator.callback.sent", **log_ids, attempt=attempt)
                    return
                outcome = f"HTTP {answer.status_code}"
            log.warning(
                "simulator.callback.attempt_failed", **log_ids, attempt=attempt, outcome=outcome
            )
        self.stats["callbacks_failed"] += 1
        log.warning("simulator.callback.failed", **log_ids, attempts=CALLBACK_ATTEMPTS)

    async def aclose(self) -> None:
        """Cancel the jobs still running and close the callback client if it is ours."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.owns_client and self.client is not None:
            await self.client.aclose()


def create_simulator_app(
    options: SimulatorOptions = SimulatorOptions(), *, client: httpx.AsyncClient | None = None
) -> Starlette:
    """The simulator as an ASGI app; its base URL is `http://host:port/v1`.

    `client` carries the callbacks; without one the app makes its own and closes it on
    shutdown. `app.state` exposes `stats`, `tasks`, `predictions` and `files` for tests.
    """
    sim = _Simulator(options, client)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await sim.aclose()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, exc.detail, type_)

    routes = [
        Route("/v1/files", sim.guard(sim.upload), methods=["POST"]),
        Route("/v1/{kind}/generate", sim.guard(sim.generate), methods=["POST"]),
        Route("/v1/predictions", sim.guard(sim.list_predictions), methods=["GET"]),
        Route("/v1/predictions/{id}", sim.guard(sim.get_prediction), methods=["GET"]),
        Route("/v1/health", sim.guard(sim.health), methods=["GET"]),
    ]
    handlers = {HTTPException: http_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.simulator = sim
    app.state.stats, app.state.tasks = sim.stats, sim.tasks
    app.state.predictions, app.state.files = sim.predictions, sim.files
    return app
