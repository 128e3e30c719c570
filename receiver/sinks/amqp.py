"""RabbitMQ (AMQP 0-9-1) sink: publish with publisher confirms; return only once the broker acks.

Messages are persistent, `content_type` application/json, `message_id` = event id (the
consumer's idempotency key) and `type` = event type. They go to `config.exchange` with
`config.routing_key` (default `receiver.events`).

Without an exchange the default exchange ("") is used, which routes to the queue named by the
routing key; the sink declares that queue (durable) so events are kept even before a consumer
exists. A named exchange must already exist (it is checked, never created: its type and
bindings are the operator's choice). Publishing is `mandatory`, so a message no queue takes is
returned by the broker and reported as a (retryable) SinkError instead of vanishing.

The connection is aio-pika's robust one: it reconnects in the background and restores the
channel; a publish that fails meanwhile is raised and retried by the dispatcher.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractRobustChannel, AbstractRobustConnection
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError, PublishError

from receiver.config import SinkConfig
from receiver.errors import SinkError
from receiver.sinks import Message, Receipt

DEFAULT_ROUTING_KEY = "receiver.events"


class AmqpSink:
    def __init__(self, config: SinkConfig) -> None:
        self.name = config.name
        self._url = config.url
        self._timeout = config.timeout
        self._exchange_name = config.exchange or ""
        self._routing_key = config.routing_key or DEFAULT_ROUTING_KEY
        self._password = urlsplit(config.url).password
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._connecting = asyncio.Lock()  # concurrent first sends share one connection

    async def _target(self) -> AbstractExchange:
        if self._exchange is not None:
            return self._exchange
        async with self._connecting:
            if self._connection is None:
                self._connection = await aio_pika.connect_robust(self._url, timeout=self._timeout)
            if self._channel is None:
                # on_return_raises: an unroutable mandatory message raises instead of being
                # handed to a callback, so send() can report it.
                channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                assert isinstance(channel, AbstractRobustChannel)
                self._channel = channel
            if self._exchange is None:
                self._exchange = await self._declare(self._channel)
        return self._exchange

    async def _declare(self, channel: AbstractRobustChannel) -> AbstractExchange:
        if self._exchange_name:
            return await channel.get_exchange(self._exchange_name, ensure=True)
        await channel.declare_queue(self._routing_key, durable=True)
        return channel.default_exchange

    async def send(self, message: Message) -> Receipt:
        amqp_message = aio_pika.Message(
            message.body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.event_id,
            type=message.event_type,
        )
        try:
            exchange = await self._target()
            await exchange.publish(
                amqp_message, self._routing_key, mandatory=True, timeout=self._timeout
            )
        except PublishError as exc:
            # Returned unroutable. With the default exchange the queue was deleted after we
            # declared it: declare it again on the next attempt.
            self._exchange = None
            raise SinkError(f"sink {self.name}: unroutable, no queue is bound") from exc
        except DeliveryError as exc:
            raise SinkError(f"sink {self.name}: the broker refused the message (nack)") from exc
        except (AMQPError, ChannelInvalidStateError, OSError, TimeoutError) as exc:
            if isinstance(exc, AMQPError) and self._channel is not None and self._channel.is_closed:
                # A channel-level error (e.g. the exchange is missing) closed the channel.
                self._channel, self._exchange = None, None
            raise SinkError(f"sink {self.name}: {self._describe(exc)}") from exc
        return Receipt(snippet="confirmed")

    def _describe(self, exc: BaseException) -> str:
        # The type names the failure when the message is empty (e.g. a bare TimeoutError).
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return text.replace(self._password, "***") if self._password else text

    async def close(self) -> None:
        connection = self._connection
        self._connection, self._channel, self._exchange = None, None, None
        if connection is not None:
            await connection.close()
