"""A run a worker cannot accept (a REJECTED report: a task it does not serve,
arguments that do not fit its signature) goes back to the queue without
spending a retry, is kept away from that worker, and ends FAILED only after
MAX_REJECTIONS; and messages of validation errors are stored without the
values that failed."""

from __future__ import annotations

from typing import Any

import pytest

from fastapi_bgtasks.states import MAX_REJECTIONS
from fastapi_bgtasks.store import DeliveryRow, Store, runs
from fastapi_bgtasks.wire import ErrorInfo
from tests.storekit import apply, fetch, report, store_time, submit_run, write

pytestmark = pytest.mark.anyio

TASK = "resize"


def misfit(worker: str = "w1") -> ErrorInfo:
    return ErrorInfo(
        type="IncompatibleArguments",
        message=f"Worker {worker}: the arguments do not fit (size: missing).",
    )


async def claim(store: Store, worker: str) -> list[DeliveryRow]:
    return await store.claim(worker_id=worker, tasks=[TASK], slots=5, lease_seconds=60)


async def make_due(store: Store, run_id: Any) -> None:
    """Past the rejection back-off, written straight to the table."""
    await write(
        store, runs.update().where(runs.c.id == run_id).values(scheduled_at=store_time(store, -1))
    )


async def test_a_rejected_run_waits_again_without_spending_a_retry_and_says_why(
    store: Store,
) -> None:
    row = await submit_run(store, TASK, args=[4242, 77])  # max_attempts 1: no retry
    [delivery] = await claim(store, "old")
    rejected = report(delivery, "REJECTED", error=misfit("old"))
    assert await apply(store, rejected) == ["accepted"]
    stored = await fetch(store, row["id"])
    assert stored["state"] == "SCHEDULED"
    assert stored["attempt"] == 0  # it never ran
    assert stored["reason"] == "rejected: IncompatibleArguments"
    assert stored["error"]["type"] == "IncompatibleArguments"
    assert stored["worker_id"] is None
    assert stored["rejected_by"] == "old"  # it announced no signature: its id
    history = await store.run_history(row["id"])
    assert [(h["from_state"], h["to_state"], h["reason"]) for h in history][-1] == (
        "PENDING",
        "SCHEDULED",
        "rejected: IncompatibleArguments",
    )
    # The same report again (a re-sent batch) changes nothing.
    assert await apply(store, rejected) == ["duplicate"]
    assert await fetch(store, row["id"]) == stored


async def test_the_worker_that_rejected_a_run_is_not_offered_it_again_and_another_is(
    store: Store,
) -> None:
    row = await submit_run(store, TASK)
    [delivery] = await claim(store, "old")
    await apply(store, report(delivery, "REJECTED", error=misfit("old")))
    assert await claim(store, "old") == []
    [again] = await claim(store, "new")
    assert again["id"] == row["id"] and again["attempt"] == 1
    assert await apply(store, report(again, "COMPLETED", result=1)) == ["accepted"]
    done = await fetch(store, row["id"])
    assert done["state"] == "COMPLETED" and done["attempt"] == 1 and done["reason"] is None


async def test_no_worker_with_the_signature_that_rejected_a_run_is_offered_it_again(
    store: Store,
) -> None:
    """All the old workers of a rolling deploy skip it, not only the first."""
    row = await submit_run(store, TASK)
    [delivery] = await store.claim(
        worker_id="old-1", tasks=[TASK], slots=5, lease_seconds=60, keys={TASK: "v1"}
    )
    rejected = report(delivery, "REJECTED", error=misfit("old-1"), signature="v1")
    assert await apply(store, rejected) == ["accepted"]
    assert (await fetch(store, row["id"]))["rejected_by"] == "v1"
    for worker in ("old-1", "old-2", "old-3"):
        assert await store.claim(
            worker_id=worker, tasks=[TASK, "other"], slots=5, lease_seconds=60,
            keys={TASK: "v1", "other": "x"},
        ) == []  # fmt: skip
    [again] = await store.claim(
        worker_id="new-1", tasks=[TASK], slots=5, lease_seconds=60, keys={TASK: "v2"}
    )
    assert again["id"] == row["id"]


async def test_a_run_rejected_max_rejections_times_ends_failed_with_the_workers_error(
    store: Store,
) -> None:
    row = await submit_run(store, TASK, max_attempts=3)
    for n in range(1, MAX_REJECTIONS + 1):
        await make_due(store, row["id"])
        [delivery] = await claim(store, f"w{n}")
        assert await apply(store, report(delivery, "REJECTED", error=misfit(f"w{n}"))) == [
            "accepted"
        ]
        stored = await fetch(store, row["id"])
        if n < MAX_REJECTIONS:
            assert stored["state"] == "SCHEDULED", n
            if n >= 2:  # backed off from the second rejection on
                assert await claim(store, "other") == []
    assert stored["state"] == "FAILED"
    assert stored["attempt"] == 0 and stored["finished_at"] is not None
    assert stored["error"]["type"] == "IncompatibleArguments"
    assert f"Rejected by workers {MAX_REJECTIONS} times" in stored["error"]["message"]
    assert stored["reason"] == "rejected: IncompatibleArguments"


async def test_a_rejected_run_someone_asked_to_cancel_ends_cancelled(store: Store) -> None:
    row = await submit_run(store, TASK)
    [delivery] = await claim(store, "old")
    await store.cancel_run(row["id"])
    assert await apply(store, report(delivery, "REJECTED", error=misfit())) == ["accepted"]
    assert (await fetch(store, row["id"]))["state"] == "CANCELLED"


async def test_a_started_run_cannot_be_rejected(store: Store) -> None:
    row = await submit_run(store, TASK)
    [delivery] = await claim(store, "w1")
    assert await apply(store, report(delivery, "RUNNING")) == ["accepted"]
    assert await apply(store, report(delivery, "REJECTED", error=misfit())) == ["stale"]
    assert (await fetch(store, row["id"]))["state"] == "RUNNING"


async def test_a_validation_message_from_an_older_worker_is_stored_without_the_inputs(
    store: Store,
) -> None:
    """Workers before this version wrote pydantic's text, arguments included."""
    row = await submit_run(store, TASK, args=[4242, 77])
    [delivery] = await claim(store, "old")
    text = (
        "1 validation error for resize arguments\n"
        "arguments\n"
        "  too many positional arguments [type=arguments_mismatch, "
        "input_value={'args': [4242, 77], 'kwargs': {}}, input_type=dict]"
    )
    failed = report(delivery, "FAILED", error=ErrorInfo(type="ValidationError", message=text))
    assert await apply(store, failed) == ["accepted"]
    message = (await fetch(store, row["id"]))["error"]["message"]
    assert "4242" not in message
    assert "too many positional arguments [type=arguments_mismatch, input_type=dict]" in message
