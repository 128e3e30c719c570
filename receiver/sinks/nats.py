"""NATS JetStream sink: publish to `config.subject` (default `receiver.events`), wait for the ack.

Each message carries the header `Nats-Msg-Id` = event id, so JetStream drops a retried publish
within its duplicate window (2 minutes by default) and answers it with `duplicate=True`.

Stream creation: on first connect, if no stream captures the subject, the sink creates one
(file storage, the server's default limits), named `RECEIVER` for the default subject and
`RECEIVER_<SUBJECT>` otherwise (dots and other characters not allowed in a name become `_`).
A core NATS publish with no stream behind it would be acknowledged by nobody and lost, so this
makes the first run work; in production create the stream yourself to choose its retention,
limits and replicas: the sink then only uses it.
"""

from __future__ import annotations

import asyncio
import math
import re
from urllib.parse import urlsplit

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from receiver.config import SinkConfig
from receiver.errors import SinkError
from receiver.sinks import Message, Receipt

DEFAULT_SUBJECT = "receiver.events"
DEFAULT_STREAM = "RECEIVER"

log = structlog.get_logger(__name__)


def stream_name_for(subject: str) -> str:
    """The stream the sink creates for `subject` when none exists."""
    if subject == DEFAULT_SUBJECT:
        return DEFAULT_STREAM
    return f"{DEFAULT_STREAM}_{re.sub(r'[^A-Za-z0-9_-]', '_', subject).upper()}"


class NatsSink:
    def __init__(self, config: SinkConfig) -> None:
        self.name = config.name
        self._url = config.url
        self._timeout = config.timeout
        self._subject = config.subject or DEFAULT_SUBJECT
        self._password = urlsplit(config.url).password
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        # 64 concurrent first sends must make one connection, not 64.
        self._connecting = asyncio.Lock()

    async def _jetstream(self) -> JetStreamContext:
        if self._js is None:
            async with self._connecting:
                if self._js is None:
                    self._js = await self._connect()
        return self._js

    async def _connect(self) -> JetStreamContext:
        nc = NATS()
        try:
            # Reconnect forever once connected (publishes then time out and are retried by the
            # dispatcher); but nats-py would also retry the *first* connect for minutes, so
            # bound that one by the sink's timeout.
            await asyncio.wait_for(
                nc.connect(
                    servers=[self._url],
                    connect_timeout=math.ceil(self._timeout),  # nats-py wants an int
                    max_reconnect_attempts=-1,
                    error_cb=self._on_error,
                ),
                self._timeout,
            )
        except TimeoutError as exc:
            cause = nc.last_error or exc  # the refused connection, not just "timeout"
            await nc.close()
            reason = f"cannot connect within {self._timeout:g}s: {self._describe(cause)}"
            raise SinkError(f"sink {self.name}: {reason}") from cause
        try:
            js = nc.jetstream(timeout=self._timeout)
            await self._ensure_stream(js)
        except BaseException:
            await nc.close()
            raise
        self._nc = nc
        return js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        try:
            await js.find_stream_name_by_subject(self._subject)
        except nats.js.errors.NotFoundError:
            # Idempotent: two processes adding the same config both succeed.
            stream = stream_name_for(self._subject)
            await js.add_stream(name=stream, subjects=[self._subject])
            log.info("sink.nats.stream_created", sink=self.name, stream=stream)

    async def _on_error(self, exc: Exception) -> None:
        # Replaces nats-py's default callback, which logs a traceback on every reconnect attempt.
        log.warning("sink.nats.connection_error", sink=self.name, error=self._describe(exc))

    async def send(self, message: Message) -> Receipt:
        try:
            js = await self._jetstream()
            ack = await js.publish(
                self._subject,
                message.body,
                timeout=self._timeout,
                headers={"Nats-Msg-Id": message.event_id},
            )
        except nats.errors.MaxPayloadError as exc:
            # Larger than the server's max_payload: no retry can succeed until it is raised.
            raise SinkError(
                f"sink {self.name}: message larger than the server's max_payload", permanent=True
            ) from exc
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            # nats.errors.TimeoutError is a TimeoutError; JetStream errors are nats.errors.Error.
            raise SinkError(f"sink {self.name}: {self._describe(exc)}") from exc
        duplicate = " duplicate" if ack.duplicate else ""
        return Receipt(snippet=f"{ack.stream} seq {ack.seq}{duplicate}")

    def _describe(self, exc: BaseException) -> str:
        # The type names the failure when the message is empty (e.g. a bare TimeoutError).
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return text.replace(self._password, "***") if self._password else text

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            await nc.close()
