"""The VLM Run API client: the few calls the receiver makes, over one injected httpx client.

It never retries a submission on its own: the API has no idempotency key, so a blind retry
can start two paid predictions. Errors become `VlmRunError` with a reason a user can act on.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from receiver.errors import VlmRunError

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


class VlmRunClient:
    def __init__(self, client: httpx.AsyncClient, base_url: str, api_key: str) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._client.request(
                method, f"{self._base}{path}", headers=self._headers, **kwargs
            )
        except httpx.TimeoutException as exc:
            raise VlmRunError("VLM Run did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise VlmRunError(f"cannot reach VLM Run: {type(exc).__name__}") from exc
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

    async def upload(self, filename: str, content: bytes, content_type: str) -> dict[str, Any]:
        """Upload a file (`POST /files`); its `id` is then a `file_id` for generate."""
        return await self._call(
            "POST",
            "/files",
            params={"purpose": "assistants"},
            files={"file": (filename, content, content_type)},
        )

    async def get_prediction(self, prediction_id: str) -> dict[str, Any]:
        """The prediction as it stands now: how a lost callback is recovered."""
        return await self._call("GET", f"/predictions/{prediction_id}")
