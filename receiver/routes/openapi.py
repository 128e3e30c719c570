"""`GET /openapi.json`: the document describing what the service really does.

Written by hand next to the routes (it is small), and held to the truth by the schemathesis
test, which calls a live service with everything this document allows.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from receiver import __version__
from receiver.routes import JSON

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


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_PAGE = [
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "Page size (default 50)"),
    _query("cursor", {"type": "string"}, "`next_cursor` of the previous page"),
]
_ADMIN: list[dict[str, list[str]]] = [{"bearer": []}]
_NULLABLE_STR = {"type": ["string", "null"]}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "receiver",
        "version": __version__,
        "description": "Submit VLM Run jobs, receive and verify their callbacks, "
        "record them durably and forward them to sinks.",
    },
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
                "required": ["id", "kind", "domain", "status", "created_at"],
                "properties": {
                    "id": {"type": "string"},
                    "kind": {"enum": ["document", "image", "audio", "video"]},
                    "domain": {"type": "string"},
                    "status": {"type": "string"},
                    "prediction_id": _NULLABLE_STR,
                    "error": _NULLABLE_STR,
                    "created_at": {"type": "string"},
                    "updated_at": {"type": "string"},
                    "completed_at": _NULLABLE_STR,
                },
            },
            "Event": {
                "type": "object",
                "required": ["id", "job_id", "prediction_id", "status", "source"],
                "properties": {
                    "id": {"type": "string"},
                    "job_id": {"type": "string"},
                    "prediction_id": {"type": "string"},
                    "status": {"type": "string"},
                    "domain": {"type": "string"},
                    "source": {"enum": ["callback", "poll"]},
                    "verification": {"type": "string"},
                    "received_at": {"type": "string"},
                    "prediction": {},
                },
            },
            "Delivery": {
                "type": "object",
                "required": ["id", "event_id", "sink", "state", "attempts"],
                "properties": {
                    "id": {"type": "integer"},
                    "event_id": {"type": "string"},
                    "sink": {"type": "string"},
                    "state": {"enum": ["pending", "leased", "delivered", "dead"]},
                    "attempts": {"type": "integer"},
                    "next_attempt_at": _NULLABLE_STR,
                    "last_error": _NULLABLE_STR,
                    "created_at": {"type": "string"},
                    "updated_at": {"type": "string"},
                    "delivered_at": _NULLABLE_STR,
                },
            },
            "Submission": {
                "type": "object",
                "required": ["domain"],
                "properties": {
                    "url": {"type": "string", "format": "uri"},
                    "file_id": {"type": "string"},
                    "domain": {
                        "type": "string",
                        "pattern": r"^[a-z0-9][a-z0-9_-]*\.[a-z0-9][a-z0-9_.-]*$",
                        "example": "document.invoice",
                    },
                    "kind": {"enum": ["document", "image", "audio", "video"]},
                    "config": {"type": "object"},
                    "metadata": {"type": "object"},
                },
            },
            "Requeued": {
                "type": "object",
                "required": ["requeued"],
                "properties": {"requeued": {"type": "integer"}},
            },
        },
    },
    "paths": {
        "/callbacks/vlmrun/{token}": {
            "post": {
                "summary": "Receive a VLM Run callback (the prediction as JSON)",
                "parameters": [_path("token")],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": _answer("Recorded, duplicate or stale", {"type": "object"}),
                    "409": _answer("The prediction belongs to another job", _ERROR),
                    **_errors(400, 401, 404, 413, 422, 503),
                },
            }
        },
        "/v1/jobs": {
            "post": {
                "summary": "Submit a document (JSON with url/file_id, or multipart with file)",
                "security": _ADMIN,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Submission"}},
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "file": {"type": "string", "format": "binary"},
                                    "domain": {"type": "string"},
                                    "kind": {"type": "string"},
                                    "config": {"type": "string"},
                                    "metadata": {"type": "string"},
                                },
                            }
                        },
                    },
                },
                "responses": {
                    "201": _answer("Submitted", {"$ref": "#/components/schemas/Job"}),
                    "402": _answer("VLM Run account out of credits", _ERROR),
                    "429": _answer("VLM Run rate limit", _ERROR),
                    "502": _answer("VLM Run failed or refused the API key", _ERROR),
                    "504": _answer("VLM Run did not answer in time", _ERROR),
                    **_errors(400, 401, 413, 422, 503),
                },
            },
            "get": {
                "summary": "List jobs, newest first",
                "security": _ADMIN,
                "parameters": [
                    _query("status", {"type": "string"}, "Only this status"),
                    _query("domain", {"type": "string"}, "Only this domain"),
                    *_PAGE,
                ],
                "responses": {
                    "200": _answer(
                        "A page of jobs",
                        {
                            "type": "object",
                            "properties": {
                                "items": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Job"},
                                },
                                "next_cursor": _NULLABLE_STR,
                            },
                        },
                    ),
                    **_errors(400, 401, 422, 503),
                },
            },
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "summary": "One job with its events",
                "security": _ADMIN,
                "parameters": [_path("job_id")],
                "responses": {
                    "200": _answer("The job", {"$ref": "#/components/schemas/Job"}),
                    **_errors(401, 404, 503),
                },
            }
        },
        "/v1/deliveries": {
            "get": {
                "summary": "List deliveries, newest first",
                "security": _ADMIN,
                "parameters": [
                    _query("state", {"enum": ["pending", "leased", "delivered", "dead"]}, "State"),
                    _query("sink", {"type": "string"}, "Only this sink"),
                    *_PAGE,
                ],
                "responses": {
                    "200": _answer(
                        "A page of deliveries",
                        {
                            "type": "object",
                            "properties": {
                                "items": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Delivery"},
                                },
                                "next_cursor": _NULLABLE_STR,
                            },
                        },
                    ),
                    **_errors(400, 401, 422, 503),
                },
            }
        },
        "/v1/deliveries/replay": {
            "post": {
                "summary": "Replay every dead delivery of a sink (optionally since a time)",
                "security": _ADMIN,
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["sink"],
                                "properties": {
                                    "sink": {"type": "string"},
                                    "since": {"type": "string"},
                                },
                            }
                        }
                    }
                },
                "responses": {
                    "202": _answer("Requeued", {"$ref": "#/components/schemas/Requeued"}),
                    **_errors(400, 401, 422, 503),
                },
            }
        },
        "/v1/deliveries/{delivery_id}/retry": {
            "post": {
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
                "summary": "One event with the prediction as received",
                "security": _ADMIN,
                "parameters": [_path("event_id")],
                "responses": {
                    "200": _answer("The event", {"$ref": "#/components/schemas/Event"}),
                    **_errors(401, 404, 503),
                },
            }
        },
        "/v1/events/{event_id}/replay": {
            "post": {
                "summary": "Deliver an event again, to one sink or to all",
                "security": _ADMIN,
                "parameters": [_path("event_id")],
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {"type": "object", "properties": {"sink": {"type": "string"}}}
                        }
                    }
                },
                "responses": {
                    "202": _answer("Requeued", {"$ref": "#/components/schemas/Requeued"}),
                    **_errors(400, 401, 404, 422, 503),
                },
            }
        },
        "/healthz": {"get": {"summary": "Process alive", "responses": {"200": _answer("Alive")}}},
        "/readyz": {
            "get": {
                "summary": "Store reachable and worker running",
                "responses": {"200": _answer("Ready"), "503": _answer("Not ready")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "Metrics", "content": {"text/plain": {}}}},
            }
        },
    },
}


async def openapi(request: Request) -> Response:
    return JSON(SPEC)
