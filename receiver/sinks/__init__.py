"""Sinks: where recorded events are forwarded. One module per kind, chosen by URL scheme.

A sink sends one message and returns only once the far side has it (HTTP 2xx, Redis XADD
reply, JetStream ack, RabbitMQ publisher confirm, fsync). Any failure is raised as
`receiver.errors.SinkError`, with `retry_after`, `permanent` or `disable_sink` set when the
far side said so; driver errors are chained with `from exc`. Retrying is not a sink's job:
`receiver.retry.RetryPolicy`, applied by each sink's sender (receiver/sender.py), owns every retry.

Adding a kind: one module with a class satisfying `Sink`, one `_KINDS` entry, one optional
extra in pyproject.toml, one parameter in tests/integration/test_sinks.py.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

from receiver.config import SinkConfig
from receiver.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Message:
    """What a sink sends: the event envelope, identical bytes on every attempt."""

    event_id: str  # stable across retries: the consumer's idempotency key
    event_type: str  # e.g. "prediction.completed"
    body: bytes  # JSON envelope (receiver.models.Event.envelope)


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the far side answered to a successful send (kept in the attempt log)."""

    status_code: int | None = None
    snippet: str = ""


class Sink(Protocol):
    name: str

    async def send(self, message: Message) -> Receipt:
        """Deliver one message, or raise SinkError."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


# scheme -> "module:Class"; the module (and its driver) is imported only when used.
_KINDS: dict[str, str] = {
    "http": "receiver.sinks.http:HttpSink",
    "https": "receiver.sinks.http:HttpSink",
    "redis": "receiver.sinks.redis:RedisSink",
    "rediss": "receiver.sinks.redis:RedisSink",
    "nats": "receiver.sinks.nats:NatsSink",
    "amqp": "receiver.sinks.amqp:AmqpSink",
    "amqps": "receiver.sinks.amqp:AmqpSink",
    "file": "receiver.sinks.file:FileSink",
}


# scheme -> (driver, what to pip install for it); the file sink needs no driver.
_DRIVERS: dict[str, tuple[str, str]] = {
    "http": ("aiohttp", "'receiver'"),  # a core dependency: only missing from a broken install
    "https": ("aiohttp", "'receiver'"),
    "redis": ("redis", "'receiver[redis]'"),
    "rediss": ("redis", "'receiver[redis]'"),
    "nats": ("nats-py", "'receiver[nats]'"),
    "amqp": ("aio-pika", "'receiver[amqp]'"),
    "amqps": ("aio-pika", "'receiver[amqp]'"),
}


def open_sink(config: SinkConfig) -> Sink:
    """Build the sink for `config.url`'s scheme (no connection is made until the first send)."""
    module_name, _, class_name = _KINDS[config.scheme].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # Drivers are optional extras: say which one to install rather than show a traceback.
        if config.scheme not in _DRIVERS or (exc.name or "").startswith("receiver"):
            raise
        driver, requirement = _DRIVERS[config.scheme]
        raise ConfigError(
            f"sink {config.name} needs the {driver} driver: pip install {requirement}"
        ) from exc
    cls = getattr(module, class_name)
    sink: Sink = cls(config)
    return sink
