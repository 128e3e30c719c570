"""`POST /callbacks/vlmrun/{token}`: verify, record, then answer. The hot path.

A plain ASGI endpoint in the app's router (no Request/Response objects), behind the same pure
ASGI middleware as every other route (request id, access line with the token redacted). In
order, each step refusing as early and as cheaply as it can:

1. a body announced over the limit: 413, unread;
2. a token no job has: 404, unread (one indexed read of the store);
3. the bodies being read or held by all callbacks at once are kept within
   `max_inflight_bytes`: past it, 503 (VLM Run retries), so many large bodies held open
   cannot take the service's memory;
4. the body, read in chunks and cut off at the limit; the signature over the raw bytes;
5. the store records it (group commit), and only then the 2xx.

See the "Callback answers" table in README.md.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from starlette.types import Receive, Scope, Send

from receiver import logs
from receiver.errors import StoreError
from receiver.models import Incoming, Outcome, hash_token
from receiver.routes import Services
from receiver.verify import SIGNATURE_HEADERS, Rejected, check_signature, parse_prediction

log = structlog.get_logger("receiver.callbacks")
CALLBACK_PATH = "/callbacks/vlmrun/{token}"
_JSON_HEADERS = [(b"content-type", b"application/json")]


class TooLarge(Exception):
    pass


class OverBudget(Exception):
    pass


class InflightBytes:
    """The bytes of callback bodies read and not yet answered, across all requests."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise OverBudget
        self.used += size

    def give_back(self, size: int) -> None:
        self.used -= size


class _Body:
    """Reads one request's body within the per-body limit and the shared budget; what it
    took from the budget goes back with `release()`."""

    def __init__(self, budget: InflightBytes, limit: int, announced: int | None) -> None:
        self._budget = budget
        self._limit = limit
        self._announced = announced
        self._taken = 0

    async def read(self, receive: Receive) -> bytes:
        if self._announced is not None:
            self._budget.take(self._announced)  # all at once: no read if it cannot fit
            self._taken = self._announced
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._limit:
                raise TooLarge
            if size > self._taken:
                self._budget.take(size - self._taken)
                self._taken = size
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def release(self) -> None:
        self._budget.give_back(self._taken)
        self._taken = 0


async def _answer(send: Send, status: int, body: dict[str, Any]) -> None:
    content = orjson.dumps(body)
    headers = [*_JSON_HEADERS, (b"content-length", str(len(content)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


class CallbackEndpoint:
    def __init__(self, services: Services) -> None:
        self.svc = services
        self.inflight = InflightBytes(services.settings.max_inflight_bytes)
        self._counters: dict[str, Any] = {}

    def _count(self, outcome: str) -> None:
        """Count a callback by outcome (the labelled counter looked up once, not per call)."""
        counter = self._counters.get(outcome)
        if counter is None:
            counter = self._counters[outcome] = self.svc.metrics.callbacks.labels(outcome)
        counter.inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        svc = self.svc
        limit = svc.settings.max_body_bytes
        signature: str | None = None
        announced: int | None = None
        for name, value in scope["headers"]:
            if name in SIGNATURE_HEADERS and signature is None:
                signature = value.decode("latin-1")
            elif name == b"content-length" and value.isdigit():
                announced = int(value)
        if announced is not None and announced > limit:
            self._count("too_large")
            await _answer(send, 413, {"error": f"body over {limit} bytes"})
            return
        token_hash = hash_token(scope["path_params"]["token"])
        try:
            job_id = await svc.store.find_job(token_hash)
        except StoreError as exc:
            await self._store_failed(send, exc)
            return
        if job_id is None:
            await self._unknown_token(send)
            return

        body = _Body(self.inflight, limit, announced)
        try:
            raw = await body.read(receive)
            verification = check_signature(svc.webhook_secrets, raw, signature)
            prediction = parse_prediction(raw)
            logs.bind(job_id=job_id, prediction_id=prediction.id)  # on the access line too
            incoming = Incoming(
                token_hash=token_hash,
                job_id=job_id,
                prediction_id=prediction.id,
                status=prediction.status,
                domain=prediction.domain,
                source="callback",
                verification=verification,
                body=raw,
                received_at=svc.clock(),
            )
            result = await svc.store.record(incoming)
        except TooLarge:
            self._count("too_large")
            await _answer(send, 413, {"error": f"body over {limit} bytes"})
            return
        except OverBudget:
            self._count("busy")
            log.warning("callback.busy", inflight_bytes=self.inflight.used)
            await _answer(send, 503, {"error": "too many bodies in flight, retry later"})
            return
        except ConnectionError:
            return
        except Rejected as exc:
            self._count("unauthorized" if exc.status == 401 else "invalid")
            if exc.status == 401:
                svc.metrics.verification_failures.labels("signature").inc()
                log.warning("callback.rejected", status=exc.status, reason=exc.reason)
            await _answer(send, exc.status, {"error": exc.reason})
            return
        except StoreError as exc:
            await self._store_failed(send, exc)
            return
        finally:
            body.release()

        outcome = result.outcome
        if outcome is Outcome.UNKNOWN_TOKEN:  # the job was found a moment ago: hardly ever
            await self._unknown_token(send)
            return
        self._count(outcome)
        if outcome is Outcome.CONFLICT:
            log.warning("callback.conflict")
            await _answer(send, 409, {"error": "prediction belongs to another job"})
            return
        log.info(f"callback.{outcome}", status=prediction.status, event_id=result.event_id)
        await _answer(
            send, 200, {"status": outcome, "event_id": result.event_id, "job_id": result.job_id}
        )

    async def _unknown_token(self, send: Send) -> None:
        self._count(Outcome.UNKNOWN_TOKEN)
        self.svc.metrics.verification_failures.labels("unknown_token").inc()
        log.warning("callback.unknown_token")
        await _answer(send, 404, {"error": "no job has this callback URL"})

    async def _store_failed(self, send: Send, exc: StoreError) -> None:
        self._count("store_unavailable")
        log.error("callback.store_failed", error=str(exc))
        await _answer(send, 503, {"error": "store unavailable, retry later"})
