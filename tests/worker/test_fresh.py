"""Fresh deliveries: a worker starts a run without waiting for the app to
accept its RUNNING report only when the delivery is provably young.

The feed's hello carries the app's monotonic clock and each delivery the
app's clock just before its claim; with the moment the worker asked for the
feed, the worker bounds a delivery's age from above on its own clock. The
unit tests drive `Worker.on_hello` and `Worker.receive` directly, with no
network, and watch the report queue through its public view; the last test
runs a real app and worker.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from fastapi_bgtasks import BgTasks
from fastapi_bgtasks.states import Outcome
from fastapi_bgtasks.wire import Delivery, Hello, Report
from fastapi_bgtasks.worker.config import WorkerConfig
from fastapi_bgtasks.worker.held import HeldRun
from fastapi_bgtasks.worker.reporter import ReportQueue
from fastapi_bgtasks.worker.runtime import Worker
from tests import timing
from tests.harness.procs import Proc, start_app, start_worker

URL = "http://127.0.0.1:9/tasks"  # never connected to
LEASE = 400.0  # a quarter is 100 s: no test comes near it by running slowly
QUARTER = LEASE / 4

pytestmark = pytest.mark.anyio


# -- fixtures and helpers -----------------------------------------------------


class Calls:
    """What the hub's task saw: its arguments, and an event per call."""

    def __init__(self) -> None:
        self.values: list[int] = []
        self.called = anyio.Event()


@pytest.fixture
async def calls() -> Calls:
    return Calls()


@pytest.fixture
def hub(tmp_path: Path, calls: Calls) -> BgTasks:
    hub = BgTasks(f"sqlite+aiosqlite:///{tmp_path}/hub.db")

    @hub.task
    async def echo(value: int) -> int:
        calls.values.append(value)
        calls.called.set()
        return value

    return hub


@pytest.fixture
async def make_worker(hub: BgTasks) -> AsyncIterator[Callable[[], Worker]]:
    """Workers of the hub's task whose HTTP client never connects."""
    workers: list[Worker] = []

    def make() -> Worker:
        worker = Worker(hub.registry, ["echo"], WorkerConfig(url=URL, handle_signals=False))
        workers.append(worker)
        return worker

    try:
        yield make
    finally:
        for worker in workers:
            await worker.client.aclose()


@pytest.fixture
async def worker(make_worker: Callable[[], Worker]) -> Worker:
    return make_worker()


@pytest.fixture(params=[1e6, -1e6], ids=["app-clock-ahead", "app-clock-behind"])
def skew(request: pytest.FixtureRequest) -> float:
    """How far the app's monotonic clock is from ours: the two never agree."""
    return float(request.param)


def connect(worker: Worker, *, asked_at: float, clock: float | None) -> None:
    """The worker asked for its feed at `asked_at` (our clock); the app wrote
    the hello at `clock` (its clock)."""
    worker.on_hello(
        Hello(
            worker_id=worker.worker_id,
            lease_seconds=LEASE,
            heartbeat_seconds=LEASE / 8,
            report_interval=0.02,
            clock=clock,
        ),
        asked_at=asked_at,
    )


def delivery(leased_at: float | None) -> Delivery:
    return Delivery(
        id=uuid.uuid4(),
        task="echo",
        attempt=1,
        lease_token=uuid.uuid4().hex,
        args=[7],
        kwargs={},
        leased_at=leased_at,
    )


async def receive(worker: Worker, leased: Delivery) -> HeldRun:
    """Hand the delivery to the worker; its run is cancelled before it starts."""
    async with anyio.create_task_group() as tg:
        held = worker.receive(leased, tg)
        tg.cancel_scope.cancel()
    assert held is not None
    return held


# -- the freshness decision ------------------------------------------------------


async def test_a_delivery_leased_as_the_hello_was_written_is_fresh(
    worker: Worker, skew: float
) -> None:
    asked = time.monotonic()
    connect(worker, asked_at=asked, clock=asked + skew)
    held = await receive(worker, delivery(leased_at=asked + skew))
    assert held.fresh
    assert held.last_renewed == pytest.approx(asked, abs=1e-6)


