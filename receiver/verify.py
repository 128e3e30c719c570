"""Callback checks: pure functions over raw bytes, no I/O.

VLM Run signs the raw body: `X-VLMRun-Signature: sha256=<hex HMAC-SHA256(secret, body)>`; some
SDK versions and docs name the header `X-VLM-Signature`, same format, so both are read.
There is no timestamp in it, so a captured callback can be replayed: the store deduplicates
and never moves a job backwards; this module only decides whether the bytes are authentic.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import orjson

SIGNATURE_PREFIX = "sha256="
# Lower-case, as ASGI gives header names; the first one present is checked.
SIGNATURE_HEADERS = (b"x-vlmrun-signature", b"x-vlm-signature")


class Rejected(Exception):
    """The callback is refused; `status` is the HTTP answer, `reason` is safe to show."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def sign(secret: str, body: bytes) -> str:
    """The header value VLM Run would send for `body` (used by the simulator and tests)."""
    return SIGNATURE_PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@functools.lru_cache(maxsize=64)
def _keyed(secret: str) -> hmac.HMAC:
    """An HMAC keyed with `secret`, to be copied per body: cheaper than keying anew, and
    unlike `hmac.digest` it keeps the GIL for bodies under 2 KiB (the usual callback), so the
    event loop does not wait to get it back from the store's thread."""
    return hmac.new(secret.encode(), digestmod=hashlib.sha256)


def check_signature(secrets: list[str], body: bytes, header: str | None) -> str:
    """Return how the callback was verified, or raise Rejected(401).

    With no secrets configured the per-job URL token is the only proof ("token"); with
    secrets, a signature made with any of them (rotation) is required: fail closed.
    """
    if not secrets:
        return "token"
    if not header:
        raise Rejected(401, "missing X-VLMRun-Signature (or X-VLM-Signature)")
    if not header.startswith(SIGNATURE_PREFIX):
        raise Rejected(401, "signature header must be sha256=<hex>")
    given = header[len(SIGNATURE_PREFIX) :].strip().lower().encode()
    for secret in secrets:
        mac = _keyed(secret).copy()
        mac.update(body)
        if hmac.compare_digest(mac.hexdigest().encode(), given):
            return "hmac-sha256"
    raise Rejected(401, "signature does not match")


@dataclass(frozen=True, slots=True)
class Prediction:
    """The few fields of a callback body the receiver acts on; the body itself is kept whole."""

    id: str
    status: str
    domain: str | None


def parse_prediction(body: bytes) -> Prediction:
    """Parse a callback body, or raise Rejected(400) for non-JSON and Rejected(422) for a
    JSON value that is not a prediction (an object with string `id` and `status`)."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Rejected(400, "body is not JSON") from exc
    if not isinstance(data, dict):
        raise Rejected(422, "body must be a JSON object (a prediction)")
    pid, status, domain = data.get("id"), data.get("status"), data.get("domain")
    if not isinstance(pid, str) or not pid or len(pid) > 200:
        raise Rejected(422, "prediction `id` missing or not a string")
    if not isinstance(status, str) or not status or len(status) > 64:
        raise Rejected(422, "prediction `status` missing or not a string")
    domain = domain if isinstance(domain, str) and domain else None
    for name, value in (("id", pid), ("status", status), ("domain", domain)):
        # PostgreSQL text cannot hold NUL: refused here, so both stores answer alike and a
        # body that can never be stored is not answered "retry later".
        if value is not None and "\x00" in value:
            raise Rejected(422, f"prediction `{name}` contains a NUL character")
    return Prediction(pid, status, domain)
