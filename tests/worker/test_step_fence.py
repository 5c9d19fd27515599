"""An async run takes no step once its lease may have expired, judged on the
worker's monotonic clock: what a process resumed after a freeze would do,
played on one event loop by letting the deadline pass during an `await`."""

from __future__ import annotations

import time
import uuid

import anyio
import anyio.lowlevel
import pytest

from fastapi_bgtasks.states import StopReason
from fastapi_bgtasks.wire import Delivery
from fastapi_bgtasks.worker.config import FeedTerms
from fastapi_bgtasks.worker.context import RunContext
from fastapi_bgtasks.worker.held import HeldRun
from fastapi_bgtasks.worker.leases import fence_steps

pytestmark = pytest.mark.anyio

TERMS = FeedTerms(lease_seconds=2.0, heartbeat_seconds=0.5)


def _held() -> HeldRun:
    delivery = Delivery(id=uuid.uuid4(), task="t", attempt=1, lease_token="x", args=[], kwargs={})
    context = RunContext(str(delivery.id), "t", 1)
    return HeldRun(delivery=delivery, context=context, last_renewed=time.monotonic())


async def _run(held: HeldRun, steps: list[str]) -> None:
    async def task() -> None:
        steps.append("start")
        try:
            await anyio.sleep(0.2)
            steps.append("after the await")
        finally:
            steps.append("finally")

    with anyio.CancelScope() as scope:
        held.scope = scope
        await fence_steps(task(), held, lambda: TERMS)


async def test_a_task_resumed_past_its_deadline_takes_no_further_step() -> None:
    held = _held()
    steps: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_run, held, steps)
        await anyio.sleep(0.05)
        # As if the process had been frozen: the last renewal is now too old.
        held.last_renewed -= TERMS.lease_seconds
    assert steps == ["start", "finally"]
    assert held.stop_reason is StopReason.LOST


async def test_a_task_whose_lease_is_renewed_runs_to_its_end() -> None:
    held = _held()
    steps: list[str] = []
    await _run(held, steps)
    assert steps == ["start", "after the await", "finally"]
    assert held.stop_reason is None


async def test_a_task_past_its_deadline_does_not_start() -> None:
    held = _held()
    held.last_renewed -= TERMS.lease_seconds
    steps: list[str] = []
    await _run(held, steps)
    assert steps == []
    assert held.stop_reason is StopReason.LOST


async def test_the_value_and_exceptions_pass_through() -> None:
    held = _held()

    async def value() -> int:
        await anyio.lowlevel.checkpoint()
        return 42

    async def boom() -> None:
        await anyio.lowlevel.checkpoint()
        raise LookupError("boom")

    assert await fence_steps(value(), held, lambda: TERMS) == 42
    with pytest.raises(LookupError, match="boom"):
        await fence_steps(boom(), held, lambda: TERMS)
