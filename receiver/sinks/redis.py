"""Redis Streams sink: XADD one entry per event to `config.stream` (default `receiver.events`).

Entry fields: `id` (the event id: consumers deduplicate on it, since a retried XADD after a lost
reply adds a second entry), `type` and `body` (the JSON envelope bytes). With `maxlen` set the
stream is trimmed approximately (`MAXLEN ~ n`), which Redis does cheaply in whole nodes.

The stream name does not come from the URL: a redis:// URL's path is the database number.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from receiver.config import SinkConfig
from receiver.errors import SinkError
from receiver.sinks import Message, Receipt

DEFAULT_STREAM = "receiver.events"


class RedisSink:
    def __init__(self, config: SinkConfig) -> None:
        self.name = config.name
        self._url = config.url
        self._timeout = config.timeout
        self._stream = config.stream or DEFAULT_STREAM
        self._maxlen = config.maxlen
        self._password = urlsplit(config.url).password
        self._client: aioredis.Redis | None = None

    def _redis(self) -> aioredis.Redis:
        # from_url only builds a pool: connections are made by the first command.
        if self._client is None:
            self._client = aioredis.from_url(
                self._url,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                health_check_interval=30,  # notice a connection the server dropped while idle
            )
        return self._client

    async def send(self, message: Message) -> Receipt:
        try:
            entry = await self._redis().xadd(
                self._stream,
                {"id": message.event_id, "type": message.event_type, "body": message.body},
                maxlen=self._maxlen,
                approximate=True,
            )
        except (RedisError, OSError) as exc:  # redis-py raises its own errors, and OSError
            raise SinkError(f"sink {self.name}: {self._describe(exc)}") from exc
        entry_id = entry.decode() if isinstance(entry, bytes) else str(entry)
        return Receipt(snippet=f"{self._stream} {entry_id}")

    def _describe(self, exc: BaseException) -> str:
        # The type names the failure when the message is empty (e.g. a bare TimeoutError).
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return text.replace(self._password, "***") if self._password else text

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
