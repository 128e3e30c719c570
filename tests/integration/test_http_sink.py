"""The HTTP sink against a real local consumer; the standardwebhooks library checks signatures."""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from email.utils import formatdate

import orjson
import pytest
from standardwebhooks import Webhook

from receiver.config import SinkConfig
from receiver.errors import SinkError
from receiver.sinks import Message, Receipt
from receiver.sinks.http import HttpSink


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def new_message() -> Message:
    event_id = f"evt_{uuid.uuid4().hex}"
    body = orjson.dumps({"id": event_id, "type": "prediction.completed", "text": "héllo ✓"})
    return Message(event_id=event_id, event_type="prediction.completed", body=body)


async def send_once(config: SinkConfig, message: Message) -> Receipt:
    sink = HttpSink(config)
    try:
        return await sink.send(message)
    finally:
        await sink.close()


async def send_expecting_error(config: SinkConfig, message: Message) -> SinkError:
    with pytest.raises(SinkError) as info:
        await send_once(config, message)
    return info.value


async def test_signature_verifies_with_standardwebhooks(webhook_server) -> None:
    """A consumer holding the secret verifies the delivery with the reference library."""
    secret = new_secret()
    url = webhook_server.endpoint(body=b'{"ok":true}')
    message = new_message()

    receipt = await send_once(SinkConfig(name="t", url=url, secret=secret), message)

    assert receipt == Receipt(status_code=200, snippet='{"ok":true}')
    [request] = webhook_server.received(url)
    assert request.body == message.body
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == message.event_id
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 5
    assert Webhook(secret).verify(request.body, request.headers) == orjson.loads(message.body)


async def test_wrong_secret_does_not_verify(webhook_server) -> None:
    """A consumer with a different secret rejects the delivery."""
    url = webhook_server.endpoint()
    await send_once(SinkConfig(name="t", url=url, secret=new_secret()), new_message())

    [request] = webhook_server.received(url)
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(new_secret()).verify(request.body, request.headers)


async def test_rotation_signs_with_every_secret_newest_first(webhook_server) -> None:
    """During a rotation a consumer holding either the new or the old secret verifies."""
    new, old = new_secret(), new_secret()
    url = webhook_server.endpoint()
    config = SinkConfig(name="t", url=url, secret=new, secrets=[old])

    await send_once(config, new_message())

    [request] = webhook_server.received(url)
    entries = request.headers["webhook-signature"].split(" ")
    assert len(entries) == 2
    assert all(entry.startswith("v1,") for entry in entries)
    assert Webhook(new).verify(request.body, request.headers)
    assert Webhook(old).verify(request.body, request.headers)
    # newest first: the first entry verifies alone with the new secret
    first_only = {**request.headers, "webhook-signature": entries[0]}
    assert Webhook(new).verify(request.body, first_only)


async def test_custom_headers_are_sent(webhook_server) -> None:
    """The sink's configured headers reach the consumer alongside the signature headers."""
    url = webhook_server.endpoint()
    config = SinkConfig(name="t", url=url, secret=new_secret(), headers={"x-tenant": "acme"})

    await send_once(config, new_message())

    [request] = webhook_server.received(url)
    assert request.headers["x-tenant"] == "acme"
    assert "webhook-signature" in request.headers


async def test_resend_keeps_webhook_id_and_body_bytes(webhook_server) -> None:
    """Two sends of one message carry the same webhook-id and identical body bytes."""
    url = webhook_server.endpoint()
    secret = new_secret()
    message = new_message()
    sink = HttpSink(SinkConfig(name="t", url=url, secret=secret))
    try:
        await sink.send(message)
        await sink.send(message)
    finally:
        await sink.close()

    first, second = webhook_server.received(url)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == message.event_id
    assert first.body == second.body == message.body
    assert Webhook(secret).verify(second.body, second.headers)


async def test_429_retry_after_seconds(webhook_server) -> None:
    """429 with `Retry-After: 7` is retryable with retry_after=7."""
    url = webhook_server.endpoint(429, b"slow down", {"retry-after": "7"})

    err = await send_expecting_error(
        SinkConfig(name="t", url=url, secret=new_secret()), new_message()
    )

    assert err.status_code == 429
    assert err.retry_after == 7
    assert not err.permanent and not err.disable_sink
    assert err.snippet == "slow down"


async def test_503_retry_after_http_date(webhook_server) -> None:
    """503 with an HTTP-date `Retry-After` gives the seconds until that date."""
    when = formatdate(time.time() + 120, usegmt=True)
    url = webhook_server.endpoint(503, b"maintenance", {"retry-after": when})

    err = await send_expecting_error(
        SinkConfig(name="t", url=url, secret=new_secret()), new_message()
    )

    assert err.status_code == 503
    assert err.retry_after is not None and 115 <= err.retry_after <= 121
    assert not err.permanent


