"""`/v1/jobs`: submit documents to VLM Run and read jobs back."""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Sequence
from typing import Any, cast

import orjson
import structlog
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message

from receiver import logs
from receiver.errors import VlmRunError
from receiver.models import (
    PAGE_MAX,
    SUBMIT_FAILED,
    SUBMITTING,
    Delivery,
    DeliveryAttempt,
    Event,
    Job,
    hash_token,
    new_callback_token,
    new_id,
)
from receiver.routes import JSON, BadRequest, Services, error, parse, services
from receiver.routes.schemas import JobsQuery, Submission, epoch
from receiver.store import Store
from receiver.vlmrun import GenerationConfig, RequestMetadata, generate_request

log = structlog.get_logger("receiver.jobs")
MULTIPART_SLACK = 64 * 1024  # the form's framing and fields around a file at the limit


def validate_submission(data: dict[str, Any], has_file: bool) -> dict[str, Any]:
    """The submission as the job will keep it (config and metadata as given), or BadRequest
    naming the field to fix."""
    sub = parse(Submission, data, 422)
    if len(sub.sources(has_file)) != 1:
        raise BadRequest("give exactly one of `url`, `file_id` or a `file` upload", 422)
    metadata = sub.metadata.model_dump(mode="json", exclude_unset=True) if sub.metadata else {}
    return {
        "kind": sub.kind,
        "domain": sub.domain,
        "url": sub.url,
        "file_id": sub.file_id,
        "config": sub.config.model_dump(mode="json", exclude_unset=True),
        "metadata": metadata,
    }


def generate_call(
    svc: Services, sub: dict[str, Any], callback_url: str, image: str | None = None
) -> tuple[str, dict[str, Any]]:
    """Which `/<kind>/generate` to call and its body. An image goes to `/image/generate` as
    `images` (uploaded bytes as a data URL in `image`, or its URL); an image already uploaded
    (`file_id`) goes through `/document/generate`, as the SDK's CLI sends it."""
    kind = sub["kind"]
    if kind == "image" and (image or sub["url"]):
        source: dict[str, Any] = {"images": [image or sub["url"]]}
    elif sub["url"]:
        source = {"url": sub["url"]}
    else:
        source = {"file_id": sub["file_id"]}
        kind = "document" if kind == "image" else kind
    metadata = {"allow_training": svc.settings.allow_training, **sub["metadata"]}
    body = generate_request(
        sub["domain"],
        source,
        callback_url,
        GenerationConfig.model_validate(sub["config"]),
        RequestMetadata.model_validate(metadata),
    )
    return kind, body


def _data_url(upload: UploadFile, content: bytes) -> str:
    """An uploaded image as the `data:` URL `/image/generate` takes."""
    name = upload.filename or ""
    media = upload.content_type or ""
    if not media.startswith("image/"):
        media = mimetypes.guess_type(name)[0] or ""
    if not media.startswith("image/"):
        raise BadRequest("`kind` image needs an image file (image/* content type)", 422)
    return f"data:{media};base64,{base64.b64encode(content).decode()}"


def api_error_answer(exc: VlmRunError) -> tuple[int, str]:
    """Our answer for an API failure. Our own 401 means "wrong admin token", so a refused
    API key is a 502 that says which setting to fix."""
    code = exc.status_code
    if code is None:
        return 504, exc.reason
    if code in (402, 429):
        return code, exc.reason
    if code in (400, 404, 413, 422):
        return 422, exc.reason
    return 502, exc.reason


def _limited(request: Request, limit: int) -> Request:
    """`request` with a body that stops at `limit` bytes with a 413, however it is framed: a
    Content-Length is only a claim, and a chunked body has none."""
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise BadRequest(f"upload over {limit - MULTIPART_SLACK} bytes", 413)
        return message

    return Request(request.scope, receive)


async def read_submission(
    request: Request, svc: Services
) -> tuple[dict[str, Any], UploadFile | None]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        limit = svc.settings.max_upload_bytes + MULTIPART_SLACK
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise BadRequest(f"upload over {svc.settings.max_upload_bytes} bytes", 413)
        form = await _limited(request, limit).form(max_files=1)
        upload = form.get("file")
        if isinstance(upload, UploadFile) and (upload.size or 0) > svc.settings.max_upload_bytes:
            raise BadRequest(f"upload over {svc.settings.max_upload_bytes} bytes", 413)
        # An empty form field is an absent one (what an HTML form sends for a blank input).
        fields = {k: v for k, v in form.items() if isinstance(v, str) and v}
        return fields, upload if isinstance(upload, UploadFile) else None
    limit = svc.settings.max_body_bytes
    try:
        data = orjson.loads(await _limited(request, limit + MULTIPART_SLACK).body())
    except orjson.JSONDecodeError:
        raise BadRequest("body must be JSON (nested at most 1,024 levels) or multipart") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object", 422)
    return data, None


