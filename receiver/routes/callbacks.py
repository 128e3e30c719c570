"""`POST /callbacks/vlmrun/{token}`: verify, record, then answer. The hot path.

A plain ASGI endpoint (no Request/Response objects): it reads the body in chunks and stops
at the size limit, checks the signature over the raw bytes, and answers 2xx only after the
store has committed. See the "Callback answers" table in DESIGN.md.

The app dispatches callbacks to it before Starlette's middleware stack (`callback_token`):
each request waits once for the group commit, and resuming it through a dozen middleware
frames cost more than everything else the route does. It gives itself what that stack would
have: a request id (kept from X-Request-ID or made, returned, bound to its log lines).
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from starlette.types import Receive, Scope, Send

from receiver import logs
from receiver.errors import StoreError
from receiver.models import Incoming, Outcome, hash_token, new_id
from receiver.routes import Services
from receiver.verify import SIGNATURE_HEADERS, Rejected, check_signature, parse_prediction

log = structlog.get_logger("receiver.callbacks")
PREFIX = "/callbacks/vlmrun/"


def callback_token(scope: Scope) -> str | None:
    """The token when `scope` is a callback request (path relative to the app's root)."""
    if scope["type"] != "http":
        return None
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if not path.startswith(PREFIX):
        return None
    token = path[len(PREFIX) :]
    return token if token and "/" not in token else None


_JSON_HEADERS = [(b"content-type", b"application/json")]


class TooLarge(Exception):
    pass


async def _read_body(receive: Receive, content_length: int | None, limit: int) -> bytes:
    if content_length is not None and content_length > limit:
        raise TooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _answer(send: Send, scope: Scope, status: int, body: dict[str, Any]) -> None:
    headers = _JSON_HEADERS
    request_id = scope.get("state", {}).get("request_id")
    if request_id:
        headers = [*headers, (b"x-request-id", request_id.encode("latin-1"))]
    content = orjson.dumps(body)
    headers = [*headers, (b"content-length", str(len(content)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


class CallbackEndpoint:
    def __init__(self, services: Services) -> None:
        self.svc = services
        self._counters: dict[str, Any] = {}

    def _count(self, outcome: str) -> None:
        """Count a callback by outcome (the labelled counter looked up once, not per call)."""
        counter = self._counters.get(outcome)
        if counter is None:
            counter = self._counters[outcome] = self.svc.metrics.callbacks.labels(outcome)
        counter.inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        svc = self.svc
        signature: str | None = None
        content_length: int | None = None
        request_id: str | None = None
        for name, value in scope["headers"]:
            if name in SIGNATURE_HEADERS and signature is None:
                signature = value.decode("latin-1")
            elif name == b"content-length" and value.isdigit():
                content_length = int(value)
            elif name == b"x-request-id":
                request_id = logs.request_id(value.decode("latin-1"))
        request_id = request_id or new_id("req")
        scope.setdefault("state", {})["request_id"] = request_id
        logs.reset(request_id=request_id)
        token = callback_token(scope) or ""
        try:
            body = await _read_body(receive, content_length, svc.settings.max_body_bytes)
            verification = check_signature(svc.webhook_secrets, body, signature)
            prediction = parse_prediction(body)
        except TooLarge:
            self._count("too_large")
            await _answer(
                send, scope, 413, {"error": f"body over {svc.settings.max_body_bytes} bytes"}
            )
            return
        except ConnectionError:
            return
        except Rejected as exc:
            outcome = "unauthorized" if exc.status == 401 else "invalid"
            self._count(outcome)
            if exc.status == 401:
                svc.metrics.verification_failures.labels("signature").inc()
                log.warning("callback.rejected", status=exc.status, reason=exc.reason)
            await _answer(send, scope, exc.status, {"error": exc.reason})
            return

        incoming = Incoming(
            token_hash=hash_token(token),
            job_id=None,
            prediction_id=prediction.id,
            status=prediction.status,
            domain=prediction.domain,
            source="callback",
            verification=verification,
            body=body,
            received_at=svc.clock(),
        )
        try:
            result = await svc.store.record(incoming)
        except StoreError as exc:
            self._count("store_unavailable")
            log.error("callback.store_failed", error=str(exc), prediction_id=prediction.id)
            await _answer(send, scope, 503, {"error": "store unavailable, retry later"})
            return

        outcome = result.outcome
        self._count(outcome)
        if outcome is Outcome.UNKNOWN_TOKEN:
            svc.metrics.verification_failures.labels("unknown_token").inc()
            log.warning("callback.unknown_token", prediction_id=prediction.id)
            await _answer(send, scope, 404, {"error": "no job has this callback URL"})
            return
        if outcome is Outcome.CONFLICT:
            log.warning("callback.conflict", job_id=result.job_id, prediction_id=prediction.id)
            await _answer(send, scope, 409, {"error": "prediction belongs to another job"})
            return
        log.info(
            f"callback.{outcome}",
            job_id=result.job_id,
            prediction_id=prediction.id,
            status=prediction.status,
            event_id=result.event_id,
        )
        await _answer(
            send,
            scope,
            200,
            {"status": outcome, "event_id": result.event_id, "job_id": result.job_id},
        )
