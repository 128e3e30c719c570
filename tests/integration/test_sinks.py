"""One contract for every sink kind, run against the real servers on this machine.

Each harness builds a SinkConfig with names unique to the test, and reads back from the real
far side (XRANGE, JetStream get, AMQP basic.get, the consumer's recorded requests, the file)
what arrived, as (event id, body bytes) pairs in arrival order.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import nats
import nats.js.errors
import orjson
import pytest
import redis.asyncio as aioredis

from receiver.config import SinkConfig
from receiver.errors import ConfigError, SinkError
from receiver.sinks import Message, Receipt, open_sink
from receiver.sinks.nats import stream_name_for

REDIS = ("127.0.0.1", 6379, "Redis")
NATS = ("127.0.0.1", 4222, "NATS")
RABBITMQ = ("127.0.0.1", 5672, "RabbitMQ")
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
KINDS = ["http", "redis", "nats", "amqp", "file"]

Arrived = list[tuple[str, bytes]]


@dataclass
class Harness:
    config: SinkConfig
    read: Callable[[], Awaitable[Arrived]]  # everything that arrived so far, in order


def new_message(size: int = 0) -> Message:
    event_id = f"evt_{uuid.uuid4().hex}"
    body = orjson.dumps(
        {"id": event_id, "type": "prediction.completed", "text": "héllo ✓", "pad": "x" * size}
    )
    return Message(event_id=event_id, event_type="prediction.completed", body=body)


def unique(prefix: str = "test") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def http_harness(webhook_server: Any, **_: Any) -> AsyncIterator[Harness]:
    url = webhook_server.endpoint()
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()

    async def read() -> Arrived:
        return [(r.headers["webhook-id"], r.body) for r in webhook_server.received(url)]

    yield Harness(SinkConfig(name="t", url=url, secret=secret), read)


@asynccontextmanager
async def redis_harness(require_service: Any, **_: Any) -> AsyncIterator[Harness]:
    require_service(*REDIS)
    stream = unique()
    client = aioredis.Redis(host=REDIS[0], port=REDIS[1])

    async def read() -> Arrived:
        entries = await client.xrange(stream)
        return [(fields[b"id"].decode(), fields[b"body"]) for _, fields in entries]

    try:
        yield Harness(SinkConfig(name="t", url="redis://127.0.0.1:6379/0", stream=stream), read)
    finally:
        await client.delete(stream)
        await client.aclose()


@asynccontextmanager
async def nats_harness(require_service: Any, **_: Any) -> AsyncIterator[Harness]:
    require_service(*NATS)
    subject = unique()
    nc = await nats.connect("nats://127.0.0.1:4222")
    js = nc.jetstream()

    async def read() -> Arrived:
        try:
            stream = await js.find_stream_name_by_subject(subject)
        except nats.js.errors.NotFoundError:
            return []
        state = (await js.stream_info(stream)).state
        arrived = []
        for seq in range(state.first_seq, state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            arrived.append((msg.headers["Nats-Msg-Id"], msg.data))
        return arrived

    try:
        yield Harness(SinkConfig(name="t", url="nats://127.0.0.1:4222", subject=subject), read)
    finally:
        with suppress(nats.js.errors.NotFoundError):  # nothing was sent: no stream
            await js.delete_stream(stream_name_for(subject))
        await nc.close()


@asynccontextmanager
async def amqp_harness(require_service: Any, **_: Any) -> AsyncIterator[Harness]:
    require_service(*RABBITMQ)
    queue_name = unique()
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    arrived: Arrived = []  # basic.get consumes, so keep what was read

    async def read() -> Arrived:
        queue = await channel.declare_queue(queue_name, durable=True)
        while (msg := await queue.get(no_ack=True, fail=False)) is not None:
            arrived.append((str(msg.message_id), msg.body))
        return list(arrived)

    try:
        config = SinkConfig(name="t", url=AMQP_URL, routing_key=queue_name)
        yield Harness(config, read)
    finally:
        await channel.queue_delete(queue_name)
        await connection.close()


@asynccontextmanager
async def file_harness(tmp_path: Path, **_: Any) -> AsyncIterator[Harness]:
    path = tmp_path / "events.jsonl"

    async def read() -> Arrived:
        lines = path.read_bytes().splitlines() if path.exists() else []
        return [(orjson.loads(line)["id"], line) for line in lines]

    yield Harness(SinkConfig(name="t", url=f"file://{path}"), read)


HARNESSES = {
    "http": http_harness,
    "redis": redis_harness,
    "nats": nats_harness,
    "amqp": amqp_harness,
    "file": file_harness,
}


@pytest.fixture(params=KINDS)
async def harness(
    request: pytest.FixtureRequest, tmp_path: Path, require_service: Any
) -> AsyncIterator[Harness]:
    webhook_server = request.getfixturevalue("webhook_server") if request.param == "http" else None
    build = HARNESSES[request.param]
    async with build(
        webhook_server=webhook_server, require_service=require_service, tmp_path=tmp_path
    ) as h:
        yield h


@pytest.fixture
async def sink(harness: Harness) -> AsyncIterator[Any]:
    s = open_sink(harness.config)
    yield s
    await s.close()


# ---- the contract -----------------------------------------------------------------------


async def test_send_delivers_body_and_id(harness: Harness, sink: Any) -> None:
    """After send() returns, the far side holds the exact body bytes under the event id."""
    message = new_message()

    receipt = await sink.send(message)

    assert isinstance(receipt, Receipt)
    assert await harness.read() == [(message.event_id, message.body)]


async def test_sequential_sends_arrive_in_order(harness: Harness, sink: Any) -> None:
    """Messages sent one after another arrive in that order."""
    messages = [new_message() for _ in range(5)]

    for message in messages:
        await sink.send(message)

    assert await harness.read() == [(m.event_id, m.body) for m in messages]


async def test_resend_keeps_id_and_bytes(harness: Harness, sink: Any) -> None:
    """Sending one message twice (a retry) never changes its id or bytes; NATS keeps one copy."""
    message = new_message()

    await sink.send(message)
    await sink.send(message)

    arrived = await harness.read()
    assert 1 <= len(arrived) <= 2
    assert set(arrived) == {(message.event_id, message.body)}


async def test_large_body_arrives_intact(harness: Harness, sink: Any) -> None:
    """A 200 kB body arrives byte for byte."""
    message = new_message(size=200_000)

    await sink.send(message)

    assert await harness.read() == [(message.event_id, message.body)]


async def test_concurrent_sends_all_arrive(harness: Harness, sink: Any) -> None:
    """64 concurrent sends through one sink all arrive, each intact (no interleaving)."""
    messages = [new_message(size=i * 50) for i in range(64)]

    await asyncio.gather(*(sink.send(m) for m in messages))

    assert sorted(await harness.read()) == sorted((m.event_id, m.body) for m in messages)


async def test_close_then_send_reconnects(harness: Harness, sink: Any) -> None:
    """close() releases the connection; a later send connects again; close twice is harmless."""
    first, second = new_message(), new_message()

    await sink.send(first)
    await sink.close()
    await sink.send(second)
    await sink.close()
    await sink.close()

    assert await harness.read() == [(first.event_id, first.body), (second.event_id, second.body)]


async def test_close_before_any_send(harness: Harness) -> None:
    """A sink that never sent connects to nothing and closes cleanly."""
    sink = open_sink(harness.config)

    await sink.close()

    assert await harness.read() == []


UNREACHABLE = {
    "http": "http://127.0.0.1:1/hook",
    "redis": "redis://:s3cr3t-pw@127.0.0.1:1/0",
    "nats": "nats://user:s3cr3t-pw@127.0.0.1:1",
    "amqp": "amqp://guest:s3cr3t-pw@127.0.0.1:1/",
    "file": "file:///nonexistent-dir-for-receiver-tests/events.jsonl",
}


@pytest.mark.parametrize("kind", KINDS)
async def test_unreachable_far_side_is_retryable(kind: str) -> None:
    """Nothing listening (or no directory) gives a retryable SinkError that names no password."""
    config = SinkConfig(
        name="t",
        url=UNREACHABLE[kind],
        timeout=1,
        secret="whsec_" + "A" * 44 if kind == "http" else None,
    )
    sink = open_sink(config)
    try:
        with pytest.raises(SinkError) as info:
            await asyncio.wait_for(sink.send(new_message()), 10)
    finally:
        await sink.close()

    err = info.value
    assert not err.permanent and not err.disable_sink
    assert err.status_code is None
    assert err.__cause__ is not None
    assert "s3cr3t-pw" not in str(err)


# ---- kind-specific behaviour --------------------------------------------------------------


async def test_redis_entry_fields_and_approximate_trim(require_service: Any) -> None:
    """Redis entries carry id, type and body; `maxlen` trims the stream approximately."""
    require_service(*REDIS)
    stream = unique()
    client = aioredis.Redis(host=REDIS[0], port=REDIS[1])
    sink = open_sink(SinkConfig(name="t", url="redis://127.0.0.1:6379/0", stream=stream, maxlen=10))
    try:
        for _ in range(500):
            await sink.send(new_message())
        last = new_message()
        await sink.send(last)
        length = await client.xlen(stream)
        [(_, fields)] = await client.xrevrange(stream, count=1)
    finally:
        await sink.close()
        await client.delete(stream)
        await client.aclose()

    assert 10 <= length < 500
    assert fields == {
        b"id": last.event_id.encode(),
        b"type": b"prediction.completed",
        b"body": last.body,
    }


async def test_nats_creates_stream_only_when_none_covers_subject(require_service: Any) -> None:
    """The sink creates RECEIVER_<SUBJECT> only when no stream covers the subject yet."""
    require_service(*NATS)
    nc = await nats.connect("nats://127.0.0.1:4222")
    js = nc.jetstream()
    own_subject, covered_subject = unique(), unique()
    existing = "TEST_" + uuid.uuid4().hex[:12].upper()
    await js.add_stream(name=existing, subjects=[covered_subject])
    try:
        for subject in (own_subject, covered_subject):
            sink = open_sink(SinkConfig(name="t", url="nats://127.0.0.1:4222", subject=subject))
            await sink.send(new_message())
            await sink.close()

        assert await js.find_stream_name_by_subject(own_subject) == stream_name_for(own_subject)
        assert (await js.stream_info(existing)).state.messages == 1
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.stream_info(stream_name_for(covered_subject))
    finally:
        await js.delete_stream(existing)
        await js.delete_stream(stream_name_for(own_subject))
        await nc.close()


async def test_nats_duplicate_publish_is_acked_as_duplicate(require_service: Any) -> None:
    """A retried publish within JetStream's window is acknowledged as a duplicate, stored once."""
    require_service(*NATS)
    subject = unique()
    sink = open_sink(SinkConfig(name="t", url="nats://127.0.0.1:4222", subject=subject))
    message = new_message()
    nc = await nats.connect("nats://127.0.0.1:4222")
    try:
        first = await sink.send(message)
        second = await sink.send(message)
        state = (await nc.jetstream().stream_info(stream_name_for(subject))).state
    finally:
        await sink.close()
        await nc.jetstream().delete_stream(stream_name_for(subject))
        await nc.close()

    assert "duplicate" not in first.snippet
    assert "duplicate" in second.snippet
    assert state.messages == 1


