"""A worker's slots: one runner per slot takes runs from a local backlog, so
no run gets a task or cancel scope of its own; stops, deadlines and the
batching of final reports must work as they did with one.

The tests drive `Worker.receive` directly, with no network (the worker's
client never connects), and watch the report queue; the one that counts
requests gives the reporter a recording `send`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from fastapi_bgtasks import BgTasks
from fastapi_bgtasks.states import Outcome, StopReason
from fastapi_bgtasks.wire import Delivery, Hello
from fastapi_bgtasks.worker.config import WorkerConfig
from fastapi_bgtasks.worker.held import HeldRun
from fastapi_bgtasks.worker.reporter import QueuedReport, Reporter
from fastapi_bgtasks.worker.runtime import Worker

URL = "http://127.0.0.1:9/tasks"  # never connected to
LEASE = 400.0
SKEW = 1e6  # the app's monotonic clock is far from ours

pytestmark = pytest.mark.anyio


class Seen:
    """What the hub's tasks saw."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.ended: list[str] = []  # "name:how"
        self.gate = anyio.Event()


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def hub(tmp_path: Path, seen: Seen) -> BgTasks:
    hub = BgTasks(f"sqlite+aiosqlite:///{tmp_path}/hub.db")

    @hub.task
    async def gated(value: int) -> int:
        seen.started.append("gated")
        await seen.gate.wait()
        return value

    @hub.task
    async def sleepy() -> None:
        seen.started.append("sleepy")
        try:
            await anyio.sleep(60)
        finally:
            seen.ended.append("sleepy:finally")

    @hub.task
    async def stubborn() -> str:
        """Swallows its cancellation and returns."""
        seen.started.append("stubborn")
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            seen.ended.append("stubborn:swallowed")
        return "done anyway"

    @hub.task
    async def echo(value: int) -> int:
        seen.started.append("echo")
        await anyio.lowlevel.checkpoint()
        return value

    return hub


@pytest.fixture
async def make_worker(hub: BgTasks) -> AsyncIterator[Callable[[int], Worker]]:
    workers: list[Worker] = []

    def make(concurrency: int) -> Worker:
        config = WorkerConfig(url=URL, handle_signals=False, concurrency=concurrency)
        worker = Worker(hub.registry, sorted(hub.registry.tasks), config)
        asked = time.monotonic()
        hello = Hello(
            worker_id=worker.worker_id,
            lease_seconds=LEASE,
            heartbeat_seconds=LEASE / 8,
            report_interval=0.02,
            clock=asked + SKEW,
        )
        worker.on_hello(hello, asked_at=asked)
        workers.append(worker)
        return worker

    try:
        yield make
    finally:
        for worker in workers:
            await worker.client.aclose()


def delivery(task: str, *args: Any, timeout: float | None = None) -> Delivery:
    """A fresh delivery: leased just now on the app's clock."""
    return Delivery(
        id=uuid.uuid4(),
        task=task,
        attempt=1,
        lease_token=uuid.uuid4().hex,
        args=list(args),
        kwargs={},
        timeout_seconds=timeout,
        leased_at=time.monotonic() + SKEW,
    )


def final(worker: Worker, held: HeldRun) -> QueuedReport | None:
    """The run's final report, once queued."""
    for queued in worker.reporter.queue.queued:
        report = queued.report
        if report.run_id == held.delivery.id and report.state != "RUNNING":
            return queued
    return None


async def until(condition: Callable[[], object]) -> None:
    while not condition():
        await anyio.sleep(0.005)


def receive(worker: Worker, d: Delivery, tg: Any) -> HeldRun:
    held = worker.receive(d, tg)
    assert held is not None
    return held


