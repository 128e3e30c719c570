"""The bundled VLM Run API simulator (`receiver simulate`).

It stands in for `https://api.vlm.run/v1` in tests, demos and benchmarks, and answers as the
official SDK (`vlmrun`) expects: every body validates as the SDK's own types (tests hold it to
them). Files: direct uploads up to 32 MiB, the presigned flow for larger ones, lookup by MD5.
`/<kind>/generate` with `batch=false` answers the finished prediction; with `batch=true` it answers
`pending`, moves the job pending -> running -> completed|failed in a background task, and POSTs
the prediction to `callback_url` as the real API does: signed (`X-VLMRun-Signature`, or the
`X-VLM-Signature` some SDK versions name), 2 attempts in all, a timeout per request, a backoff
sleep before the retry. It can fail, duplicate or drop callbacks on purpose, and a
`simulate.error-<code>` domain forces that error at submission. State lives in memory on
`app.state`; nothing is persisted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import importlib.resources
import mimetypes
import random
import re
import secrets
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

from receiver.models import DOMAIN_PATTERN

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
_DOMAIN = re.compile(DOMAIN_PATTERN)
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
DIRECT_UPLOAD_MAX = 32 * 1024 * 1024  # the SDK switches to the presigned flow above this
MULTIPART_SLACK = 64 * 1024  # room for the multipart framing around a file at the limit
PURPOSES = (  # the SDK's FileResponse.purpose
    "fine-tune",
    "assistants",
    "assistants_output",
    "batch",
    "batch_output",
    "vision",
    "datasets",
)
# Completed responses: three per domain, each a valid instance of the domain's vlmrun-hub
# schema (held to it by tests/unit/test_samples.py), so the simulator needs no hub at run time;
# "generic" stands in for domains the hub lacks.
SAMPLES: dict[str, list[Json]] = orjson.loads(
    (importlib.resources.files("receiver") / "samples.json").read_bytes()
)
_NO_USAGE: Json = {  # the SDK's CreditUsage, as the API sends it before there is any
    "elements_processed": None,
    "element_type": None,
    "credits_used": None,
    "steps": None,
    "message": None,
    "duration_seconds": 0,
}


@dataclass(frozen=True)
class SimulatorOptions:
    """How the simulator behaves; the rates are fractions of jobs (0.0 .. 1.0)."""

    api_key: str | None = None  # None: any non-empty bearer is accepted
    webhook_secret: str | None = None  # set: callbacks carry a signature header
    signature_header: str = "X-VLMRun-Signature"  # or "X-VLM-Signature", as some SDKs name it
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


def _too_large() -> Response:
    msg = f"File over {DIRECT_UPLOAD_MAX} bytes: upload it through /v1/files/presigned-url."
    return _error(413, msg, "invalid_request_error")


def _issue(loc: tuple[str, ...], msg: str, type_: str, value: Any = None) -> Json:
    return {"type": type_, "loc": list(loc), "msg": msg, "input": value}


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _domain(value: Any) -> bool:
    return _text(value) and bool(_DOMAIN.match(value))


def _image(value: Any) -> bool:
    """An `images` entry: a base64 data URL of an image, or an http(s) URL."""
    if not isinstance(value, str):
        return False
    if not value.startswith("data:"):
        return _http_url(value)
    head, _, data = value.partition(",")
    if not (head.startswith("data:image/") and head.endswith(";base64") and data):
        return False
    try:
        base64.b64decode(data, validate=True)
    except binascii.Error:
        return False
    return True


def _images(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(map(_image, value))


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
    "images": (
        _images,
        "Input should be a non-empty list of base64 image data URLs or http(s) URLs",
        "list_type",
    ),
    "callback_url": (_http_url, "Input should be an http(s) URL", "url_parsing"),
    "batch": (lambda v: isinstance(v, bool), "Input should be a valid boolean", "bool_type"),
    "config": (lambda v: isinstance(v, dict), "Input should be a valid dictionary", "dict_type"),
    "metadata": (lambda v: isinstance(v, dict), "Input should be a valid dictionary", "dict_type"),
}
# What each endpoint takes as its input: `/image/generate` has only `images` (the SDK sends an
# uploaded image's file_id through `/document/generate` instead).
_SOURCES = {"image": ("images",), "document": ("file_id", "url")}


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
    sources = _SOURCES.get(kind, _SOURCES["document"])
    for name in {"file_id", "url", "images"} - set(sources):
        if body.get(name) is not None:
            msg = f"Extra inputs are not permitted on /{kind}/generate (send {sources[0]})"
            issues.append(_issue(("body", name), msg, "extra_forbidden", body[name]))
    given = [name for name in sources if body.get(name)]
    if len(given) != 1:
        msg = f"Provide exactly one of {', '.join(sources)}"
        issues.append(_issue(("body",), msg, "missing" if not given else "value_error"))
    return issues


def _usage(kind: str) -> Json:
    """What a finished job cost, in the SDK's CreditUsage shape."""
    elements = 2 if kind == "document" else 1
    credits = elements * (1 if kind in ("document", "image") else 5)
    return _NO_USAGE | {
        "elements_processed": elements,
        "element_type": ELEMENT_TYPES[kind],
        "credits_used": credits,
        "steps": 1,
        "duration_seconds": 2 * elements,
    }


