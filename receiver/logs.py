"""structlog set-up: JSON lines in production, readable console output on a terminal.

Cheap by design (the callback route logs once per request): loggers are cached on first use,
JSON is rendered by orjson straight to bytes, nothing formats a message that is filtered, and
info lines are buffered (flushed within `FLUSH_SECONDS`; warnings and errors at once, and
everything by `flush()`, which the app calls as it stops: a process ended by a signal does not
run `atexit`). The standard library's loggers (uvicorn's, asyncio's) are routed through the same
renderer, so production output is JSON lines only.

Request context lives in one ContextVar of our own (`reset`, `bind`): the request id, then the
job and prediction ids once a handler knows them; every line logged while handling the request
carries them.

Secrets never reach a log: callers log ids, never tokens, keys or payloads, and `redact_path`
strips the token (and anything after it) from a callback path before any access line is written.
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

# Everything after the callback prefix: the token, and whatever a confused sender appended.
_CALLBACK_TOKEN = re.compile(r"(/callbacks/vlmrun/)[^?#]*", re.IGNORECASE)
_CALLBACK_PREFIX = "/callbacks/vlmrun/"
_REDACTED_CALLBACK = _CALLBACK_PREFIX + "***"
# What we accept as a caller's X-Request-ID; anything else is replaced by an id of our own.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
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
        self._write_lock = threading.Lock()  # lines leave in the order they were logged
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
        with self._write_lock:
            with self._lock:
                lines, self._lines = self._lines, []
            if lines:
                try:
                    self._stream.write(b"\n".join(lines) + b"\n")
                    self._stream.flush()
                except (OSError, ValueError):  # stream closed (interpreter exit) or broken pipe
                    pass

    def _flush_forever(self) -> None:
        stop = threading.Event()
        while not stop.wait(FLUSH_SECONDS):
            self.flush()


# Per-request log context (request id, ...). One ContextVar of our own is much cheaper to
# merge into every line than structlog's scan of all context variables.
_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "log_context", default=None
)


_BUFFER: BufferedLineLogger | None = None


def flush() -> None:
    """Write out every buffered line now (on shutdown: before the process may be killed)."""
    if _BUFFER is not None:
        _BUFFER.flush()
    sys.stderr.flush()


def request_id(given: str | None) -> str | None:
    """The caller's X-Request-ID if it is a sane token (printable, at most 128), else None."""
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return None


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
    if path.startswith(_CALLBACK_PREFIX) and "?" not in path and "#" not in path:
        return _REDACTED_CALLBACK  # the common case, without the regex (every callback)
    return _CALLBACK_TOKEN.sub(r"\1***", path)


class _StdlibBridge(logging.Handler):
    """Sends standard-library records (uvicorn, asyncio, drivers) through structlog, so they
    are rendered like ours: JSON lines in production, with the request context."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                event["exc_info"] = record.exc_info
            structlog.get_logger(record.name).log(record.levelno, record.getMessage(), **event)
        except Exception:
            self.handleError(record)


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog (and the stdlib loggers of uvicorn and friends) once per process."""
    global _BUFFER
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
        line_logger = _BUFFER = _BUFFER or BufferedLineLogger(sys.stderr.buffer)
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
    # The stdlib loggers (uvicorn's errors, asyncio's): warnings and up, through our renderer.
    # uvicorn's access log is off; ours (receiver.app.RequestContext) redacts callback tokens.
    # httpx logs request URLs at INFO: kept below WARNING, they never reach the output.
    root = logging.getLogger()
    root.handlers[:] = [_StdlibBridge()]
    root.setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
