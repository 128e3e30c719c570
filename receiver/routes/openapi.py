"""`GET /openapi.json`: the document describing what the service really does.

Written by hand next to the routes (it is small), and held to the truth by the schemathesis
test (tests/acceptance/test_openapi.py), which calls a live service with everything this
document allows and checks every answer against it. Two parts depend on the running service:
`servers` (its path prefix, `RECEIVER_ROOT_PATH`) and the sink names the replay operations
accept (those of `RECEIVER_SINKS_FILE`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from receiver import __version__
from receiver.routes import services

_ERROR = {"$ref": "#/components/schemas/Error"}


def _answer(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Bad request",
        401: "Missing or wrong bearer token",
        404: "Not found",
        413: "Body too large",
        422: "Invalid field",
        503: "Store unavailable",
    }
    return {str(c): _answer(text.get(c, "Error"), _ERROR) for c in codes}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or {"type": "string"}}


def _page(cursor: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        _query(
            "limit", {"type": "integer", "minimum": 1, "maximum": 500}, "Page size (default 50)"
        ),
        _query("cursor", cursor, "`next_cursor` of the previous page"),
    ]


def _list_of(schema: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{schema}"}},
            "next_cursor": _NULLABLE_STR,
        },
    }


_ADMIN: list[dict[str, list[str]]] = [{"bearer": []}]
_NULLABLE_STR = {"type": ["string", "null"]}
_TIME = {"type": "string", "format": "date-time"}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_SINK = {"type": "string", "description": "A sink's name from the sinks file"}
_LOCATION = {"description": "Where to read the job", "schema": {"type": "string"}}
_REQUEST_ID = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "Kept, echoed and put on the request's log lines if it is 1-128 of "
    "`A-Za-z0-9._:@/+=-`; otherwise (or when absent) the service makes one",
}

_JOB_KINDS = ["document", "image", "audio", "video"]
_DOMAIN = {
    "type": "string",
    "pattern": r"^[a-z0-9][a-z0-9_-]*\.[a-z0-9][a-z0-9_.-]*$",
    "examples": ["document.invoice"],
}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "receiver",
        "version": __version__,
        "description": "Submit VLM Run jobs, receive and verify their callbacks, "
        "record them durably and forward them to sinks. Everything under `/v1/` needs the "
        "bearer token `RECEIVER_ADMIN_TOKEN`. Every answer carries `X-Request-ID`.",
    },
    "servers": [{"url": "/"}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
            "Job": {
                "type": "object",
                "required": [
                    "id",
                    "kind",
                    "domain",
                    "status",
                    "prediction_id",
                    "error",
                    "created_at",
                    "updated_at",
                    "completed_at",
                ],
                "properties": {
                    "id": {"type": "string"},
                    "kind": {"enum": _JOB_KINDS},
                    "domain": {"type": "string"},
                    "status": {
                        "type": "string",
                        "description": "submitting, submit_failed, timed_out, or the "
                        "prediction's status (pending, running, completed, failed, ...)",
                    },
                    "prediction_id": _NULLABLE_STR,
                    "error": _NULLABLE_STR,
                    "created_at": _TIME,
                    "updated_at": _TIME,
                    "completed_at": _NULLABLE_TIME,
                },
            },
            "JobWithEvents": {
                "allOf": [
                    {"$ref": "#/components/schemas/Job"},
                    {
                        "type": "object",
                        "required": ["events"],
                        "properties": {
                            "events": {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/Event"},
                            }
                        },
                    },
                ]
            },
            "SubmitFailed": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {"type": "string"},
                    "job": {"$ref": "#/components/schemas/Job"},
                },
            },
            "Event": {
                "type": "object",
                "required": [
                    "id",
                    "job_id",
                    "prediction_id",
                    "status",
                    "domain",
                    "source",
                    "verification",
                    "received_at",
                ],
                "properties": {
                    "id": {"type": "string"},
                    "job_id": {"type": "string"},
                    "prediction_id": {"type": "string"},
                    "status": {"type": "string"},
                    "domain": {"type": "string"},
                    "source": {"enum": ["callback", "poll"]},
                    "verification": {"enum": ["hmac-sha256", "token", "poll"]},
                    "received_at": _TIME,
                    "prediction": {
                        "type": "object",
                        "description": "The prediction exactly as VLM Run sent it",
                    },
                },
            },
            "Delivery": {
                "type": "object",
                "required": [
                    "id",
                    "event_id",
                    "sink",
                    "state",
                    "attempts",
                    "next_attempt_at",
                    "last_error",
                    "created_at",
                    "updated_at",
                    "delivered_at",
                ],
                "properties": {
                    "id": {"type": "integer"},
                    "event_id": {"type": "string"},
                    "sink": {"type": "string"},
                    "state": {"enum": ["pending", "leased", "delivered", "dead"]},
                    "attempts": {"type": "integer", "minimum": 0},
                    "next_attempt_at": _NULLABLE_TIME,
                    "last_error": _NULLABLE_STR,
                    "created_at": _TIME,
                    "updated_at": _TIME,
                    "delivered_at": _NULLABLE_TIME,
                },
            },
            "Submission": {
                "type": "object",
                "required": ["domain"],
                "description": "Exactly one of `url` and `file_id`.",
                "oneOf": [{"required": ["url"]}, {"required": ["file_id"]}],
                "properties": {
                    "url": {"type": "string", "minLength": 1, "pattern": "^https?://"},
                    "file_id": {"type": "string", "minLength": 1},
                    "domain": _DOMAIN,
                    "kind": {"enum": _JOB_KINDS, "default": "document"},
                    "config": {"type": "object"},
                    "metadata": {"type": "object"},
                },
            },
            "Requeued": {
                "type": "object",
                "required": ["requeued"],
                "properties": {"requeued": {"type": "integer", "minimum": 0}},
            },
            "CallbackAnswer": {
                "type": "object",
                "required": ["status", "event_id", "job_id"],
                "properties": {
                    "status": {"enum": ["recorded", "duplicate", "stale"]},
                    "event_id": _NULLABLE_STR,
                    "job_id": _NULLABLE_STR,
                },
            },
            "Health": {
                "type": "object",
                "required": ["status"],
                "properties": {
                    "status": {"type": "string"},
                    "problems": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
    "paths": {
        "/callbacks/vlmrun/{token}": {
            "post": {
                "operationId": "receiveCallback",
                "summary": "Receive a VLM Run callback (the prediction as JSON)",
                "description": "The URL is the one the service built when it submitted the job; "
                "its last segment is a per-job secret. With `RECEIVER_VLMRUN_WEBHOOK_SECRETS` "
                "set, `X-VLMRun-Signature: sha256=<hex HMAC of the body>` is required. "
                "Answered 2xx only once the callback is durably recorded.",
                "parameters": [
                    _path("token"),
                    {
                        "name": "X-VLMRun-Signature",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["id", "status"],
                                "properties": {
                                    "id": {"type": "string"},
                                    "status": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _answer(
                        "Recorded, duplicate or stale",
                        {"$ref": "#/components/schemas/CallbackAnswer"},
                    ),
                    "409": _answer("The prediction belongs to another job", _ERROR),
                    **_errors(400, 401, 404, 413, 422, 503),
                },
            }
        },
        "/v1/jobs": {
            "post": {
                "operationId": "createJob",
                "summary": "Submit a document (JSON with url or file_id, or multipart with file)",
                "security": _ADMIN,
                "parameters": [_REQUEST_ID],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Submission"}},
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["file", "domain"],
                                "properties": {
                                    "file": {"type": "string", "format": "binary"},
                                    "domain": _DOMAIN,
                                    "kind": {"enum": _JOB_KINDS},
                                    "config": {
                                        "type": "string",
                                        "contentMediaType": "application/json",
                                    },
                                    "metadata": {
                                        "type": "string",
                                        "contentMediaType": "application/json",
                                    },
                                },
                            }
                        },
                    },
                },
                "responses": {
                    "201": {
                        **_answer("Submitted", {"$ref": "#/components/schemas/Job"}),
                        "headers": {"Location": _LOCATION},
                        "links": {
                            "GetJob": {
                                "operationId": "getJob",
                                "parameters": {"job_id": "$response.body#/id"},
                            }
                        },
                    },
                    "402": _answer(
                        "VLM Run account out of credits",
                        {"$ref": "#/components/schemas/SubmitFailed"},
                    ),
                    "429": _answer(
                        "VLM Run rate limit", {"$ref": "#/components/schemas/SubmitFailed"}
                    ),
                    "502": _answer(
                        "VLM Run failed or refused the API key",
                        {"$ref": "#/components/schemas/SubmitFailed"},
                    ),
                    "504": _answer(
                        "VLM Run did not answer in time",
                        {"$ref": "#/components/schemas/SubmitFailed"},
                    ),
                    **_errors(400, 401, 413, 503),
                    "422": _answer(
                        "Invalid field, or VLM Run refused the request",
                        {"$ref": "#/components/schemas/SubmitFailed"},
                    ),
                },
            },
            "get": {
                "operationId": "listJobs",
                "summary": "List jobs, newest first",
                "security": _ADMIN,
                "parameters": [
                    _query("status", {"type": "string"}, "Only this status"),
                    _query("domain", {"type": "string"}, "Only this domain"),
                    *_page({"type": "string"}),
                ],
                "responses": {
                    "200": _answer("A page of jobs", _list_of("Job")),
                    **_errors(400, 401, 503),
                },
            },
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "operationId": "getJob",
                "summary": "One job with its events",
                "security": _ADMIN,
                "parameters": [_path("job_id")],
                "responses": {
                    "200": _answer(
                        "The job and its events", {"$ref": "#/components/schemas/JobWithEvents"}
                    ),
                    **_errors(401, 404, 503),
                },
            }
        },
        "/v1/deliveries": {
            "get": {
                "operationId": "listDeliveries",
                "summary": "List deliveries, newest first",
                "security": _ADMIN,
                "parameters": [
                    _query("state", {"enum": ["pending", "leased", "delivered", "dead"]}, "State"),
                    _query("sink", {"type": "string"}, "Only this sink"),
                    *_page({"type": "string", "pattern": "^[0-9]{1,18}$"}),
                ],
                "responses": {
                    "200": {
                        **_answer("A page of deliveries", _list_of("Delivery")),
                        "links": {
                            "RetryDelivery": {
                                "operationId": "retryDelivery",
                                "parameters": {"delivery_id": "$response.body#/items/0/id"},
                            },
                            "GetEvent": {
                                "operationId": "getEvent",
                                "parameters": {"event_id": "$response.body#/items/0/event_id"},
                            },
                        },
                    },
                    **_errors(400, 401, 422, 503),
                },
            }
        },
        "/v1/deliveries/replay": {
            "post": {
                "operationId": "replayDead",
                "summary": "Replay every dead delivery of a sink (optionally since a time)",
                "security": _ADMIN,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["sink"],
                                "properties": {
                                    "sink": _SINK,
                                    "since": {
                                        "type": ["string", "null"],
                                        "format": "date-time",
                                        "description": "Only deliveries that died since then",
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "202": _answer("Requeued", {"$ref": "#/components/schemas/Requeued"}),
                    **_errors(400, 401, 422, 503),
                },
            }
        },
        "/v1/deliveries/{delivery_id}/retry": {
            "post": {
                "operationId": "retryDelivery",
                "summary": "Put one delivery back in the queue now",
                "security": _ADMIN,
                "parameters": [_path("delivery_id")],
                "responses": {
                    "202": _answer("Requeued", {"$ref": "#/components/schemas/Requeued"}),
                    **_errors(401, 404, 503),
                },
            }
        },
        "/v1/events/{event_id}": {
            "get": {
                "operationId": "getEvent",
                "summary": "One event with the prediction as received",
                "security": _ADMIN,
                "parameters": [_path("event_id")],
                "responses": {
                    "200": {
                        **_answer("The event", {"$ref": "#/components/schemas/Event"}),
                        "links": {
                            "ReplayEvent": {
                                "operationId": "replayEvent",
                                "parameters": {"event_id": "$response.body#/id"},
                            }
                        },
                    },
                    **_errors(401, 404, 503),
                },
            }
        },
        "/v1/events/{event_id}/replay": {
            "post": {
                "operationId": "replayEvent",
                "summary": "Deliver an event again, to one sink or to all",
                "security": _ADMIN,
                "parameters": [_path("event_id")],
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {"type": "object", "properties": {"sink": _SINK}}
                        }
                    },
                },
                "responses": {
                    "202": _answer("Requeued", {"$ref": "#/components/schemas/Requeued"}),
                    **_errors(400, 401, 404, 422, 503),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Process alive (liveness)",
                "responses": {"200": _answer("Alive", {"$ref": "#/components/schemas/Health"})},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Store reachable and, where it runs, the worker running (readiness)",
                "responses": {
                    "200": _answer("Ready", {"$ref": "#/components/schemas/Health"}),
                    "503": _answer(
                        "Not ready; `problems` says why", {"$ref": "#/components/schemas/Health"}
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Metrics, Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {"200": _answer("OpenAPI 3.1", {"type": "object"})},
            }
        },
    },
}


def document(root_path: str = "", sink_names: Sequence[str] = ()) -> dict[str, Any]:
    """The document for one running service: its path prefix and its sinks filled in."""
    doc = copy.deepcopy(SPEC)
    doc["servers"] = [{"url": root_path or "/"}]
    if sink_names:
        for schema in (
            doc["paths"]["/v1/deliveries/replay"]["post"]["requestBody"]["content"],
            doc["paths"]["/v1/events/{event_id}/replay"]["post"]["requestBody"]["content"],
        ):
            schema["application/json"]["schema"]["properties"]["sink"]["enum"] = list(sink_names)
    return doc


async def openapi(request: Request) -> Response:
    """The document, built once per path prefix and kept on the app."""
    root_path = request.scope.get("root_path", "")
    cache: dict[str, bytes] | None = getattr(request.app.state, "openapi_cache", None)
    if cache is None:
        cache = request.app.state.openapi_cache = {}
    if root_path not in cache:
        cache[root_path] = orjson.dumps(document(root_path, services(request).sink_names))
    return Response(cache[root_path], media_type="application/json")
