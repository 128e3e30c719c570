"""The simulator and the client held to the official VLM Run SDK (`vlmrun`, pinned in the dev
extra): the SDK drives the simulator over real HTTP and parses every answer with its own types,
every callback is checked with the SDK's `verify_webhook`, and the receiver's client is compared
request by request with what the SDK sends for the same operation."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from PIL import Image
from vlmrun.client import VLMRun
from vlmrun.client.exceptions import (
    APIError,
    AuthenticationError,
    RateLimitError,
    ResourceNotFoundError,
)
from vlmrun.client.types import FileResponse, MarkdownDocument, PredictionResponse
from vlmrun.common.webhook import verify_webhook
from vlmrun.hub.registry import registry

from receiver.simulator import DIRECT_UPLOAD_MAX, SimulatorOptions, create_simulator_app
from receiver.vlmrun import GenerationConfig, RequestMetadata, VlmRunClient, generate_request
from tests.conftest import WebhookServer, read_body

KEY = "sk-sdk-contract"
SECRET = "whsec-sdk-contract"
OPTIONS = SimulatorOptions(api_key=KEY, webhook_secret=SECRET, delay=0.05, callback_backoff=(0.1,))


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


class Recorder:
    """ASGI wrapper that keeps every request the wrapped app is sent, body and all."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[Recorded] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = await read_body(receive)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        query = scope["query_string"].decode()
        self.requests.append(Recorded(scope["method"], scope["path"], query, headers, body))
        delivered = False

        async def replay() -> Any:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def take(self) -> list[Recorded]:
        """The requests recorded so far (forgotten afterwards)."""
        taken, self.requests = self.requests, []
        return taken


@dataclass
class Api:
    url: str  # base URL, ending in /v1
    recorder: Recorder
    app: Any

    def sdk(self, **kwargs: Any) -> VLMRun:
        return VLMRun(api_key=KEY, base_url=self.url, max_retries=1, **kwargs)


@pytest.fixture
def api(asgi_server: Any) -> Iterator[Api]:
    """The simulator served on a loopback port, its requests recorded."""
    app = create_simulator_app(OPTIONS)
    recorder = Recorder(app)
    yield Api(asgi_server(recorder) + "/v1", recorder, app)


def wait_for_callbacks(server: WebhookServer, url: str, count: int) -> list[Any]:
    deadline = time.monotonic() + 15
    while len(got := server.received(url)) < count:
        assert time.monotonic() < deadline, f"{len(got)} of {count} callbacks arrived"
        time.sleep(0.02)
    return got


def hub_instance(domain: str, response: Any) -> Any:
    """The response validated strictly against the domain's vlmrun-hub model: no unknown key."""
    model = registry[domain]
    parsed = model.model_validate(response)
    assert orjson.loads(orjson.dumps(parsed.model_dump(mode="json", exclude_unset=True))) == (
        orjson.loads(orjson.dumps(response))
    )
    return parsed


def test_sdk_connects_and_lists(api: Api) -> None:
    """The SDK's constructor health check passes, and empty listings parse as its types."""
    client = api.sdk()
    assert client.healthcheck()
    assert client.files.list() == []
    assert client.predictions.list() == []


def test_wrong_key_and_unknown_ids_raise_the_sdks_errors(api: Api) -> None:
    """A wrong key is the SDK's AuthenticationError; unknown ids its ResourceNotFoundError."""
    with pytest.raises(AuthenticationError):
        VLMRun(api_key="wrong", base_url=api.url, max_retries=1)
    client = api.sdk()
    with pytest.raises(ResourceNotFoundError):
        client.predictions.get("pred_missing")
    with pytest.raises(ResourceNotFoundError):
        client.files.get("file_missing")


@pytest.mark.parametrize(("code", "error"), [(429, RateLimitError), (402, APIError)])
def test_api_errors_parse_as_the_sdks(api: Api, code: int, error: type[APIError]) -> None:
    """A forced API error carries the status, type and message the SDK reads."""
    with pytest.raises(error) as raised:
        api.sdk().document.generate(url="https://e.test/a.pdf", domain=f"simulate.error-{code}")
    assert raised.value.http_status == code and raised.value.error_type and raised.value.message


