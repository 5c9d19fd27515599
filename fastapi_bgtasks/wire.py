"""The wire: every pydantic schema the app and its workers exchange, the one
time format, and the cursor codec of `GET /runs`.

Shared by both ends: the app (store, feed, reports, status) and the worker,
which imports this module but never SQLAlchemy.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from .states import RunState

__all__ = [
    "CURSOR_PATTERN",
    "MAX_MAP_CALLS",
    "Call",
    "Delivery",
    "ErrorBody",
    "ErrorInfo",
    "HeartbeatRequest",
    "HeartbeatResponse",
    "Hello",
    "MapRequest",
    "MapResponse",
    "Report",
    "ReportBatch",
    "ReportOutcomes",
    "ReportState",
    "RunDocument",
    "RunHistory",
    "RunPage",
    "SubmitRequest",
    "Transition",
    "clean_text",
    "document_from_row",
    "format_time",
    "redact_inputs",
    "stored_json",
    "stored_size",
]


def format_time(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with `Z` and microseconds: the one time format on the wire."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(BaseModel):
    """What a failed attempt raised, as plain text: never rebuilt into an exception."""

    type: str = Field(max_length=200)
    message: str = Field(max_length=20_000)
    traceback: str | None = Field(default=None, max_length=128 * 1024)


class ErrorBody(BaseModel):
    """The one JSON body of every error response."""

    error: str
    message: str
    detail: Any = None


class RunDocument(BaseModel):
    """A run as the API shows it. `args`, `kwargs` and the traceback are
    omitted for callers that only hold the run id."""

    id: uuid.UUID
    task: str
    state: RunState
    attempt: int
    max_attempts: int
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    created_at: datetime
    scheduled_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: Any = None
    error: ErrorInfo | None = None
    worker_id: str | None = None
    # Why the run is where it is: the reason of its last state change
    # ("rejected: IncompatibleArguments", "retry: ValueError", "handed_back", ...).
    reason: str | None = None
    # For a waiting run that no worker connected to this app process serves:
    # a sentence saying so (the run waits until one connects).
    waiting_for: str | None = None

    @field_serializer("created_at", "scheduled_at", "started_at", "finished_at")
    def _times(self, value: datetime | None) -> str | None:
        return format_time(value)


class RunPage(BaseModel):
    """One page of `GET /runs`, newest first; pass `next_cursor` back for the next."""

    runs: list[RunDocument]
    next_cursor: str | None = None


class Transition(BaseModel):
    """One state change: `from_state` is null for the run's creation."""

    from_state: RunState | None
    to_state: RunState
    attempt: int
    reason: str | None = None
    at: datetime

    @field_serializer("at")
    def _time(self, value: datetime) -> str | None:
        return format_time(value)


class RunHistory(BaseModel):
    run_id: uuid.UUID
    transitions: list[Transition]


class SubmitRequest(_Wire):
    """The body of `POST /runs`. Unknown fields are refused (no mass assignment)."""

    task: str = Field(min_length=1, max_length=200)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    countdown: float | None = Field(default=None, ge=0, le=10 * 365 * 86400)
    eta: datetime | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    priority: int = Field(default=0, ge=-(2**31), lt=2**31)


class Call(_Wire):
    """One run's arguments in a `POST /runs/batch`."""

    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


MAX_MAP_CALLS = 10_000


class MapRequest(_Wire):
    """The body of `POST /runs/batch`: many runs of one task, stored together."""

    task: str = Field(min_length=1, max_length=200)
    calls: list[Call] = Field(min_length=1, max_length=MAX_MAP_CALLS)


class MapResponse(BaseModel):
    runs: list[RunDocument]


class Hello(BaseModel):
    """The feed's first event: the timing the worker must use (never its own)."""

    worker_id: str
    lease_seconds: float
    heartbeat_seconds: float
    report_interval: float
    max_body_bytes: int = 1024 * 1024
    max_result_bytes: int = 1024 * 1024
    # The app process's monotonic clock when it wrote this hello; deliveries
    # on the same feed are stamped by the same clock (see Delivery.leased_at).
    clock: float | None = None
    # The app takes REJECTED reports (a run this worker cannot accept, handed
    # back without spending a retry); an older app does not, and such a run
    # is reported FAILED as before.
    takes_rejected: bool = False


class Delivery(BaseModel):
    """One run leased to a worker, as sent on its feed.

    `leased_at` is the app's monotonic clock just before the claim, on the
    clock of the feed's hello: with the moment it asked for the feed, a
    worker bounds a delivery's age from above without trusting any clock but
    its own, and starts a provably fresh run without a round trip.
    """

    id: uuid.UUID
    task: str
    attempt: int
    lease_token: str
    args: list[Any]
    kwargs: dict[str, Any]
    timeout_seconds: float | None = None
    leased_at: float | None = None


