"""Typed rows: what the store hands the app for a run, a delivery and a
history step. TypedDicts, so callers index them by column name as before
and the types say what each column holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypedDict, cast

from ..states import RunState

__all__ = ["DeliveryRow", "HistoryRow", "RunRow", "Submitted", "delivery_row", "history_row",
           "new_row", "run_row", "utc"]  # fmt: skip


class DeliveryRow(TypedDict):
    """What a worker needs to run a claimed run (the feed's event)."""

    id: uuid.UUID
    task: str
    attempt: int
    lease_token: str  # a delivered run is always leased
    args: list[Any]
    kwargs: dict[str, Any]
    timeout_seconds: float | None
    priority: int
    scheduled_at: datetime


class RunRow(TypedDict):
    """A run as stored: every column of bgtasks_runs."""

    id: uuid.UUID
    task: str
    state: str
    attempt: int
    max_attempts: int
    rescues: int
    max_rescues: int
    retry_delays: list[float]
    timeout_seconds: float | None
    priority: int
    args: list[Any]
    kwargs: dict[str, Any]
    result: Any
    error: dict[str, Any] | None
    created_at: datetime
    scheduled_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    worker_id: str | None
    lease_token: str | None
    lease_expires_at: datetime | None
    idempotency_key: str | None
    cancel_requested: bool
    reason: str | None
    rejected_by: str | None


class HistoryRow(TypedDict):
    """One step of a run's history."""

    id: int
    run_id: uuid.UUID
    from_state: RunState | None
    to_state: RunState
    attempt: int
    reason: str | None
    at: datetime


class Submitted(TypedDict, total=False):
    """A submit's statement parameters (what it sent, plus the dialect's clock)."""

    id: uuid.UUID
    task: str
    max_attempts: int
    max_rescues: int
    retry_delays: list[float]
    timeout_seconds: float | None
    priority: int
    args: list[Any]
    kwargs: dict[str, Any]
    idempotency_key: str | None
    eta: datetime | None
    delay: Any
    now: datetime
    scheduled: datetime


_TIMES = ("created_at", "scheduled_at", "started_at", "finished_at", "updated_at",
          "lease_expires_at", "at")  # fmt: skip


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes: they are UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _plain(row: Any) -> dict[str, Any]:
    data = dict(cast(Mapping[str, Any], row._mapping))
    data.pop("notified", None)
    for key in _TIMES:
        if key in data:
            data[key] = utc(data[key])
    return data


def run_row(row: Any) -> RunRow:
    return cast(RunRow, _plain(row))


def delivery_row(row: Any) -> DeliveryRow:
    data = _plain(row)
    data.pop("credit", None)  # the claim's limit, beside each row (transitions.Claimed)
    return cast(DeliveryRow, data)


def history_row(row: Any) -> HistoryRow:
    data = _plain(row)
    data["to_state"] = RunState(data["to_state"])
    if data["from_state"] is not None:
        data["from_state"] = RunState(data["from_state"])
    return cast(HistoryRow, data)


def new_row(params: Submitted, returned: Any) -> RunRow:
    """The row a submit stored: what it sent and what the database set (the
    id comes back too, to match rows of a multi-row insert)."""
    created_at = utc(returned.created_at)
    scheduled_at = utc(returned.scheduled_at)
    assert created_at is not None and scheduled_at is not None
    return {
        "id": returned.id, "task": params["task"], "state": RunState.SCHEDULED.value,
        "attempt": 0, "max_attempts": params["max_attempts"], "rescues": 0,
        "max_rescues": params["max_rescues"], "retry_delays": params["retry_delays"],
        "timeout_seconds": params["timeout_seconds"], "priority": params.get("priority", 0),
        "args": params["args"], "kwargs": params["kwargs"], "result": None, "error": None,
        "created_at": created_at, "scheduled_at": scheduled_at,
        "started_at": None, "finished_at": None, "updated_at": created_at, "worker_id": None,
        "lease_token": None, "lease_expires_at": None,
        "idempotency_key": params.get("idempotency_key"), "cancel_requested": False,
        "reason": None, "rejected_by": None,
    }  # fmt: skip
