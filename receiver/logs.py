"""structlog set-up: JSON lines in production, readable console output on a terminal.

Cheap by design (the callback route logs once per request): loggers are cached on first use,
JSON is rendered by orjson straight to bytes, and nothing formats a message that is filtered.
Secrets never reach a log: callers log ids, never tokens, keys or payloads, and `redact_path`
strips the token from a callback URL before any access line is written.
"""

from __future__ import annotations

import logging
import re
import sys

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


def redact_path(path: str) -> str:
    """A request path fit for a log: the per-job callback token replaced by `***`."""
    return _CALLBACK_TOKEN.sub(r"\1***", path)


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog (and the stdlib loggers of uvicorn and friends) once per process."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors: list[Processor] = [
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        logger_factory = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer()]
        logger_factory = structlog.PrintLoggerFactory(sys.stderr)  # type: ignore[assignment]
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