ReportState = Literal["RUNNING", "COMPLETED", "FAILED", "CANCELLED", "RELEASED", "REJECTED"]


class Report(_Wire):
    """A worker's word on one run. RELEASED hands back a run it will not
    finish; REJECTED one it cannot accept (with the reason as `error`)."""

    run_id: uuid.UUID
    lease_token: str = Field(max_length=64)
    state: ReportState
    result: Any = None
    error: ErrorInfo | None = None
    # On a REJECTED report: the fingerprint of the worker's signature of the
    # task, so that no worker with the same signature is offered the run.
    signature: str | None = Field(default=None, max_length=64)


class ReportBatch(_Wire):
    worker_id: str = Field(min_length=1, max_length=200)
    reports: list[Report] = Field(max_length=1000)


Outcome = Literal["accepted", "duplicate", "stale", "unknown"]


class ReportOutcomes(BaseModel):
    """One outcome per report, in the order sent."""

    outcomes: list[Outcome]


class LeaseHeld(_Wire):
    run_id: uuid.UUID
    lease_token: str = Field(max_length=64)


class HeartbeatRequest(_Wire):
    worker_id: str = Field(min_length=1, max_length=200)
    runs: list[LeaseHeld] = Field(default_factory=list, max_length=10000)


class HeartbeatResponse(BaseModel):
    """`stop`: runs the worker must stop (cancelled, or no longer its own)."""

    renewed: list[uuid.UUID]
    stop: list[uuid.UUID]
    cancel: list[uuid.UUID]


def document_from_row(row: Mapping[str, Any], *, full: bool = True) -> RunDocument:
    """A stored row as the run document; `full=False` for capability readers:
    no arguments, no traceback."""
    error = row.get("error")
    error_info = ErrorInfo.model_validate(error) if error else None
    if error_info is not None and not full:
        error_info = error_info.model_copy(update={"traceback": None})
    return RunDocument(
        id=row["id"],
        task=row["task"],
        state=RunState(row["state"]),
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        args=row["args"] if full else None,
        kwargs=row["kwargs"] if full else None,
        created_at=row["created_at"],
        scheduled_at=row["scheduled_at"],
        started_at=row.get("started_at"),
        finished_at=row.get("finished_at"),
        result=row.get("result"),
        error=error_info,
        worker_id=row.get("worker_id"),
        reason=row.get("reason"),
    )


# The cursor of GET /runs: opaque to clients, (created_at, id) to the store,
# written as microseconds since 1970 and the id's hex. Every string matching
# CURSOR_PATTERN (which the OpenAPI schema publishes) decodes: the schema
# admits exactly what the API accepts.
CURSOR_PATTERN = r"^[0-9]{1,17}\.[0-9a-f]{32}$"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def encode_cursor(created_at: datetime, run_id: uuid.UUID) -> str:
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    return f"{(created_at - _EPOCH) // _MICROSECOND}.{run_id.hex}"


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    if re.fullmatch(CURSOR_PATTERN, cursor) is None:
        raise ValueError("cursor is not one this API returned")
    micros, run_id = cursor.split(".")
    return _EPOCH + int(micros) * _MICROSECOND, uuid.UUID(hex=run_id)


# One measure of a value's size, used by the worker and the app alike.


def stored_json(value: Any) -> str | None:
    """A value as the JSON text the store keeps (compact, non-ASCII kept; JSON
    escapes control characters, NUL included), or None if JSON cannot carry
    it (NaN, an infinity, a lone surrogate)."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        text.encode()
    except ValueError:  # incl. UnicodeEncodeError
        return None
    return text


def stored_size(value: Any) -> int | None:
    """UTF-8 bytes of a value as stored (what `max_result_bytes` bounds), or
    None if JSON cannot carry it."""
    text = stored_json(value)
    return None if text is None else len(text.encode())


def clean_text(value: object) -> str:
    """Valid UTF-8 text whatever the value held (a lone surrogate, say)."""
    return str(value).encode("utf-8", "replace").decode("utf-8")


_INPUT_VALUE = re.compile(r"input_value=.*?, input_type=(?=[^,\]]*\]$)", re.MULTILINE)


def redact_inputs(message: str) -> str:
    """pydantic's text of a validation error without the offending values
    (`input_value=...`), which may hold a run's arguments: for messages
    written by workers that do not leave them out themselves."""
    if "input_value=" not in message:
        return message
    return _INPUT_VALUE.sub("input_type=", message)