async def test_amqp_message_properties(require_service: Any) -> None:
    """AMQP messages are persistent JSON with message_id and type set."""
    require_service(*RABBITMQ)
    queue_name = unique()
    sink = open_sink(SinkConfig(name="t", url=AMQP_URL, routing_key=queue_name))
    message = new_message()
    connection = await aio_pika.connect(AMQP_URL)
    try:
        await sink.send(message)
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)
        got = await queue.get(no_ack=True)
        await channel.queue_delete(queue_name)
    finally:
        await sink.close()
        await connection.close()

    assert got.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert got.content_type == "application/json"
    assert got.message_id == message.event_id
    assert got.type == message.event_type
    assert got.body == message.body


async def test_amqp_unroutable_is_an_error(require_service: Any) -> None:
    """A message an exchange routes to no queue is returned and reported, not lost silently."""
    require_service(*RABBITMQ)
    config = SinkConfig(name="t", url=AMQP_URL, exchange="amq.direct", routing_key=unique())
    sink = open_sink(config)
    try:
        with pytest.raises(SinkError, match="unroutable") as info:
            await sink.send(new_message())
    finally:
        await sink.close()
    assert not info.value.permanent


async def test_amqp_missing_exchange_is_an_error(require_service: Any) -> None:
    """A named exchange that does not exist is reported (the sink never creates one)."""
    require_service(*RABBITMQ)
    config = SinkConfig(name="t", url=AMQP_URL, exchange=unique("missing"), routing_key="x")
    sink = open_sink(config)
    try:
        with pytest.raises(SinkError):
            await sink.send(new_message())
    finally:
        await sink.close()


async def test_file_body_with_newline_is_permanent(tmp_path: Path) -> None:
    """A body containing a newline cannot be one JSONL line: permanent error, nothing written."""
    path = tmp_path / "events.jsonl"
    sink = open_sink(SinkConfig(name="t", url=f"file://{path}"))
    try:
        with pytest.raises(SinkError) as info:
            await sink.send(Message("evt_1", "prediction.completed", b'{\n"id": "evt_1"}'))
    finally:
        await sink.close()
    assert info.value.permanent
    assert not path.exists()


async def test_missing_driver_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sink whose driver is not installed fails with a ConfigError naming the extra to install."""
    monkeypatch.delitem(sys.modules, "receiver.sinks.redis", raising=False)
    monkeypatch.setitem(sys.modules, "redis", None)  # makes `import redis` fail
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)

    with pytest.raises(
        ConfigError, match=r"sink t needs the redis driver: pip install 'receiver\[redis\]'"
    ):
        open_sink(SinkConfig(name="t", url="redis://127.0.0.1:6379/0"))
