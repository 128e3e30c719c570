"""Settings from the environment (prefix RECEIVER_) and the sinks TOML file, checked at start.

Every field's description is the operator documentation: docs/configuration.md is generated
from this module (`receiver config-doc`), so the two cannot drift.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from receiver.errors import ConfigError
from receiver.models import Route

SINK_SCHEMES = ("http", "https", "redis", "rediss", "nats", "amqp", "amqps", "file")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """The service's settings; an invalid one stops the start with a message naming it."""

    model_config = SettingsConfigDict(env_prefix="RECEIVER_", extra="ignore")

    database_url: str = Field(
        "sqlite:///./receiver.db",
        description="Where the store lives: `sqlite:///path.db` (one process) or `postgresql://...`.",
    )
    public_url: str | None = Field(
        None,
        description="The service's own public base URL; callback URLs are built from it. "
        "Unset: http://HOST:PORT (fine on one machine, wrong behind a proxy).",
    )
    host: str = Field("127.0.0.1", description="Address `receiver serve` binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port `receiver serve` listens on.")
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token for everything under `/v1/`. Unset: the admin API refuses all.",
    )
    signin_failures: int = Field(
        5,
        ge=0,
        description="Wrong admin tokens one client address may try in a minute, on the sign-in "
        "form and `/v1` alike, before it gets 429 until the minute has passed. 0: no limit.",
    )
    vlmrun_api_key: SecretStr | None = Field(
        None,
        description="VLM Run API key. Unset: `receiver serve` runs the bundled simulator instead.",
    )
    vlmrun_base_url: str = Field(
        "https://api.vlm.run/v1", description="Base URL of the VLM Run API."
    )
    vlmrun_webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Callback signing secrets, comma-separated, newest first (rotation). "
        "Set: callbacks without a valid `X-VLMRun-Signature` get 401.",
    )
    vlmrun_timeout: float = Field(30.0, gt=0, description="Seconds before a VLM Run call gives up.")
    allow_training: bool = Field(
        False, description="Sent as `metadata.allow_training` unless a job says otherwise."
    )
    sinks_file: Path | None = Field(None, description="TOML file with one `[[sinks]]` table each.")
    max_body_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="Largest callback body accepted (bytes); larger ones get 413 unread.",
    )
    max_inflight_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Callback bodies being read or recorded at once, in bytes, across all "
        "requests; past it a callback gets 503 (VLM Run retries). Bounds the memory many large "
        "bodies held open can take; keep it at least `RECEIVER_MAX_BODY_BYTES`.",
    )
    max_upload_bytes: int = Field(
        512 * 1024 * 1024, gt=0, description="Largest file accepted by `POST /v1/jobs` multipart."
    )
    head_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a complete request head (from connecting, or "
        "from the first byte of its next request); past it: 408 and close.",
    )
    keep_alive_timeout: float = Field(
        5.0, gt=0, description="Seconds an idle kept-alive connection stays open."
    )
    max_head_bytes: int = Field(
        64 * 1024,
        gt=0,
        description="Largest request head (request line and headers); past it: 431.",
    )
    max_headers: int = Field(100, gt=0, description="Most headers in one request; past it: 431.")
    max_connections: int = Field(
        0,
        ge=0,
        description="Client connections open at once; at the limit the one waiting longest for "
        "its request head is closed to admit a new one, else 503. 0: the descriptor limit "
        "(`ulimit -n`) less 64.",
    )
    worker: bool = Field(
        True, description="Run the dispatcher and reconciler inside `receiver serve`."
    )
    dispatch_batch: int = Field(256, gt=0, description="Deliveries claimed per dispatcher round.")
    dispatch_concurrency: int = Field(
        64, gt=0, description="Deliveries in flight per sink at once."
    )
    lease_seconds: float = Field(
        60.0,
        gt=0,
        description="Seconds a claimed delivery is ours before another worker may retry it.",
    )
    poll_interval: float = Field(
        2.0, gt=0, description="Fallback timer for the dispatcher when no wake-up arrives (s)."
    )
    reconcile_after: float = Field(
        300.0, gt=0, description="Seconds without a terminal callback before a job is polled."
    )
    reconcile_max_interval: float = Field(
        3600.0, gt=0, description="Longest wait between two polls of one job (backing off)."
    )
    reconcile_rate_per_minute: float = Field(
        10.0, gt=0, description="At most this many polls of the VLM Run API per minute."
    )
    job_deadline: float = Field(
        86400.0, gt=0, description="Seconds after which an unfinished job is marked timed_out."
    )
    retention_days: float = Field(
        30.0, gt=0, description="Delivered rows, attempts and payloads older than this are pruned."
    )
    log_format: str = Field(
        "auto", description="`json`, `console`, or `auto` (console on a terminal, else JSON)."
    )
    log_level: str = Field("info", description="Lowest level logged: debug, info, warning, error.")
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description="Peers whose X-Forwarded-*/Forwarded headers are believed (comma-separated).",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"],
        description="Host headers accepted (comma-separated; `*` accepts any).",
    )
    root_path: str = Field(
        "",
        description="Path prefix the app is served under behind a proxy, e.g. `/receiver`; "
        "works whether the proxy strips it or not. Include it in `RECEIVER_PUBLIC_URL`.",
    )

    _split = field_validator(
        "vlmrun_webhook_secrets", "trusted_proxies", "allowed_hosts", mode="before"
    )(_split_csv)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("use sqlite:///path.db or postgresql://user@host/db")
        return value

    @field_validator("public_url", "vlmrun_base_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an absolute http(s) URL, e.g. https://hooks.example.com")
        return value.rstrip("/")

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, value: str) -> str:
        if value not in ("auto", "json", "console"):
            raise ValueError("use json, console or auto")
        return value

    @property
    def callback_base(self) -> str:
        """Where VLM Run should send callbacks: the public URL, or this process's address."""
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def simulated(self) -> bool:
        """No API key: the bundled simulator stands in for VLM Run."""
        return self.vlmrun_api_key is None


