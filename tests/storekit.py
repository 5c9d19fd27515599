"""Helpers shared by the tests that drive `Store` directly: the values of a
plain submit, polling until a condition holds, and reading every row."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import sqlalchemy as sa

from fastapi_bgtasks.store import Store, runs
from fastapi_bgtasks.wire import Report
from tests import timing


def run_values(task: str, **options: Any) -> dict[str, Any]:
    """`Store.insert_run` keyword arguments: a due run with no retries, `options` on top."""
    values: dict[str, Any] = {
        "task": task,
        "args": [],
        "kwargs": {},
        "max_attempts": 1,
        "max_rescues": 3,
        "retry_delays": [0.0],
        "timeout_seconds": None,
        "priority": 0,
        "countdown": None,
        "eta": None,
        "idempotency_key": None,
    }
    values.update(options)
    return values


async def submit_run(store: Store, task: str, **options: Any) -> dict[str, Any]:
    """A new run's stored row (a repeated idempotency key fails the test)."""
    row, created = await store.insert_run(**run_values(task, **options))
    assert created
    return row


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = timing.DEADLINE) -> Any:
    """Poll `check` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await anyio.sleep(0.01)


async def stored_rows(store: Store) -> dict[uuid.UUID, dict[str, Any]]:
    """Every run as stored, by id."""
    _, reader = store._engines()
    async with reader.connect() as conn:
        return {row.id: dict(row._mapping) for row in await conn.execute(sa.select(runs))}


def report(delivery: dict[str, Any], state: str, **fields: Any) -> Report:
    """A worker's report on a claimed run, under the lease it was delivered with."""
    return Report(run_id=delivery["id"], lease_token=delivery["lease_token"], state=state, **fields)


async def apply(store: Store, *reports: Report, max_result_bytes: int = 1 << 20) -> list[str]:
    """Apply a batch; its outcomes only."""
    outcomes = await store.apply_reports(list(reports), max_result_bytes=max_result_bytes)
    return [outcome for outcome, _ in outcomes]


async def fetch(store: Store, run_id: uuid.UUID) -> dict[str, Any]:
    row = await store.get_run(run_id)
    assert row is not None
    return row
