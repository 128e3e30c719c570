"""The VLM Run API client: the few calls the receiver makes, over one injected httpx client.

Requests are what the official SDK (`vlmrun` 0.9.2) sends for the same operation, field for
field (tests compare them), with three differences on purpose:
- a submission is never retried: the API has no idempotency key, so the SDK's retry of a POST
  after a timeout or 5xx can start two paid predictions;
- `metadata.allow_training` is sent as configured (`RECEIVER_ALLOW_TRAINING`, default false),
  where the SDK sends true;
- `X-Client-Id` names the receiver, not the SDK.
Errors become `VlmRunError` with a reason a user can act on.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import IO, Any, Literal

import httpx
import orjson
from pydantic import BaseModel, ConfigDict

from receiver.errors import VlmRunError

# Above this the SDK uploads through a presigned URL instead of one multipart POST.
DIRECT_UPLOAD_MAX = 32 * 1024 * 1024
CHUNK = 1024 * 1024

# What each API status means for the person who submitted the job.
_REASONS = {
    400: "VLM Run refused the request",
    401: "VLM Run refused the API key (check RECEIVER_VLMRUN_API_KEY)",
    402: "VLM Run account is out of credits",
    403: "VLM Run API key may not do this",
    404: "VLM Run does not know this resource",
    413: "file too large for VLM Run",
    422: "VLM Run found the request invalid",
    429: "VLM Run rate limit reached; try again later",
}


class GenerationConfig(BaseModel):
    """`config` of a generate request: the SDK's fields and defaults; keys it does not know
    are passed on for the API to judge."""

    model_config = ConfigDict(extra="allow")

    prompt: str | None = None
    json_schema: dict[str, Any] | None = None
    gql_stmt: str | None = None
    max_retries: int = 3
    max_tokens: int = 65535
    temperature: float = 0.0
    detail: Literal["auto", "lo", "hi"] = "auto"
    confidence: bool = False
    grounding: bool = False
    video_segment_duration: float | None = None
    video_frames_per_segment: int | None = None
    page_indices: list[int] | None = None
    service_tier: Literal["auto", "default", "standard", "flex", "priority"] | None = None
    skills: list[dict[str, Any]] | None = None


class RequestMetadata(BaseModel):
    """`metadata` of a generate request, as the SDK models it."""

    model_config = ConfigDict(extra="allow")

    environment: Literal["dev", "staging", "prod"] = "dev"
    session_id: str | None = None
    allow_training: bool = True


def generate_request(
    domain: str,
    source: dict[str, Any],
    callback_url: str,
    config: GenerationConfig,
    metadata: RequestMetadata,
) -> dict[str, Any]:
    """The body of `POST /<kind>/generate` in batch mode: the SDK's fields in the SDK's way
    (config without its unset fields, metadata whole). `source` is `{"file_id"}`, `{"url"}`
    or, for `/image/generate`, `{"images": [...]}`."""
    return {
        "model": "vlm-1",
        **source,
        "domain": domain,
        "batch": True,
        "config": config.model_dump(mode="json", exclude_none=True),
        "metadata": metadata.model_dump(mode="json"),
        "callback_url": callback_url,
    }


def _detail(response: httpx.Response) -> str:
    """The API's own error text, from `{"error": {"message"}}` or FastAPI's `{"detail"}`."""
    try:
        body: Any = response.json()
    except ValueError:
        return ""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:300]
        if "detail" in body:
            return str(body["detail"])[:300]
    return ""


def _client_id() -> str:
    try:
        return f"receiver-{version('receiver')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "receiver"


async def _md5_and_size(file: IO[bytes]) -> tuple[str, int]:
    """The file's MD5 (what the API indexes uploads by) and size, read off the event loop."""

    def digest() -> tuple[str, int]:
        file.seek(0)
        md5, size = hashlib.md5(usedforsecurity=False), 0
        while chunk := file.read(CHUNK):
            md5.update(chunk)
            size += len(chunk)
        file.seek(0)
        return md5.hexdigest(), size

    return await asyncio.to_thread(digest)


async def _chunks(file: IO[bytes]) -> AsyncIterator[bytes]:
    file.seek(0)
    while chunk := await asyncio.to_thread(file.read, CHUNK):
        yield chunk


class VlmRunClient:
    def __init__(self, client: httpx.AsyncClient, base_url: str, api_key: str) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}", "X-Client-Id": _client_id()}

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(method, url, **kwargs)
        except httpx.TimeoutException as exc:
            raise VlmRunError("VLM Run did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise VlmRunError(f"cannot reach VLM Run: {type(exc).__name__}") from exc

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = await self._send(method, f"{self._base}{path}", headers=self._headers, **kwargs)
        if response.is_success:
            data: Any = orjson.loads(response.content)
            if not isinstance(data, dict):
                raise VlmRunError("VLM Run answered with something other than an object", 502)
            return data
        reason = _REASONS.get(response.status_code, f"VLM Run failed ({response.status_code})")
        detail = _detail(response)
        raise VlmRunError(f"{reason}: {detail}" if detail else reason, response.status_code)

    async def generate(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Start a prediction (`POST /<kind>/generate`); returns the prediction as created."""
        return await self._call("POST", f"/{kind}/generate", json=payload)

    async def upload(self, filename: str, file: IO[bytes], content_type: str) -> dict[str, Any]:
        """Upload a file as the SDK does, answering the API's file record (its `id` is a
        `file_id` for generate): a file the API already has (same MD5) is not sent again;
        up to 32 MiB goes in one multipart POST, larger through a presigned URL."""
        md5, size = await _md5_and_size(file)
        try:
            known = await self._call("GET", f"/files/hash/{md5}")
        except VlmRunError as exc:
            if exc.status_code != 404:
                raise
        else:
            if known.get("id"):
                return known
        if size <= DIRECT_UPLOAD_MAX:
            return await self._call(
                "POST",
                "/files",
                params={"purpose": "assistants"},
                files={"file": (filename, file, content_type)},
            )
        return await self._upload_presigned(filename, file, size)

    async def _upload_presigned(self, filename: str, file: IO[bytes], size: int) -> dict[str, Any]:
        slot = await self._call(
            "POST",
            "/files/presigned-url",
            json={"filename": filename, "purpose": "assistants", "expiration": 24 * 60 * 60},
        )
        url, file_id = slot.get("url"), slot.get("id")
        if not isinstance(url, str) or not isinstance(file_id, str):
            raise VlmRunError("VLM Run gave no upload URL for a large file", 502)
        content_type = slot.get("content_type") or mimetypes.guess_type(filename)[0]
        # Storage, not the API: the URL is the credential, so the API key is not sent there.
        # A Content-Length, not chunks: object stores refuse chunked uploads.
        headers = {"Content-Type": content_type or "application/octet-stream"}
        headers["Content-Length"] = str(size)
        put = await self._send("PUT", url, content=_chunks(file), headers=headers)
        if put.status_code != 200:
            raise VlmRunError(f"upload to VLM Run storage failed ({put.status_code})", 502)
        return await self._call("GET", f"/files/verify-upload/{file_id}")

    async def get_prediction(self, prediction_id: str) -> dict[str, Any]:
        """The prediction as it stands now: how a lost callback is recovered."""
        return await self._call("GET", f"/predictions/{prediction_id}")