class SubmitFailed(Exception):
    """VLM Run refused the upload or the job, or did not answer: our answer's status and
    reason, and the job as recorded (None when the upload failed, before any job)."""

    def __init__(self, status: int, reason: str, job: Job | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.job = status, reason, job


async def submit_job(svc: Services, data: dict[str, Any], upload: UploadFile | None) -> Job:
    """Validate a submission, record its job and send it to VLM Run (the file uploaded first):
    what `POST /v1/jobs` and the dashboard's Submit page both do. BadRequest for bad input,
    SubmitFailed when VLM Run did not take it."""
    sub = validate_submission(data, upload is not None)
    image: str | None = None
    if upload is not None and sub["kind"] == "image":
        image = _data_url(upload, await upload.read())
        sub["filename"] = upload.filename
    elif upload is not None:
        try:
            uploaded = await svc.vlmrun.upload(
                upload.filename or "upload",
                upload.file,
                upload.content_type or "application/octet-stream",
            )
        except VlmRunError as exc:
            status, reason = api_error_answer(exc)
            raise SubmitFailed(status, f"upload failed: {reason}") from exc
        sub["file_id"] = uploaded.get("id")
        sub["filename"] = upload.filename

    now = svc.clock()
    token = new_callback_token()
    job = Job(
        id=new_id("job"),
        kind=sub["kind"],
        domain=sub["domain"],
        status=SUBMITTING,
        prediction_id=None,
        created_at=now,
        updated_at=now,
        request={k: v for k, v in sub.items() if v is not None},
        next_poll_at=now + svc.settings.reconcile_after,
    )
    logs.bind(job_id=job.id)
    await svc.store.create_job(job, hash_token(token))
    callback_url = f"{svc.settings.callback_base}/callbacks/vlmrun/{token}"
    try:
        prediction = await svc.vlmrun.generate(*generate_call(svc, sub, callback_url, image))
    except VlmRunError as exc:
        answer, reason = api_error_answer(exc)
        # A refusal is final; a timeout or 5xx is ambiguous (the prediction may exist and call
        # back), so the job stays `submitting` until a callback arrives or its deadline passes.
        final = exc.status_code is not None and exc.status_code < 500
        job = await svc.store.set_submitted(
            job.id, None, SUBMIT_FAILED if final else SUBMITTING, reason, svc.clock()
        )
        svc.metrics.submissions.labels("failed" if final else "unknown").inc()
        log.warning("job.submit_failed", job_id=job.id, status_code=exc.status_code, reason=reason)
        raise SubmitFailed(answer, reason, job) from exc
    prediction_id = prediction.get("id")
    if isinstance(prediction_id, str):
        logs.bind(prediction_id=prediction_id)
    pred_status = prediction.get("status") or "pending"
    job = await svc.store.set_submitted(
        job.id,
        prediction_id if isinstance(prediction_id, str) else None,
        str(pred_status),
        None,
        svc.clock(),
    )
    svc.metrics.submissions.labels("accepted").inc()
    log.info("job.submitted", job_id=job.id, prediction_id=prediction_id, domain=job.domain)
    return job


async def create_job(request: Request) -> Response:
    svc = services(request)
    data, upload = await read_submission(request, svc)
    try:
        job = await submit_job(svc, data, upload)
    except SubmitFailed as exc:
        if exc.job is None:
            return error(exc.status, exc.reason)
        headers = {"Retry-After": "60"} if exc.status == 429 else None
        return JSON(
            {"error": exc.reason, "job": exc.job.to_api()}, status_code=exc.status, headers=headers
        )
    location = f"{request.scope.get('root_path', '')}/jobs/{job.id}"  # root_path ends in /v1
    return JSON(job.to_api(), status_code=201, headers={"Location": location})


async def list_jobs(request: Request) -> Response:
    svc = services(request)
    query = parse(JobsQuery, dict(request.query_params), 400)
    page = await svc.store.list_jobs(
        query.status,
        query.domain,
        query.limit,
        query.cursor,
        since=epoch(query.since),
        until=epoch(query.until),
        search=query.q,
    )
    return JSON({"items": [j.to_api() for j in page.items], "next_cursor": page.next_cursor})


Sends = list[tuple[Delivery, list[DeliveryAttempt]]]


async def deliveries_of(store: Store, events: Sequence[Event]) -> dict[str, Sends]:
    """Each event's deliveries (one per sink that takes it), each with its recorded sends:
    what a job's page shows, in the API and the dashboard alike."""
    by_event: dict[str, list[Delivery]] = {}
    for event in events:  # a handful: one per state the job went through
        page = await store.list_deliveries(None, None, PAGE_MAX, None, event_id=event.id)
        by_event[event.id] = cast(list[Delivery], page.items)
    ids = [d.id for found in by_event.values() for d in found]
    sends: dict[int, list[DeliveryAttempt]] = {}
    for attempt in await store.attempts_of(ids) if ids else []:
        sends.setdefault(attempt.delivery_id, []).append(attempt)
    return {e: [(d, sends.get(d.id, [])) for d in found] for e, found in by_event.items()}


async def get_job(request: Request) -> Response:
    found = await services(request).store.get_job(request.path_params["job_id"])
    if found is None:
        return error(404, "no such job")
    job, events = found
    logs.bind(job_id=job.id, prediction_id=job.prediction_id)
    deliveries = await deliveries_of(services(request).store, events)
    shown = [
        event.to_api(with_body=True)
        | {
            "deliveries": [
                d.to_api() | {"sends": [a.to_api() for a in sends]}
                for d, sends in deliveries[event.id]
            ]
        }
        for event in events
    ]
    return JSON({**job.to_api(), "events": shown})


async def jobs_collection(request: Request) -> Response:
    """`/v1/jobs`: one route for both methods, so a wrong one gets 405 with `Allow: GET, POST`."""
    if request.method == "POST":
        return await create_job(request)
    return await list_jobs(request)


routes = [
    Route("/jobs", jobs_collection, methods=["GET", "POST"]),
    Route("/jobs/{job_id}", get_job, methods=["GET"]),
]
