"""structlog set-up: JSON lines in production, readable console output on a terminal.

Cheap by design (the callback route logs once per request): loggers are cached on first use,
JSON is rendered by orjson straight to bytes, nothing formats a message that is filtered, and
info lines are buffered (flushed within `FLUSH_SECONDS`; warnings and errors at once).
Secrets never reach a log: callers log ids, never tokens, keys or payloads, and `redact_path`
strips the token from a callback URL before any access line is written.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import IO, Any

import orjson
import structlog
from structlog.typing import Processor

_CALLBACK_TOKEN = re.compile(r"(/callbacks/vlmrun/)[^/?#]+")
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


FLUSH_SECONDS = 0.5


class BufferedLineLogger:
    """Writes rendered lines to a buffer instead of one system call per line."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._lines: list[bytes] = []
        flusher = threading.Thread(target=self._flush_forever, name="log-flush", daemon=True)
        flusher.start()
        atexit.register(self.flush)

    def info(self, message: bytes) -> None:
        with self._lock:
            self._lines.append(message)

    debug = msg = info

    def warning(self, message: bytes) -> None:
        with self._lock:
            self._lines.append(message)
        self.flush()

    error = critical = exception = warning

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
        if lines:
            self._stream.write(b"\n".join(lines) + b"\n")
            self._stream.flush()

    def _flush_forever(self) -> None:
        stop = threading.Event()
        while not stop.wait(FLUSH_SECONDS):
            self.flush()


# Per-request log context (request id, ...). One ContextVar of our own is much cheaper to
# merge into every line than structlog's scan of all context variables.
_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "log_context", default=None
)


def bind(**values: Any) -> None:
    """Add values to every log line of the current request (or task)."""
    _CONTEXT.set({**(_CONTEXT.get() or {}), **values})


def reset(**values: Any) -> None:
    """Start a fresh context (at the beginning of a request)."""
    _CONTEXT.set(values)


def _merge_context(
    logger: Any, name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    context = _CONTEXT.get()
    return {**context, **event} if context else event


class _Stamp:
    """ISO-8601 UTC timestamps with milliseconds, the formatted second cached between calls."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(
        self, logger: Any, name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1000):03d}Z"
        return event


def redact_path(path: str) -> str:
    """A request path fit for a log: the per-job callback token replaced by `***`."""
    return _CALLBACK_TOKEN.sub(r"\1***", path)


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog (and the stdlib loggers of uvicorn and friends) once per process."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    shared: list[Processor] = [
        _merge_context,
        structlog.processors.add_log_level,
        _Stamp(),
    ]
    if fmt == "json":
        processors: list[Processor] = [
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        line_logger = BufferedLineLogger(sys.stderr.buffer)
        logger_factory: Callable[..., Any] = lambda *args: line_logger  # noqa: E731
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer()]
        logger_factory = structlog.PrintLoggerFactory(sys.stderr)
    factory = structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO))
    structlog.configure(
        processors=processors,
        wrapper_class=factory,
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
    # uvicorn's own loggers: errors only through stdlib; its access log is replaced by ours
    # (receiver.app's request middleware), which redacts callback tokens.
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