def _page(request: Request) -> tuple[int, int] | list[Json]:
    """`skip` and `limit` from the query (limit 1..1000), or the validation issues."""
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
    return issues or (values["skip"], values["limit"])


def _newest_first(records: dict[str, Json], request: Request) -> Response:
    page = _page(request)
    if isinstance(page, list):
        return _json({"detail": page}, 422)
    skip, limit = page
    return _json(list(reversed(records.values()))[skip:][:limit])


class _Simulator:
    """The simulator's state and endpoints (one per app)."""

    def __init__(self, options: SimulatorOptions, client: httpx.AsyncClient | None) -> None:
        self.options = options
        self.client = client
        self.owns_client = False
        self.rng = random.Random(options.seed)
        self.files: dict[str, Json] = {}
        self.by_md5: dict[str, str] = {}  # content MD5 -> file id
        self.presigned: dict[str, Json] = {}  # file id -> its presigned upload, until verified
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

    def add_file(self, file_id: str, filename: str, size: int, purpose: str, md5: str) -> Json:
        self.files[file_id] = {
            "id": file_id,
            "filename": filename,
            "bytes": size,
            "purpose": purpose,
            "created_at": _now(),
            "object": "file",
            "public_url": None,
        }
        self.by_md5[md5] = file_id
        log.info("simulator.file.uploaded", file_id=file_id, bytes=size)
        return self.files[file_id]

    async def upload(self, request: Request) -> Response:
        """`POST /files?purpose=`: a direct multipart upload, up to DIRECT_UPLOAD_MAX bytes.

        The SDK never sends a larger one (it takes the presigned flow); a proxy in front of the
        real API refuses it, so this answers 413 too."""
        purpose = request.query_params.get("purpose", "assistants")
        if purpose not in PURPOSES:
            issue = _issue(("query", "purpose"), f"Input should be one of {PURPOSES}", "enum")
            return _json({"detail": [issue]}, 422)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > DIRECT_UPLOAD_MAX + MULTIPART_SLACK:
            return _too_large()
        async with request.form(max_files=1) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                issue = _issue(("body", "file"), "Field required", "missing")
                return _json({"detail": [issue]}, 422)
            if (upload.size or 0) > DIRECT_UPLOAD_MAX:
                return _too_large()
            md5 = hashlib.md5(usedforsecurity=False)
            while chunk := await upload.read(1 << 20):
                md5.update(chunk)
            name, size = upload.filename or "upload", upload.size or 0
        record = self.add_file(str(uuid.uuid4()), name, size, purpose, md5.hexdigest())
        return _json(record, 201)

    async def list_files(self, request: Request) -> Response:
        return _newest_first(self.files, request)

    async def get_file(self, request: Request) -> Response:
        file_id = request.path_params["id"]
        if file_id not in self.files:
            return _error(404, f"File {file_id} not found.", "not_found_error")
        return _json(self.files[file_id])

    async def file_by_hash(self, request: Request) -> Response:
        """`GET /files/hash/{md5}`: the SDK's "already uploaded?" check."""
        file_id = self.by_md5.get(request.path_params["md5"].lower())
        if file_id is None:
            return _error(404, "No file with this hash.", "not_found_error")
        return _json(self.files[file_id])

    async def presigned_url(self, request: Request) -> Response:
        """`POST /files/presigned-url`: where to PUT a large file (here: this app's /uploads)."""
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict) or not _text(body.get("filename")):
            issue = _issue(("body", "filename"), "Field required", "missing", body)
            return _json({"detail": [issue]}, 422)
        purpose = body.get("purpose") or "assistants"
        if purpose not in PURPOSES:
            issue = _issue(("body", "purpose"), f"Input should be one of {PURPOSES}", "enum")
            return _json({"detail": [issue]}, 422)
        file_id, secret = str(uuid.uuid4()), secrets.token_urlsafe(16)
        filename: str = body["filename"]
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        url = str(request.url_for("presigned_put", id=file_id).include_query_params(sig=secret))
        answer = {
            "id": file_id,
            "url": url,
            "filename": filename,
            "content_type": content_type,
            "upload_method": "PUT",
            "public_url": None,
            "created_at": _now(),
            "expiration": body.get("expiration") or 86400,
            "method": "PUT",
        }
        self.presigned[file_id] = answer | {"purpose": purpose, "sig": secret}
        return _json(answer)

    async def presigned_put(self, request: Request) -> Response:
        """`PUT <presigned url>`: storage, not the API; no bearer, the URL is the credential,
        and as on S3 the Content-Type must be the one it was signed for."""
        slot = self.presigned.get(request.path_params["id"])
        sig = request.query_params.get("sig", "")
        if slot is None or not hmac.compare_digest(sig.encode(), slot["sig"].encode()):
            return Response("SignatureDoesNotMatch", 403, media_type="text/plain")
        if request.headers.get("content-type") != slot["content_type"]:
            return Response("SignatureDoesNotMatch: Content-Type", 403, media_type="text/plain")
        md5, size = hashlib.md5(usedforsecurity=False), 0
        async for chunk in request.stream():
            md5.update(chunk)
            size += len(chunk)
        slot |= {"bytes": size, "md5": md5.hexdigest()}
        return Response(status_code=200)

    async def verify_upload(self, request: Request) -> Response:
        """`GET /files/verify-upload/{id}`: the presigned upload becomes a file."""
        file_id = request.path_params["id"]
        slot = self.presigned.get(file_id)
        if file_id in self.files:
            return _json(self.files[file_id])
        if slot is None or "md5" not in slot:
            return _error(404, f"No upload found for file {file_id}.", "not_found_error")
        name, size, purpose, md5 = (slot[k] for k in ("filename", "bytes", "purpose", "md5"))
        return _json(self.add_file(file_id, name, size, purpose, md5))

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
        pred |= {"completed_at": None, "status": "pending", "response": None}
        pred |= {"usage": dict(_NO_USAGE), "domain": body["domain"]}
        callback_url = body.get("callback_url") if batch else None
        job = _Job(pred, kind, callback_url, failed, dropped, duplicate)
        self.predictions[pred["id"]] = pred
        self.stats["jobs_created"] += 1
        log.info("simulator.job.created", prediction_id=pred["id"], domain=pred["domain"])
        if not batch:  # synchronous mode: the answer is the finished prediction
            await asyncio.sleep(o.delay)
            self.finish(job)
        else:
            self.spawn(self.run(job))
        return _json(pred, 201)

    async def get_prediction(self, request: Request) -> Response:
        pred_id = request.path_params["id"]
        if pred_id not in self.predictions:
            return _error(404, f"Prediction {pred_id} not found.", "not_found_error")
        return _json(self.predictions[pred_id])

    async def list_predictions(self, request: Request) -> Response:
        return _newest_first(self.predictions, request)

    async def health(self, request: Request) -> Response:
        return _json({"status": "ok"})

    def response_for(self, domain: str, kind: str) -> Any:
        """One of the domain's samples; audio and video fall back to a transcript, and a domain
        the hub lacks to a generic result."""
        samples = SAMPLES.get(domain)
        if samples is None:
            samples = SAMPLES[f"{kind}.transcription" if kind in ("audio", "video") else "generic"]
        return self.rng.choice(samples)

    def finish(self, job: _Job) -> None:
        """Complete or fail the job's prediction, as it will be read and called back."""
        pred = job.prediction
        pred["completed_at"] = _now()
        if job.failed:
            pred["status"] = "failed"
            pred["error"] = "Simulated failure: the model could not process the input."
        else:
            pred["response"] = self.response_for(pred["domain"], job.kind)
            pred.update(status="completed", usage=_usage(job.kind))
        log.info("simulator.job.finished", prediction_id=pred["id"], status=pred["status"])

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
            self.finish(job)
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
            headers[self.options.signature_header.lower()] = f"sha256={digest}"
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
        Route("/v1/files", sim.guard(sim.list_files), methods=["GET"]),
        Route("/v1/files/hash/{md5}", sim.guard(sim.file_by_hash), methods=["GET"]),
        Route("/v1/files/presigned-url", sim.guard(sim.presigned_url), methods=["POST"]),
        Route("/v1/files/verify-upload/{id}", sim.guard(sim.verify_upload), methods=["GET"]),
        Route("/v1/files/{id}", sim.guard(sim.get_file), methods=["GET"]),
        Route("/uploads/{id}", sim.presigned_put, methods=["PUT"], name="presigned_put"),
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