@pytest.mark.parametrize(
    ("age", "fresh"),
    [(QUARTER / 2, True), (QUARTER, False), (2 * QUARTER, False)],
    ids=["an-eighth", "a-quarter", "a-half"],
)
async def test_a_delivery_is_fresh_only_while_its_age_bound_is_under_a_quarter_lease(
    worker: Worker, skew: float, age: float, fresh: bool
) -> None:
    """Leased `age` seconds (app clock) before the hello was written: its age
    on our clock is at least that, so a quarter lease is never fresh."""
    asked = time.monotonic()
    connect(worker, asked_at=asked, clock=asked + skew)
    held = await receive(worker, delivery(leased_at=asked + skew - age))
    assert held.fresh is fresh


async def test_a_not_fresh_delivery_counts_its_lease_from_its_receipt(
    worker: Worker, skew: float
) -> None:
    asked = time.monotonic()
    connect(worker, asked_at=asked, clock=asked + skew)
    before = time.monotonic()
    held = await receive(worker, delivery(leased_at=asked + skew - QUARTER))
    after = time.monotonic()
    assert not held.fresh
    assert before <= held.last_renewed <= after


async def test_a_resent_delivery_without_leased_at_is_not_fresh(
    worker: Worker, skew: float
) -> None:
    """A reconnecting feed re-sends what the worker holds unstamped: its
    lease may be of any age."""
    asked = time.monotonic()
    connect(worker, asked_at=asked, clock=asked + skew)
    before = time.monotonic()
    held = await receive(worker, delivery(leased_at=None))
    assert not held.fresh
    assert held.last_renewed >= before


async def test_a_delivery_under_a_hello_without_a_clock_is_not_fresh(
    worker: Worker, skew: float
) -> None:
    """An older app's hello carries no clock: no stamp can be trusted."""
    asked = time.monotonic()
    connect(worker, asked_at=asked, clock=None)
    held = await receive(worker, delivery(leased_at=asked + skew))
    assert not held.fresh


async def test_a_hello_without_a_clock_forgets_the_clock_of_an_earlier_feed(
    worker: Worker, skew: float
) -> None:
    """Reconnected to an app without clocks, the old feed's offset is
    meaningless: a stamp matching it must not make a delivery fresh."""
    asked = time.monotonic()
    connect(worker, asked_at=asked, clock=asked + skew)
    connect(worker, asked_at=time.monotonic(), clock=None)
    held = await receive(worker, delivery(leased_at=asked + skew))
    assert not held.fresh


async def test_a_slow_link_before_the_hello_makes_the_same_delivery_look_older(
    make_worker: Callable[[], Worker], skew: float
) -> None:
    """The hello may have been written any time after the worker asked for
    it: the bound assumes the earliest, so a hello that took a quarter lease
    to arrive leaves no delivery of its feed provably fresh."""
    now = time.monotonic()
    app_clock = now + skew
    stamp = app_clock  # both deliveries leased as their hello was written
    fast, slow = make_worker(), make_worker()
    connect(fast, asked_at=now, clock=app_clock)
    connect(slow, asked_at=now - QUARTER, clock=app_clock)
    assert (await receive(fast, delivery(leased_at=stamp))).fresh
    assert not (await receive(slow, delivery(leased_at=stamp))).fresh


async def test_a_fresh_delivery_counts_its_lease_from_before_its_receipt(
    worker: Worker, skew: float
) -> None:
    """Leased one second (app clock) after a hello the worker asked for two
    seconds ago: its lease began at the latest one second ago on our clock,
    and fencing must count from then, not from its receipt."""
    asked = time.monotonic() - 2.0
    connect(worker, asked_at=asked, clock=asked + skew)
    before = time.monotonic()
    held = await receive(worker, delivery(leased_at=asked + skew + 1.0))
    assert held.fresh
    assert held.last_renewed == pytest.approx(asked + 1.0, abs=1e-6)
    assert held.last_renewed <= before


async def test_a_delivery_stamped_later_than_our_clock_allows_never_renews_in_the_future(
    worker: Worker, skew: float
) -> None:
    """Ten app-clock seconds after the hello, received the moment the feed
    was asked for: impossible for clocks at one rate, but the bound must
    still never place the lease's start after its receipt."""
    asked = time.monotonic()
    connect(worker, asked_at=asked, clock=asked + skew)
    held = await receive(worker, delivery(leased_at=asked + skew + 10.0))
    after = time.monotonic()
    assert held.last_renewed <= after


# -- what the decision changes ------------------------------------------------------