class SinkConfig(BaseModel):
    """One `[[sinks]]` table of the sinks file."""

    model_config = {"extra": "forbid", "frozen": True}

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: str
    secret: SecretStr | None = None
    secrets: list[SecretStr] = Field(default_factory=list)
    statuses: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(15.0, gt=0)
    concurrency: int | None = Field(None, gt=0)
    retry_schedule: tuple[float, ...] | None = None
    # Kind-specific options: redis `stream`/`maxlen`, nats `subject`, amqp `exchange`/`routing_key`.
    stream: str | None = None
    maxlen: int | None = Field(None, gt=0)
    subject: str | None = None
    exchange: str | None = None
    routing_key: str | None = None

    @field_validator("url")
    @classmethod
    def _check_scheme(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in SINK_SCHEMES:
            raise ValueError(f"scheme {scheme!r} is not one of {', '.join(SINK_SCHEMES)}")
        return value

    @model_validator(mode="after")
    def _http_needs_secret(self) -> SinkConfig:
        if self.scheme in ("http", "https") and not self.signing_secrets:
            raise ValueError("an http(s) sink needs `secret` (a Standard Webhooks whsec_... key)")
        return self

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def signing_secrets(self) -> list[str]:
        """Newest first; every one signs, so consumers can rotate."""
        found = ([self.secret] if self.secret else []) + list(self.secrets)
        return [s.get_secret_value() for s in found]

    @property
    def route(self) -> Route:
        return Route(self.name, self.statuses, self.domains)


def _expand_env(value: Any, where: str) -> Any:
    """Replace `${VAR}` in strings with the environment's value; a missing one is an error."""
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{where}: environment variable {name} is not set")
            return os.environ[name]

        return _ENV_REF.sub(sub, value)
    if isinstance(value, list):
        return [_expand_env(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v, where) for k, v in value.items()}
    return value


def load_sinks(path: Path | None) -> list[SinkConfig]:
    """Read and validate the sinks file; every problem is a ConfigError naming the file and sink."""
    if path is None:
        return []
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read sinks file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"sinks file {path} is not valid TOML: {exc}") from exc
    tables = data.get("sinks", [])
    if not isinstance(tables, list):
        raise ConfigError(f"sinks file {path}: use [[sinks]] tables")
    sinks: list[SinkConfig] = []
    for i, table in enumerate(tables):
        where = f"sinks file {path}, sink #{i + 1} ({table.get('name', '?')})"
        try:
            sinks.append(SinkConfig.model_validate(_expand_env(table, where)))
        except ValidationError as exc:
            raise ConfigError(f"{where}: {_explain(exc)}") from exc
    names = [s.name for s in sinks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"sinks file {path}: sink names must be unique, repeated: {dupes}")
    return sinks


def _explain(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in exc.errors()
    )


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, or a ConfigError that names each bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"RECEIVER_{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
