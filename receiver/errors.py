"""The project's errors: one root, so callers can catch everything of ours at once.

ReceiverError
├── ConfigError            settings or sinks file invalid (raised once, at start)
├── StoreError             the store failed (driver errors are chained with `from exc`)
│   └── StoreUnavailable   cannot reach the store right now: answer 503, retry later
├── VlmRunError            the VLM Run API answered with an error or could not be reached
└── SinkError              one delivery attempt to a sink failed (carries retry hints)
"""

from __future__ import annotations


class ReceiverError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(ReceiverError):
    """The configuration is invalid; the message names the setting and the fix."""


class StoreError(ReceiverError):
    """The store failed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now; the operation may be retried."""


class VlmRunError(ReceiverError):
    """The VLM Run API answered with an error, or could not be reached.

    `status_code` is the API's HTTP status (None for timeouts and connection errors);
    `reason` is a short human explanation safe to show to a user.
    """

    def __init__(self, reason: str, status_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code


class SinkError(ReceiverError):
    """One delivery attempt failed.

    `permanent` means retrying cannot help (the sink said 410 Gone, or the message is refused
    for good); `retry_after` is the sink's own hint in seconds; `disable_sink` asks the
    dispatcher to stop sending to this sink until an operator re-enables it.
    """

    def __init__(
        self,
        reason: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        permanent: bool = False,
        disable_sink: bool = False,
        snippet: str = "",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code
        self.retry_after = retry_after
        self.permanent = permanent
        self.disable_sink = disable_sink
        self.snippet = snippet