async def test_a_fresh_delivery_is_called_before_the_app_answers_its_running_report(
    worker: Worker, calls: Calls
) -> None:
    """Nothing answers the reports here: the run still completes. Its
    RUNNING report, never sent, gives way to its result (the app records the
    RUNNING step of a run completed from PENDING)."""
    asked = time.monotonic()
    connect(worker, asked_at=asked, clock=asked + 1e6)
    leased = delivery(leased_at=asked + 1e6)
    queue = worker.reporter.queue
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            worker.receive(leased, tg)
            await calls.called.wait()
            while not any(q.report.state == "COMPLETED" for q in queue.queued):
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert calls.values == [7]
    queued = [(q.report.state, q.report.run_id, q.report.result) for q in queue.queued]
    assert queued == [("COMPLETED", leased.id, 7)]


async def test_a_delivery_not_provably_fresh_waits_for_its_running_report_to_be_accepted(
    worker: Worker, calls: Calls
) -> None:
    """It may have sat in a half-open link while its lease went to another
    worker: the app must accept its start before the task is called."""
    asked = time.monotonic()
    connect(worker, asked_at=asked, clock=asked + 1e6)
    leased = delivery(leased_at=None)
    queue = worker.reporter.queue
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            worker.receive(leased, tg)
            await queue.urgent.wait()  # the start report, sent at once
            [start] = queue.take_batch(max_body_bytes=1 << 20)
            assert (start.report.state, start.report.run_id) == ("RUNNING", leased.id)
            assert calls.values == []
            queue.settle([Outcome.ACCEPTED])
            await calls.called.wait()
            tg.cancel_scope.cancel()
    assert calls.values == [7]


# -- end to end ------------------------------------------------------------------------


def _terminal(base: str, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + timing.DEADLINE
    while True:
        doc: dict[str, Any] = httpx.get(f"{base}/tasks/runs/{run_id}", timeout=5).json()
        if doc["state"] in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {doc['state']}: {doc}")
        time.sleep(0.02)


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[str]:
    """An app whose leases are long (20 s: a delivery is fresh for 5 s, so
    runs start without waiting) and one worker; yields the base URL."""
    procs: list[Proc] = []
    try:
        app, base = start_app(db_url, tmp_path, BGTASKS_TEST_LEASE="20")
        procs.append(app)
        procs.append(start_worker(f"{base}/tasks", db_url, tmp_path))
        yield base
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_runs_started_by_a_real_worker_go_through_running_before_completed(
    served: str,
) -> None:
    """A fresh start does not wait for its RUNNING report but still sends
    it: every run's history shows it running before its result."""
    run_ids = []
    for i in range(8):
        response = httpx.post(
            f"{served}/tasks/runs", json={"task": "add", "args": [i, i]}, timeout=5
        )
        assert response.status_code == 202, response.text
        run_ids.append(str(response.json()["id"]))
    for i, run_id in enumerate(run_ids):
        doc = _terminal(served, run_id)
        assert (doc["state"], doc["result"]) == ("COMPLETED", 2 * i)
        assert doc["started_at"] is not None
        history = httpx.get(f"{served}/tasks/runs/{run_id}/history", timeout=5).json()
        states = [t["to_state"] for t in history["transitions"]]
        assert states == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]


def _running_and_final(d: Delivery) -> tuple[Report, Report]:
    running = Report(run_id=d.id, lease_token=d.lease_token, state="RUNNING")
    return running, Report(run_id=d.id, lease_token=d.lease_token, state="COMPLETED", result=1)


async def test_an_unsent_running_report_gives_way_to_the_completed_one() -> None:
    queue = ReportQueue()
    running, final = _running_and_final(delivery(leased_at=None))
    queue.enqueue(running)
    queue.enqueue(final)
    assert [q.report for q in queue.queued] == [final]


async def test_a_running_report_being_sent_is_never_dropped() -> None:
    """The reports in flight are removed by position once the request
    returns: taking one out from under it would drop another report."""
    queue = ReportQueue()
    running, final = _running_and_final(delivery(leased_at=None))
    queue.enqueue(running)
    assert len(queue.take_batch(max_body_bytes=1 << 20)) == 1
    queue.enqueue(final)
    assert [q.report for q in queue.queued] == [running, final]


async def test_a_running_report_of_another_lease_is_kept() -> None:
    queue = ReportQueue()
    running, final = _running_and_final(delivery(leased_at=None))
    other = final.model_copy(update={"lease_token": "another-lease"})
    queue.enqueue(running)
    queue.enqueue(other)
    assert [q.report for q in queue.queued] == [running, other]