async def test_final_reports_of_runs_ending_in_one_turn_of_the_loop_share_one_request(
    make_worker: Callable[[int], Worker], seen: Seen
) -> None:
    worker = make_worker(8)
    requests: list[list[dict[str, Any]]] = []

    async def send(encoded: Sequence[bytes]) -> list[Outcome]:
        requests.append([json.loads(e) for e in encoded])
        return [Outcome.ACCEPTED] * len(encoded)

    reporter = Reporter(send, lambda: worker.terms)
    reporter.queue = worker.reporter.queue  # the executor's queue, sent through `send`
    finals = lambda: [r for batch in requests for r in batch if r["state"] != "RUNNING"]  # noqa: E731
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reporter.run)
            for i in range(8):
                receive(worker, delivery("gated", i), tg)
            await until(lambda: len(seen.started) == 8)
            # Their starts go out first (a fresh run does not wait for them).
            await until(lambda: sum(len(b) for b in requests) == 8)
            seen.gate.set()  # every run resumes in the same turn of the loop
            await until(lambda: len(finals()) == 8)
            tg.cancel_scope.cancel()
    with_finals = [b for b in requests if any(r["state"] != "RUNNING" for r in b)]
    assert len(with_finals) == 1
    assert sorted(r["result"] for r in with_finals[0]) == list(range(8))


async def test_no_more_runs_than_slots_run_at_once(
    make_worker: Callable[[int], Worker], seen: Seen
) -> None:
    worker = make_worker(2)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            helds = [receive(worker, delivery("gated", i), tg) for i in range(5)]
            await until(lambda: len(seen.started) == 2)
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert len(seen.started) == 2
            seen.gate.set()
            await until(lambda: all(final(worker, h) for h in helds))
            tg.cancel_scope.cancel()
    assert [final(worker, h).report.result for h in helds] == list(range(5))  # type: ignore[union-attr]


async def test_a_run_with_a_timeout_is_stopped_at_its_deadline(
    make_worker: Callable[[int], Worker], seen: Seen
) -> None:
    worker = make_worker(1)
    started = time.monotonic()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            held = receive(worker, delivery("sleepy", timeout=0.1), tg)
            await until(lambda: final(worker, held))
            tg.cancel_scope.cancel()
    report = final(worker, held).report  # type: ignore[union-attr]
    assert report.state == "FAILED"
    assert report.error is not None and report.error.type == "TimeoutError"
    assert seen.ended == ["sleepy:finally"]
    assert time.monotonic() - started < 5


async def test_a_cancel_stops_a_run_without_a_timeout(
    make_worker: Callable[[int], Worker], seen: Seen
) -> None:
    worker = make_worker(1)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            held = receive(worker, delivery("sleepy"), tg)
            await until(lambda: seen.started)
            held.stop(StopReason.CANCEL)
            await until(lambda: final(worker, held))
            tg.cancel_scope.cancel()
    assert final(worker, held).report.state == "CANCELLED"  # type: ignore[union-attr]
    assert seen.ended == ["sleepy:finally"]


@pytest.mark.parametrize("first", ["sleepy", "stubborn"])
async def test_the_slot_of_a_stopped_run_runs_the_next_one_to_its_end(
    make_worker: Callable[[int], Worker], seen: Seen, first: str
) -> None:
    """The stop cancelled the runner's scope: the next run (here at once
    after a task that swallowed its cancellation) must not inherit it."""
    worker = make_worker(1)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            stopped = receive(worker, delivery(first), tg)
            nexts = [receive(worker, delivery("echo", i), tg) for i in (5, 6)]
            await until(lambda: seen.started)
            stopped.stop(StopReason.CANCEL)
            await until(lambda: all(final(worker, h) for h in nexts))
            tg.cancel_scope.cancel()
    assert final(worker, stopped).report.state == "CANCELLED"  # type: ignore[union-attr]
    results = [(q.report.state, q.report.result) for h in nexts if (q := final(worker, h))]
    assert results == [("COMPLETED", 5), ("COMPLETED", 6)]


async def test_a_run_stopped_while_waiting_for_a_slot_is_reported_at_once(
    make_worker: Callable[[int], Worker], seen: Seen
) -> None:
    worker = make_worker(1)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            busy = receive(worker, delivery("sleepy"), tg)
            waiting = receive(worker, delivery("echo", 1), tg)
            await until(lambda: seen.started)
            waiting.stop(StopReason.CANCEL)
            assert final(worker, waiting) is not None  # no slot needed for that
            assert final(worker, busy) is None
            busy.stop(StopReason.SHUTDOWN)
            await until(lambda: final(worker, busy))
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
    assert final(worker, waiting).report.state == "CANCELLED"  # type: ignore[union-attr]
    assert final(worker, busy).report.state == "RELEASED"  # type: ignore[union-attr]
    assert seen.started == ["sleepy"]  # the stopped one never ran
