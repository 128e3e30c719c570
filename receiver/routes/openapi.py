"""`GET /openapi.json`, generated: the table of operations below names, for each route, its
models from receiver.routes.schemas (the ones the handlers validate with), and `document()`
turns it into OpenAPI 3.1 with pydantic's JSON schemas.

A small generator of our own rather than a library: the routes are plain Starlette (the
callback route is a bare ASGI endpoint), and the libraries that generate from Starlette want
their own route or endpoint types. tests/acceptance/test_openapi.py checks that every route is
in the table and nothing else, and schemathesis holds the document to the running service.
Two parts depend on the running service: `servers` (its path prefix, `RECEIVER_ROOT_PATH`) and
the sink names the replay operations accept (those of `RECEIVER_SINKS_FILE`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from receiver import __version__
from receiver.routes import schemas as s
from receiver.routes import services

Answers = Mapping[int, tuple[str, type[BaseModel] | None]]


@dataclass(frozen=True)
class Operation:
    id: str
    route: str  # "METHOD /path", as routed
    summary: str
    answers: Answers
    body: type[BaseModel] | None = None
    form: type[BaseModel] | None = None  # the body as multipart/form-data too
    body_required: bool = True
    query: type[BaseModel] | None = None
    admin: bool = True
    headers: Sequence[dict[str, Any]] = ()  # header parameters
    links: Mapping[int, dict[str, Any]] = field(default_factory=dict)  # by answer status
    answer_headers: Mapping[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.route.split(" ", 1)[0]

    @property
    def path(self) -> str:
        return self.route.split(" ", 1)[1]


_ERRORS = {
    400: "Bad request",
    401: "Missing or wrong bearer token",
    404: "Not found",
    413: "Body too large",
    422: "Invalid field",
    503: "Store unavailable",
}


def errors(*codes: int) -> dict[int, tuple[str, type[BaseModel]]]:
    return {code: (_ERRORS[code], s.Error) for code in codes}


_REQUEST_ID = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "Kept, echoed and put on the request's log lines if it is 1-128 of "
    "`A-Za-z0-9._:@/+=-`; otherwise (or when absent) the service makes one",
}


def _link(operation: str, **parameters: str) -> dict[str, Any]:
    return {"operationId": operation, "parameters": parameters}


_TEXT = {"schema": {"type": "string"}}
_REQUEUED: Answers = {202: ("Requeued: put back in the queue, due now", s.Requeued)}
_BODY_ID = "$response.body#/id"
_SIGNATURES = [
    {"name": name, "in": "header", "required": False, "schema": {"type": "string"}}
    for name in ("X-VLMRun-Signature", "X-VLM-Signature")
]

OPERATIONS = (
    Operation(
        "receiveCallback",
        "POST /callbacks/vlmrun/{token}",
        "Receive a VLM Run callback (the prediction as JSON). The URL is the one the service "
        "built when it submitted the job; its last segment is a per-job secret. With "
        "RECEIVER_VLMRUN_WEBHOOK_SECRETS set, `X-VLMRun-Signature` (or `X-VLM-Signature`): "
        "`sha256=<hex HMAC of the body>` is required. Answered 2xx only once recorded.",
        {
            200: ("Recorded, duplicate or stale", s.CallbackAnswer),
            409: ("The prediction belongs to another job", s.Error),
            **errors(400, 401, 404, 413, 422, 503),
        },
        body=s.Prediction,
        admin=False,
        headers=_SIGNATURES,
    ),
    Operation(
        "createJob",
        "POST /v1/jobs",
        "Submit a document (JSON with url or file_id, or multipart with file)",
        {
            201: ("Submitted", s.Job),
            402: ("VLM Run account out of credits", s.SubmitFailed),
            429: ("VLM Run rate limit", s.SubmitFailed),
            502: ("VLM Run failed or refused the API key", s.SubmitFailed),
            504: ("VLM Run did not answer in time", s.SubmitFailed),
            422: ("Invalid field, or VLM Run refused the request", s.SubmitFailed),
            **errors(400, 401, 413, 503),
        },
        body=s.Submission,
        form=s.SubmissionForm,
        headers=(_REQUEST_ID,),
        links={
            201: {
                "GetJob": {"operationId": "getJob", "parameters": {"job_id": "$response.body#/id"}}
            }
        },
        answer_headers={
            201: {
                "Location": {"description": "Where to read the job", "schema": {"type": "string"}}
            }
        },
    ),
    Operation(
        "listJobs",
        "GET /v1/jobs",
        "List jobs, newest first",
        {200: ("A page of jobs", s.JobPage), **errors(400, 401, 503)},
        query=s.JobsQuery,
    ),
    Operation(
        "getJob",
        "GET /v1/jobs/{job_id}",
        "One job with its events",
        {200: ("The job and its events", s.JobWithEvents), **errors(401, 404, 503)},
    ),
    Operation(
        "listDeliveries",
        "GET /v1/deliveries",
        "List deliveries, newest first",
        {200: ("A page of deliveries", s.DeliveryPage), **errors(400, 401, 422, 503)},
        query=s.DeliveriesQuery,
        links={
            200: {
                "RetryDelivery": _link("retryDelivery", delivery_id="$response.body#/items/0/id"),
                "GetEvent": _link("getEvent", event_id="$response.body#/items/0/event_id"),
            }
        },
    ),
    Operation(
        "replayDead",
        "POST /v1/deliveries/replay",
        "Replay every dead delivery of a sink (optionally since a time)",
        {**_REQUEUED, **errors(400, 401, 422, 503)},
        body=s.ReplayDead,
    ),
    Operation(
        "retryMatching",
        "POST /v1/deliveries/retry",
        "Put every delivery the filters match (as GET /v1/deliveries lists them) back in the "
        "queue now, in one statement; those being sent right now are left alone",
        {**_REQUEUED, **errors(400, 401, 422, 503)},
        body=s.RetryMatching,
    ),
    Operation(
        "retryDelivery",
        "POST /v1/deliveries/{delivery_id}/retry",
        "Put one delivery back in the queue now",
        {**_REQUEUED, **errors(401, 404, 503)},
    ),
    Operation(
        "getEvent",
        "GET /v1/events/{event_id}",
        "One event with the prediction as received",
        {200: ("The event", s.Event), **errors(401, 404, 503)},
        links={200: {"ReplayEvent": _link("replayEvent", event_id=_BODY_ID)}},
    ),
    Operation(
        "replayEvent",
        "POST /v1/events/{event_id}/replay",
        "Deliver an event again, to one sink or to all",
        {**_REQUEUED, **errors(400, 401, 404, 422, 503)},
        body=s.ReplayEvent,
        body_required=False,
    ),
    Operation(
        "healthz",
        "GET /healthz",
        "Process alive (liveness)",
        {200: ("Alive", s.Health)},
        admin=False,
    ),
    Operation(
        "readyz",
        "GET /readyz",
        "Store reachable and writable and, where it runs, the worker running (readiness)",
        {200: ("Ready", s.Health), 503: ("Not ready; `problems` says why", s.Health)},
        admin=False,
    ),
    Operation(
        "metrics", "GET /metrics", "Prometheus metrics", {200: ("Metrics", None)}, admin=False
    ),
    Operation(
        "openapi",
        "GET /openapi.json",
        "This document",
        {200: ("OpenAPI 3.1", None)},
        admin=False,
    ),
)
_PLAIN = {  # answers without a model
    "metrics": {"text/plain": {"schema": {"type": "string"}}},
    "openapi": {"application/json": {"schema": {"type": "object"}}},
}
_SINK_BODIES = ("replayDead", "replayEvent", "retryMatching")


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _parameters(op: Operation) -> list[dict[str, Any]]:
    out = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in (part[1:-1] for part in op.path.split("/") if part.startswith("{"))
    ]
    if op.query is not None:
        schema = op.query.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, prop in schema["properties"].items():
            description = prop.pop("description", None)
            prop.pop("title", None)
            # A query parameter is absent or a string: never null.
            options = [o for o in prop.pop("anyOf", []) if o.get("type") != "null"]
            prop |= options[0] if options else {}
            if prop.get("default", 0) is None:
                del prop["default"]
            param = {"name": name, "in": "query", "required": False, "schema": prop}
            out.append(param | ({"description": description} if description else {}))
    return [*out, *op.headers]


def _operation(op: Operation, sink_names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.id, "summary": op.summary}
    if op.admin:
        out["security"] = [{"bearer": []}]
    if parameters := _parameters(op):
        out["parameters"] = parameters
    if op.body is not None:
        body: dict[str, Any] = {"schema": _ref(op.body)}
        if op.id in _SINK_BODIES and sink_names:
            body = {"schema": _with_sinks(op.body, sink_names)}
        content = {"application/json": body}
        if op.form is not None:
            content["multipart/form-data"] = {"schema": _ref(op.form)}
        out["requestBody"] = {"required": op.body_required, "content": content}
    out["responses"] = {}
    answers = dict(op.answers)
    if op.admin:  # routes.AdminOnly: too many wrong tokens from the client's address
        answers.setdefault(429, ("Too many wrong admin tokens from this address", s.Error))
    for status, (description, model) in sorted(answers.items()):
        answer: dict[str, Any] = {"description": description}
        if model is not None:
            answer["content"] = {"application/json": {"schema": _ref(model)}}
        elif op.id in _PLAIN:
            answer["content"] = _PLAIN[op.id]
        if status in op.answer_headers:
            answer["headers"] = op.answer_headers[status]
        if status in op.links:
            answer["links"] = op.links[status]
        out["responses"][str(status)] = answer
    return out


def _with_sinks(model: type[BaseModel], sink_names: Sequence[str]) -> dict[str, Any]:
    """The body's schema with `sink` limited to the configured sinks."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    sink = schema["properties"]["sink"]
    for option in sink.get("anyOf", [sink]):
        if option.get("type") == "string":
            option["enum"] = list(sink_names)
    return schema


def document(root_path: str = "", sink_names: Sequence[str] = ()) -> dict[str, Any]:
    """The document for one running service: its path prefix and its sinks filled in."""
    models = {
        model
        for op in OPERATIONS
        for model in (op.body, op.form, *(m for _, m in op.answers.values()))
        if model is not None
    }
    _, definitions = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, sink_names)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "receiver",
            "version": __version__,
            "description": "Submit VLM Run jobs, receive and verify their callbacks, record "
            "them durably and forward them to sinks. Everything under `/v1/` needs the bearer "
            "token `RECEIVER_ADMIN_TOKEN`. Every answer carries `X-Request-ID`.",
        },
        "servers": [{"url": root_path or "/"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": definitions.get("$defs", {}),
        },
        "paths": paths,
    }


async def openapi(request: Request) -> Response:
    """The document, built once per path prefix and kept on the app."""
    root_path = request.scope.get("root_path", "")
    cache: dict[str, bytes] | None = getattr(request.app.state, "openapi_cache", None)
    if cache is None:
        cache = request.app.state.openapi_cache = {}
    if root_path not in cache:
        cache[root_path] = orjson.dumps(document(root_path, services(request).sink_names))
    return Response(cache[root_path], media_type="application/json")