def test_direct_upload_then_reuse_by_hash(api: Api, tmp_path: Path) -> None:
    """A small file goes up in one POST; the same bytes again are found by MD5, not re-sent."""
    doc = tmp_path / "invoice.pdf"
    doc.write_bytes(b"%PDF-1.4 invoice " + os.urandom(2048))
    client = api.sdk()
    first = client.files.upload(doc)
    assert isinstance(first, FileResponse) and first.bytes == doc.stat().st_size
    second = client.files.upload(doc)
    assert second.id == first.id
    posts = [r for r in api.recorder.take() if (r.method, r.path) == ("POST", "/v1/files")]
    assert len(posts) == 1
    assert client.files.get(first.id).filename == "invoice.pdf"
    assert [f.id for f in client.files.list()] == [first.id]


def test_large_file_goes_through_the_presigned_flow(api: Api, tmp_path: Path) -> None:
    """Over 32 MiB the SDK asks for a presigned URL, PUTs the bytes there and verifies; the
    simulator accepts that and the file is then known by id and hash."""
    big = tmp_path / "scan.pdf"
    big.write_bytes(os.urandom(DIRECT_UPLOAD_MAX + 1024))
    client = api.sdk()
    uploaded = client.files.upload(big)
    assert uploaded.bytes == big.stat().st_size
    paths = [(r.method, r.path.split("/")[1:3]) for r in api.recorder.take()]
    assert ("POST", ["v1", "files"]) not in paths[:1] and ("PUT", ["uploads", uploaded.id]) in paths
    assert client.files.get(uploaded.id).id == uploaded.id
    md5 = hashlib.md5(big.read_bytes(), usedforsecurity=False).hexdigest()
    assert client.files.get_cached_file(big) is not None
    assert (
        httpx.get(f"{api.url}/files/hash/{md5}", headers={"Authorization": f"Bearer {KEY}"}).json()[
            "id"
        ]
        == uploaded.id
    )


def test_direct_upload_over_32_mib_is_refused(api: Api, tmp_path: Path) -> None:
    """A direct upload the SDK would never send (over 32 MiB) gets 413, as a proxy answers."""
    big = tmp_path / "scan.pdf"
    big.write_bytes(os.urandom(DIRECT_UPLOAD_MAX + 1024))
    client = api.sdk()
    with pytest.raises(APIError) as refused:
        client.files.upload(big, method="direct")
    assert refused.value.http_status == 413 and "presigned" in str(refused.value)


@pytest.mark.parametrize(
    "domain",
    ["document.invoice", "document.receipt", "document.resume", "document.us-drivers-license"],
)
def test_document_generate_sync_answers_a_hub_valid_prediction(
    api: Api, tmp_path: Path, domain: str
) -> None:
    """batch=false answers the finished prediction; its response is a valid hub instance."""
    doc = tmp_path / "doc.pdf"
    doc.write_bytes(b"%PDF-1.4 " + os.urandom(512))
    prediction = api.sdk().document.generate(file=doc, domain=domain, batch=False)
    assert prediction.status == "completed" and prediction.usage.element_type == "page"
    hub_instance(domain, prediction.response)


def test_markdown_is_cast_to_the_sdks_markdown_document(api: Api) -> None:
    """document.markdown answers pages the SDK turns into its MarkdownDocument."""
    client = api.sdk()
    created = client.document.generate(url="https://example.com/r.pdf", domain="document.markdown")
    assert isinstance(created.response, MarkdownDocument) and created.response.pages
    again = client.predictions.get(created.id)
    assert isinstance(again.response, MarkdownDocument)


def test_image_generate_from_pixels_and_from_urls(api: Api) -> None:
    """/image/generate takes `images` as data URLs (from PIL) or http(s) URLs."""
    client = api.sdk()
    pixels = Image.new("RGB", (32, 24), (200, 30, 30))
    from_pixels = client.image.generate(domain="document.receipt", images=[pixels])
    hub_instance("document.receipt", from_pixels.response)
    from_url = client.image.generate(domain="document.receipt", urls=["https://x.test/r.jpg"])
    assert from_url.status == "completed" and from_url.usage.element_type == "image"
    bodies = [orjson.loads(r.body) for r in api.recorder.take() if r.path == "/v1/image/generate"]
    assert bodies[0]["images"][0].startswith("data:image/jpeg;base64,")
    assert bodies[1]["images"] == ["https://x.test/r.jpg"]


