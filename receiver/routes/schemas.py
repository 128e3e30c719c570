"""The API's bodies and query strings as pydantic models: what the handlers validate with, and
what `/openapi.json` is generated from (receiver.routes.openapi). Each shape is written here
once; its constants come from receiver.models."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from receiver.models import DOMAIN_PATTERN, PAGE_DEFAULT, PAGE_MAX, DeliveryState, JobKind
from receiver.store.sql import DELIVERY_CURSOR_PATTERN, JOB_CURSOR_PATTERN
from receiver.vlmrun import GenerationConfig, RequestMetadata

# Deep enough for any JSON schema in `config`; what is kept must also be written back out, and
# orjson writes at most 254 levels.
MAX_NESTING = 64
_NUMBER = re.compile(r"[-+]?[0-9.eE+-]*")
ROW_ID_PATTERN = r"^[0-9]{1,18}$"  # delivery ids and their cursors: fit a 64-bit integer

Domain = Annotated[
    str,
    Field(
        pattern=DOMAIN_PATTERN,
        description="a VLM Run domain, like document.invoice",
        examples=["document.invoice"],
    ),
]
Time = datetime
# A delivery's state as a filter: a stored state, or `retrying` (pending after a failed attempt).
DeliveryFilterState = Literal["pending", "retrying", "leased", "delivered", "dead"]
_NEXT = "`next_cursor` of the previous page"
JobCursor = Annotated[str, Field(pattern=JOB_CURSOR_PATTERN, description=_NEXT)]
DeliveryCursor = Annotated[str, Field(pattern=DELIVERY_CURSOR_PATTERN, description=_NEXT)]
SinkName = Annotated[str, Field(description="a sink's name from the sinks file")]


def reason(exc: ValidationError, model: type[BaseModel]) -> str:
    """The first problem, for a person: the field, pydantic's words, and what the field is."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    field = model.model_fields.get(str(first["loc"][0])) if first["loc"] else None
    hint = f" ({field.description})" if field is not None and field.description else ""
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"`{where}`: {message}{hint}" if where else message


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether objects and arrays in `value` nest more than `limit` levels (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


# --- requests ---


class Submission(BaseModel):
    """`POST /v1/jobs`: exactly one of `url`, `file_id` or (multipart) `file`."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["url"]}, {"required": ["file_id"]}]}
    )

    domain: Domain
    kind: JobKind = Field("document", description="which /<kind>/generate VLM Run runs")
    url: Annotated[str, Field(min_length=1, pattern=r"^https?://")] | None = Field(
        None, description="an http(s) URL VLM Run fetches the document from"
    )
    file_id: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="a file already uploaded to VLM Run"
    )
    config: GenerationConfig = Field(
        default_factory=GenerationConfig, description="the SDK's GenerationConfig"
    )
    metadata: RequestMetadata | None = Field(None, description="the SDK's RequestMetadata")

    @field_validator("config", "metadata", mode="before")
    @classmethod
    def _object(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):  # multipart fields carry JSON as text
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise ValueError("must be a JSON object") from None
        if value is not None and not isinstance(value, dict):
            raise ValueError("must be a JSON object")
        if _deeper_than(value, MAX_NESTING):
            raise ValueError(f"is nested deeper than {MAX_NESTING} levels")
        return value

    def sources(self, has_file: bool) -> list[str]:
        named = [name for name in ("url", "file_id") if getattr(self, name)]
        return named + (["file"] if has_file else [])


class SubmissionForm(BaseModel):
    """`POST /v1/jobs` as multipart/form-data: the file, and the same fields as text."""

    file: bytes = Field(json_schema_extra={"format": "binary"})
    domain: Domain
    kind: JobKind = "document"
    config: str | None = Field(None, json_schema_extra={"contentMediaType": "application/json"})
    metadata: str | None = Field(None, json_schema_extra={"contentMediaType": "application/json"})


def epoch(when: datetime | None) -> float | None:
    """A time given to the API as epoch seconds; one without a zone is UTC (never the
    server's local time)."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _iso_only(value: Any) -> Any:
    """Epoch numbers are refused (seconds or milliseconds? ambiguous), as text too: a query
    string's values are all text, and pydantic would read "1800000000" as a time."""
    if value is None or isinstance(value, datetime):
        return value
    if not isinstance(value, str) or _NUMBER.fullmatch(value.strip()):
        raise ValueError("must be an ISO-8601 time, e.g. 2026-11-24T08:00:00Z")
    return value


class CreatedBetween(BaseModel):
    """A time range on `created_at`: from `since` (included) to `until` (excluded)."""

    since: Time | None = Field(
        None, description="only those created at or after this time (ISO-8601; UTC if no zone)"
    )
    until: Time | None = Field(
        None, description="only those created before this time (ISO-8601; UTC if no zone)"
    )

    @field_validator("since", "until", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _iso_only(value)

    @field_validator("since", "until")
    @classmethod
    def _in_utc_range(cls, value: datetime | None) -> datetime | None:
        """A time whose zone takes it past year 9999 or before year 1 in UTC is refused: it
        could be neither compared nor shown."""
        if value is not None and value.tzinfo is not None:
            try:
                value.astimezone(UTC)
            except OverflowError:
                raise ValueError("is out of range once converted to UTC") from None
        return value


class JobsQuery(CreatedBetween):
    status: str | None = Field(None, description="only this status")
    domain: str | None = Field(None, description="only this domain")
    q: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        None,
        description="only the job with this id, the jobs of this prediction id, or those whose "
        "submitted metadata has this text as a top-level string value (exact match)",
    )
    limit: int = Field(PAGE_DEFAULT, ge=1, le=PAGE_MAX, description="page size")
    cursor: JobCursor | None = None


class DeliveryFilter(CreatedBetween):
    state: DeliveryFilterState | None = Field(
        None, description="only this state; `retrying`: pending after a failed attempt"
    )
    sink: str | None = Field(None, description="only this sink")


class DeliveriesQuery(DeliveryFilter):
    event_id: str | None = Field(None, description="only this event's")
    limit: int = Field(PAGE_DEFAULT, ge=1, le=PAGE_MAX, description="page size")
    cursor: DeliveryCursor | None = None


class RetryMatching(DeliveryFilter):
    """`POST /v1/deliveries/retry`: every delivery the filters match (as GET /v1/deliveries
    lists them), except those being sent right now."""

    state: DeliveryFilterState = Field(
        description="only this state (required: no bulk retry of everything by accident)"
    )


class ReplayEvent(BaseModel):
    sink: SinkName | None = None


class ReplayDead(BaseModel):
    sink: SinkName
    since: Time | None = Field(
        None, description="only deliveries that died since then (ISO-8601; UTC if no zone)"
    )

    @field_validator("since", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):  # not epoch numbers: ambiguous
            raise ValueError("must be an ISO-8601 time, e.g. 2026-11-24T08:00:00Z")
        return value


class Prediction(BaseModel):
    """A callback's body: a VLM Run prediction (kept whole, exactly as sent)."""

    id: str
    status: str


# --- answers ---


class Error(BaseModel):
    error: str


class Job(BaseModel):
    id: str
    kind: JobKind
    domain: str
    status: str = Field(
        description="submitting, submit_failed, timed_out, or the prediction's status "
        "(pending, running, completed, failed, ...)"
    )
    prediction_id: str | None
    error: str | None
    created_at: Time
    updated_at: Time
    completed_at: Time | None


class Event(BaseModel):
    id: str
    job_id: str
    prediction_id: str
    status: str
    domain: str
    source: Literal["callback", "poll"]
    verification: Literal["hmac-sha256", "token", "poll"]
    received_at: Time
    prediction: dict[str, Any] | None = Field(
        None, description="the prediction exactly as VLM Run sent it"
    )


class EventWithDeliveries(Event):
    deliveries: list[DeliveryWithSends] = Field(description="the event's deliveries, one per sink")


class JobWithEvents(Job):
    events: list[EventWithDeliveries]


class SubmitFailed(BaseModel):
    error: str
    job: Job | None = None


class Delivery(BaseModel):
    id: int
    event_id: str
    sink: str
    state: DeliveryState
    attempts: int = Field(ge=0)
    next_attempt_at: Time | None
    last_error: str | None
    created_at: Time
    updated_at: Time
    delivered_at: Time | None


class Send(BaseModel):
    """One attempt of a delivery."""

    attempt: int
    started_at: Time
    duration_ms: float
    status_code: int | None
    error: str | None
    snippet: str | None = Field(description="the first characters of the sink's answer")


class DeliveryWithSends(Delivery):
    sends: list[Send] = Field(description="each attempt so far, in order")


class JobPage(BaseModel):
    items: list[Job]
    next_cursor: str | None


class DeliveryPage(BaseModel):
    items: list[Delivery]
    next_cursor: str | None


class Requeued(BaseModel):
    requeued: int = Field(ge=0)


class CallbackAnswer(BaseModel):
    status: Literal["recorded", "duplicate", "stale"]
    event_id: str | None
    job_id: str | None


class Health(BaseModel):
    status: str
    problems: list[str] = []