async def test_410_is_permanent_and_disables_the_sink(webhook_server) -> None:
    """410 Gone is permanent and asks the dispatcher to disable the sink."""
    url = webhook_server.endpoint(410, b"endpoint removed")

    err = await send_expecting_error(
        SinkConfig(name="t", url=url, secret=new_secret()), new_message()
    )

    assert err.status_code == 410
    assert err.permanent and err.disable_sink
    assert err.snippet == "endpoint removed"


async def test_500_is_retryable_with_snippet(webhook_server) -> None:
    """500 is retryable and carries the start of the answer, at most 512 characters."""
    url = webhook_server.endpoint(500, b"database exploded " + b"x" * 10_000)

    err = await send_expecting_error(
        SinkConfig(name="t", url=url, secret=new_secret()), new_message()
    )

    assert err.status_code == 500
    assert not err.permanent and err.retry_after is None
    assert err.snippet.startswith("database exploded")
    assert len(err.snippet) == 512


async def test_other_4xx_is_retryable_with_status(webhook_server) -> None:
    """A 400 is retried (the consumer's bug may be fixed) and keeps its status code."""
    url = webhook_server.endpoint(400, b"bad field")

    err = await send_expecting_error(
        SinkConfig(name="t", url=url, secret=new_secret()), new_message()
    )

    assert err.status_code == 400
    assert not err.permanent and not err.disable_sink
    assert err.snippet == "bad field"


async def test_hang_past_timeout_is_retryable(webhook_server) -> None:
    """A consumer that answers after the timeout gives a retryable error without a status."""
    url = webhook_server.endpoint(delay=3)
    config = SinkConfig(name="t", url=url, secret=new_secret(), timeout=0.3)

    started = time.monotonic()
    err = await send_expecting_error(config, new_message())

    assert time.monotonic() - started < 2
    assert err.status_code is None
    assert not err.permanent


async def test_connection_refused_is_retryable() -> None:
    """Nobody listening gives a retryable error without a status, chained to the driver's."""
    config = SinkConfig(name="t", url="http://127.0.0.1:1/hook", secret=new_secret(), timeout=2)

    err = await send_expecting_error(config, new_message())

    assert err.status_code is None
    assert not err.permanent
    assert err.__cause__ is not None


async def test_errors_never_contain_secrets(webhook_server) -> None:
    """Neither the signing secret, a header value nor a URL token appears in an error."""
    secret, token, auth = new_secret(), "tok_" + uuid.uuid4().hex, "Bearer " + uuid.uuid4().hex
    failing = webhook_server.endpoint(500, b"boom")
    urls = [f"{failing}?token={token}", f"http://127.0.0.1:1/hooks/{token}"]
    for url in urls:
        config = SinkConfig(
            name="t", url=url, secret=secret, headers={"authorization": auth}, timeout=2
        )
        err = await send_expecting_error(config, new_message())
        text = f"{err} {err.reason} {err.snippet}"
        for value in (secret, secret.removeprefix("whsec_"), token, auth):
            assert value not in text


async def test_large_answer_is_cut_and_next_send_works(webhook_server) -> None:
    """A 2xx with a large body gives a 512-character snippet, and the sink keeps working."""
    url = webhook_server.endpoint(body=b"y" * 200_000)
    sink = HttpSink(SinkConfig(name="t", url=url, secret=new_secret()))
    try:
        first = await sink.send(new_message())
        second = await sink.send(new_message())
    finally:
        await sink.close()

    assert first.status_code == second.status_code == 200
    assert first.snippet == "y" * 512
    assert len(webhook_server.received(url)) == 2


async def test_concurrency_limits_and_reuses_connections(webhook_server) -> None:
    """200 concurrent sends all arrive over at most `concurrency` kept-alive connections."""
    url = webhook_server.endpoint()
    sink = HttpSink(SinkConfig(name="t", url=url, secret=new_secret(), concurrency=8))
    messages = [new_message() for _ in range(200)]
    try:
        receipts = await asyncio.gather(*(sink.send(m) for m in messages))
    finally:
        await sink.close()

    assert all(r.status_code == 200 for r in receipts)
    received = webhook_server.received(url)
    assert sorted(r.headers["webhook-id"] for r in received) == sorted(m.event_id for m in messages)
    assert len({r.client_port for r in received}) <= 8


async def test_a_nul_in_the_answer_is_kept_as_a_replacement_character(webhook_server) -> None:
    """A consumer answering NUL bytes leaves a snippet PostgreSQL can store (NUL -> U+FFFD)."""
    url = webhook_server.endpoint(body=b"ok\x00done")
    receipt = await send_once(SinkConfig(name="t", url=url, secret=new_secret()), new_message())
    assert receipt.snippet == "ok\ufffddone"
