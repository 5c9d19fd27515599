"""A worker checks a delivery as it arrives: one whose arguments do not fit
its signature of the task is handed back (REJECTED, with the reason and the
signature's fingerprint) without taking a slot, unless the app predates
REJECTED reports; validation errors become messages without their inputs;
and the answer `stale` to the start report of a run already finished stops
nothing. The tests drive `Worker.receive` directly, with no network."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from pydantic import BaseModel, ValidationError

from fastapi_bgtasks import BgTasks
from fastapi_bgtasks.states import Outcome
from fastapi_bgtasks.wire import Delivery, Hello
from fastapi_bgtasks.worker.acceptance import error_message
from fastapi_bgtasks.worker.config import WorkerConfig
from fastapi_bgtasks.worker.held import HeldRun, Phase
from fastapi_bgtasks.worker.runtime import Worker

pytestmark = pytest.mark.anyio


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[Worker]:
    hub = BgTasks(f"sqlite+aiosqlite:///{tmp_path}/hub.db")

    @hub.task
    async def resize(size: int) -> int:
        return size

    made = Worker(
        hub.registry, ["resize"], WorkerConfig(url="http://127.0.0.1:9/tasks", handle_signals=False)
    )
    try:
        yield made
    finally:
        await made.client.aclose()


def hello(worker: Worker, *, takes_rejected: bool) -> None:
    worker.on_hello(
        Hello(
            worker_id=worker.worker_id,
            lease_seconds=400.0,
            heartbeat_seconds=50.0,
            report_interval=0.02,
            takes_rejected=takes_rejected,
        ),
        asked_at=time.monotonic(),
    )


def delivery(**kwargs: object) -> Delivery:
    return Delivery(
        id=uuid.uuid4(), task="resize", attempt=1, lease_token="t", args=[], kwargs=kwargs
    )


async def receive(worker: Worker, leased: Delivery) -> HeldRun | None:
    async with anyio.create_task_group() as tg:
        held = worker.receive(leased, tg)
        tg.cancel_scope.cancel()
    return held


async def test_a_run_whose_arguments_do_not_fit_is_handed_back_without_a_slot(
    worker: Worker,
) -> None:
    hello(worker, takes_rejected=True)
    leased = delivery(width=4242, height=77)
    assert await receive(worker, leased) is None
    assert worker.roster.get(leased.id) is None  # never held, no slot taken
    [queued] = worker.reporter.queue.queued
    report = queued.report
    assert report.state == "REJECTED" and report.run_id == leased.id
    assert report.signature == worker.tasks["resize"].codec.fingerprint
    assert report.error is not None and report.error.type == "IncompatibleArguments"
    assert worker.worker_id in report.error.message and "'size'" in report.error.message
    # The worker id is random hex and may hold "77" itself.
    message = report.error.message.replace(worker.worker_id, "")
    assert "4242" not in message and "77" not in message


async def test_an_app_that_takes_no_rejected_report_gets_the_run_failed_as_before(
    worker: Worker,
) -> None:
    hello(worker, takes_rejected=False)
    held = await receive(worker, delivery(width=4242, height=77))
    assert held is not None and held.call is None
    assert all(q.report.state != "REJECTED" for q in worker.reporter.queue.queued)


async def test_a_run_that_fits_is_held_with_its_arguments_loaded_once(worker: Worker) -> None:
    hello(worker, takes_rejected=True)
    held = await receive(worker, delivery(size="12"))
    assert held is not None and held.call == ((12,), {})


class Card(BaseModel):
    number: int


def test_a_validation_error_message_names_locations_and_types_never_values() -> None:
    with pytest.raises(ValidationError) as caught:
        Card.model_validate({"number": "4242-secret"})
    message = error_message(caught.value)
    assert message == "1 validation error for Card: number: int_parsing"
    assert error_message(ValueError("plain")) == "plain"


async def test_stale_to_the_start_report_of_a_run_already_finished_stops_nothing(
    worker: Worker,
) -> None:
    """The app answers a start report on a run its lease already settled
    `stale` (so a re-sent delivery of it never runs again); a worker that
    has finished that run has nothing to stop."""
    hello(worker, takes_rejected=True)
    held = await receive(worker, delivery(size=1))
    assert held is not None
    held.phase = Phase.FINISHED
    held.running_answered(Outcome.STALE)
    assert held.stop_reason is None
    held.phase = Phase.STARTED
    held.running_answered(Outcome.STALE)
    assert held.stop_reason is not None