def test_image_generate_refuses_a_file_id(api: Api) -> None:
    """`file_id` is not an input of /image/generate: the simulator answers 422 naming it."""
    answer = httpx.post(
        f"{api.url}/image/generate",
        json={"file_id": "f", "domain": "document.receipt"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert answer.status_code == 422
    assert ["body", "file_id"] in [issue["loc"] for issue in answer.json()["detail"]]


@pytest.mark.parametrize("kind", ["audio", "video"])
def test_audio_and_video_batch_then_wait(api: Api, kind: str) -> None:
    """batch=true answers pending (usage an object); predictions.wait polls it to completed."""
    client = api.sdk()
    resource = getattr(client, kind)
    created = resource.generate(
        url=f"https://example.com/a.{kind}", domain=f"{kind}.transcription", batch=True
    )
    assert created.status == "pending" and created.usage.credits_used is None
    done = client.predictions.wait(created.id, timeout=10, sleep=0.05)  # type: ignore[arg-type]
    assert done.status == "completed" and done.usage.element_type == kind
    assert done.response["segments"]
    assert created.id in [p.id for p in client.predictions.list(limit=5)]


def test_callbacks_verify_with_the_sdk_and_parse_in_every_status(
    asgi_server: Any, webhook_server: WebhookServer
) -> None:
    """Intermediate, completed and failed callbacks verify with the SDK's verify_webhook (in
    either header) and parse as its PredictionResponse; polls of a failed job do too."""
    for header, fail in (("X-VLMRun-Signature", 0.0), ("X-VLM-Signature", 1.0)):
        options = SimulatorOptions(
            api_key=KEY,
            webhook_secret=SECRET,
            delay=0.02,
            intermediate=True,
            fail_rate=fail,
            signature_header=header,
        )
        base = asgi_server(create_simulator_app(options)) + "/v1"
        client = VLMRun(api_key=KEY, base_url=base, max_retries=1)
        hook = webhook_server.endpoint()
        created = client.document.generate(
            url="https://example.com/i.pdf",
            domain="document.invoice",
            batch=True,
            callback_url=hook,
        )
        calls = wait_for_callbacks(webhook_server, hook, 2)
        statuses = []
        for call in calls:
            assert verify_webhook(call.body, call.headers[header.lower()], SECRET)
            statuses.append(PredictionResponse.model_validate_json(call.body).status)
        assert statuses == ["running", "failed" if fail else "completed"]
        assert client.predictions.get(created.id).status == statuses[-1]


# --- The receiver's client against the SDK, request by request. ---


def sdk_and_client_requests(
    api: Api, sdk_call: Any, client_call: Any, ours_api: Api | None = None
) -> tuple[list[Recorded], list[Recorded]]:
    """The requests the SDK sent for `sdk_call`, and those the client sent for `client_call`
    (to `ours_api` when given: a simulator that has not seen the SDK's files)."""
    sdk_call(api.sdk())
    sdk_requests = [r for r in api.recorder.take() if r.path != "/v1/health"]
    ours_api = ours_api or api

    async def ours() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            await client_call(VlmRunClient(http, ours_api.url, KEY))

    asyncio.run(ours())
    return sdk_requests, ours_api.recorder.take()


def test_client_generate_body_matches_the_sdk(api: Api, tmp_path: Path) -> None:
    """A batch submission by file_id is the SDK's body field for field, config and metadata
    included (with allow_training as the service is configured: the same value here)."""
    callback = "https://hooks.example.com/callbacks/vlmrun/tok"
    doc = tmp_path / "a.pdf"
    doc.write_bytes(b"%PDF-1.4 " + os.urandom(64))
    file_id = api.sdk().files.upload(doc).id
    api.recorder.take()

    def sdk(client: VLMRun) -> None:
        client.document.generate(
            file=file_id, domain="document.invoice", batch=True, callback_url=callback
        )

    async def mine(client: VlmRunClient) -> None:
        body = generate_request(
            "document.invoice",
            {"file_id": file_id},
            callback,
            GenerationConfig(),
            RequestMetadata(allow_training=True),
        )
        await client.generate("document", body)

    theirs, ours = sdk_and_client_requests(api, sdk, mine)
    assert [(r.method, r.path) for r in ours] == [(r.method, r.path) for r in theirs]
    assert orjson.loads(ours[0].body) == orjson.loads(theirs[0].body)
    assert ours[0].headers["authorization"] == theirs[0].headers["authorization"]


def test_client_image_url_body_matches_the_sdk(api: Api) -> None:
    """An image by URL goes to /image/generate as `images`, the SDK's body field for field."""
    callback = "https://hooks.example.com/callbacks/vlmrun/tok"
    config = {"prompt": "Read the total", "temperature": 0.2}

    def sdk(client: VLMRun) -> None:
        from vlmrun.client.types import GenerationConfig as SdkConfig
        from vlmrun.client.types import RequestMetadata as SdkMetadata

        client.image.generate(
            domain="document.receipt",
            urls=["https://x.test/r.jpg"],
            batch=True,
            callback_url=callback,
            config=SdkConfig(**config),
            metadata=SdkMetadata(allow_training=False, environment="prod"),
        )

    async def mine(client: VlmRunClient) -> None:
        body = generate_request(
            "document.receipt",
            {"images": ["https://x.test/r.jpg"]},
            callback,
            GenerationConfig(**config),
            RequestMetadata(allow_training=False, environment="prod"),
        )
        await client.generate("image", body)

    theirs, ours = sdk_and_client_requests(api, sdk, mine)
    assert [r.path for r in ours] == [r.path for r in theirs] == ["/v1/image/generate"]
    assert orjson.loads(ours[0].body) == orjson.loads(theirs[0].body)


def test_client_uploads_like_the_sdk_small_large_and_known(
    api: Api, asgi_server: Any, tmp_path: Path
) -> None:
    """Upload: the hash check first, then one multipart POST (small) or presigned URL, PUT and
    verify (over 32 MiB); a file the API knows is not sent again. Same requests as the SDK."""
    small = tmp_path / "small.pdf"
    small.write_bytes(os.urandom(4096))
    big = tmp_path / "big.pdf"
    big.write_bytes(os.urandom(DIRECT_UPLOAD_MAX + 10))

    def sdk(client: VLMRun) -> None:
        client.files.upload(small, force=True)
        client.files.upload(big, force=True)

    async def mine(client: VlmRunClient) -> None:
        for path in (small, big):
            with path.open("rb") as f:
                await client.upload(path.name, f, "application/pdf")
        with small.open("rb") as f:  # known now: found by hash, not uploaded again
            await client.upload(small.name, f, "application/pdf")

    fresh = Recorder(create_simulator_app(OPTIONS))
    fresh_api = Api(asgi_server(fresh) + "/v1", fresh, fresh.app)
    theirs, ours = sdk_and_client_requests(api, sdk, mine, fresh_api)
    steps = [
        ("GET", "/v1/files/hash/"),
        ("POST", "/v1/files"),
        ("GET", "/v1/files/hash/"),
        ("POST", "/v1/files/presigned-url"),
        ("PUT", "/uploads/"),
        ("GET", "/v1/files/verify-upload/"),
    ]
    assert [step(r) for r in theirs] == steps
    assert [step(r) for r in ours] == [*steps, ("GET", "/v1/files/hash/")]
    for mine_, sdks in zip(ours, theirs, strict=False):
        assert mine_.query == sdks.query or mine_.method == "PUT"  # a new URL per upload
        if mine_.path == "/v1/files/presigned-url":
            assert orjson.loads(mine_.body) == orjson.loads(sdks.body)
        if mine_.method == "PUT":
            assert mine_.body == sdks.body == big.read_bytes()
            assert "authorization" not in mine_.headers  # the API key never goes to storage
            assert mine_.headers["content-type"] == sdks.headers["content-type"]
        if (mine_.method, mine_.path) == ("POST", "/v1/files"):
            assert small.read_bytes() in mine_.body and small.read_bytes() in sdks.body
            assert b'name="file"; filename="small.pdf"' in mine_.body
    assert ours[-1].path == ours[0].path  # the known file: its hash looked up, nothing sent


def step(request: Recorded) -> tuple[str, str]:
    """A request's method and path without its ids."""
    path = request.path
    for prefix in ("/v1/files/hash/", "/uploads/", "/v1/files/verify-upload/"):
        if path.startswith(prefix):
            return request.method, prefix
    return request.method, path


def test_client_get_prediction_matches_the_sdk(api: Api) -> None:
    """Reading a prediction is the same GET as the SDK's."""
    created = api.sdk().document.generate(url="https://e.test/a.pdf", domain="document.invoice")
    api.recorder.take()

    async def mine(client: VlmRunClient) -> None:
        assert (await client.get_prediction(created.id))["status"] == "completed"

    theirs, ours = sdk_and_client_requests(api, lambda c: c.predictions.get(created.id), mine)
    assert [(r.method, r.path, r.query, r.body) for r in ours] == [
        (r.method, r.path, r.query, r.body) for r in theirs
    ]


def test_every_hub_domain_answers_a_valid_instance(api: Api) -> None:
    """Every domain the hub publishes gets a completed response valid under its schema."""
    client = api.sdk()
    for domain in registry.list_schemas():
        prediction = client.document.generate(url="https://e.test/a.pdf", domain=domain)
        hub_instance(domain, prediction.response)
