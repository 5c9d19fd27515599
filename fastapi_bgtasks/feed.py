"""③ The feed: runs leased to a worker, pushed over Server-Sent Events, and
the app-side services that keep it prompt and honest (wake-ups, NOTIFY, the
reaper).

Feed events are deliveries: each `runs` event carries runs this worker now
holds a lease on. A run claimed but never handed to the stream (the claim
raced the reaper, or the stream closed first) is released at once, without
spending an attempt; one handed to the stream is the worker's until its
lease expires, since a fresh delivery starts without asking.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus
from fastapi import APIRouter, Depends, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from .errors import BgTasksError, InvalidName, RateLimited, StoreUnavailable
from .models import Hello

if TYPE_CHECKING:
    from .app import BgTasks, Running

__all__ = ["Wakeups", "feed_router", "run_services", "wait_any"]

log = logging.getLogger("fastapi_bgtasks.feed")


# The NOTIFY payload for "some task": feeds in other processes re-claim for all.
ANY_TASK = "*"
NOTIFY_WINDOW = 0.005


class Wakeups:
    """In-process signals: runs were added, a worker's credit freed, a run
    changed. Each is an event replaced when fired, so a waiter takes the
    current one *before* it looks at the store and misses nothing."""

    def __init__(self) -> None:
        self._runs = anyio.Event()
        self._changed = anyio.Event()
        self._workers: dict[str, anyio.Event] = {}
        self._to_notify: set[str] = set()
        self._notify = anyio.Event()
        # Workers whose leases the reaper took: their open feeds are closed
        # (a half-open link would otherwise keep leasing runs into the void).
        self.lost_workers: set[str] = set()

    def runs_event(self) -> anyio.Event:
        return self._runs

    def changed_event(self) -> anyio.Event:
        return self._changed

    def worker_event(self, worker_id: str) -> anyio.Event:
        event = self._workers.get(worker_id)
        if event is None:
            event = self._workers[worker_id] = anyio.Event()
        return event

    def forget_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def runs_added(self, task: str | None, *, local: bool = True) -> None:
        """Runs became due; `local` ones are also announced to other processes."""
        self._runs.set()
        self._runs = anyio.Event()
        if local and task is not None:
            self._to_notify.add(task)
            self._notify.set()

    def worker_freed(self, worker_id: str) -> None:
        event = self._workers.pop(worker_id, None)
        if event is not None:
            event.set()

    def worker_lost(self, worker_id: str) -> None:
        if len(self.lost_workers) > 10_000:  # ids of workers that never came back
            self.lost_workers.clear()
        self.lost_workers.add(worker_id)
        self.worker_freed(worker_id)

    def run_changed(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def next_notification(self) -> list[str]:
        await self._notify.wait()
        return self.take_notifications()

    def take_notifications(self) -> list[str]:
        self._notify = anyio.Event()
        tasks, self._to_notify = sorted(self._to_notify), set()
        return tasks


async def wait_any(events: list[anyio.Event], timeout: float) -> None:
    """Return when any event is set or `timeout` seconds pass."""
    if any(e.is_set() for e in events):
        return
    with anyio.move_on_after(max(timeout, 0.0)):
        async with anyio.create_task_group() as tg:

            async def waiter(event: anyio.Event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            for event in events:
                tg.start_soon(waiter, event)


async def run_services(
    hub: BgTasks, running: Running, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """The lifespan's background work, each in the lifespan's task group."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_reaper, hub, running)
        tg.start_soon(_watcher, running)
        if running.store.is_pg:
            tg.start_soon(_notifier, running)
        task_status.started()


async def _reaper(hub: BgTasks, running: Running) -> None:
    while True:
        reaped: list[tuple[Any, str, str | None]] = []
        try:
            # Shielded (and bounded): a statement cancelled mid-way by the
            # lifespan's exit strands aiosqlite's connection thread.
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                reaped = await running.store.reap_expired_runs(
                    on_lost=lambda workers: _mark_lost(running, workers)
                )
        except StoreUnavailable as exc:
            log.warning("Reaper: %s", exc)
        except Exception:
            # A service must outlive any one failure: ending here would end
            # the lifespan and leave every route answering 503.
            log.exception("Reaper pass failed; retrying")
        if reaped:
            for run_id, state, worker_id in reaped:
                log.warning(
                    "Run %s lost its worker %s (lease expired): now %s", run_id, worker_id, state
                )
                if worker_id is not None:
                    running.wakeups.worker_lost(worker_id)
            running.wakeups.runs_added(ANY_TASK)
            running.wakeups.run_changed()
        await anyio.sleep(hub.reaper_seconds)


def _mark_lost(running: Running, workers: set[str]) -> None:
    for worker_id in workers:
        running.wakeups.worker_lost(worker_id)


async def _watcher(running: Running) -> None:
    def on_change(_task: str | None) -> None:
        running.wakeups.runs_added(None, local=False)
        running.wakeups.run_changed()

    while True:
        try:
            await running.store.watch(on_change)
        except Exception:
            log.exception("Wake-up watcher failed; restarting it")
        await anyio.sleep(1.0)


async def _notifier(running: Running) -> None:
    # NOTIFY after the submit committed, outside its transaction, coalesced:
    # a burst of submits costs one NOTIFY per task.
    while True:
        tasks = await running.wakeups.next_notification()
        # A few milliseconds of coalescing turn a burst of submits into one
        # NOTIFY; other processes still hear of new runs within milliseconds.
        await anyio.sleep(NOTIFY_WINDOW)
        tasks = sorted({*tasks, *running.wakeups.take_notifications()})
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await running.store.notify(tasks)
        except Exception as exc:
            log.warning("NOTIFY failed (%s); other app processes will poll", exc)
            await anyio.sleep(0.5)


def _runs_event(rows: list[dict[str, Any]], leased_at: float | None = None) -> Any:
    """A `runs` event in the `Delivery` wire shape, built straight from the
    claimed rows (stored JSON needs no validating again) on the hot path."""
    deliveries = [
        {
            "id": str(r["id"]),
            "task": r["task"],
            "attempt": r["attempt"],
            "lease_token": r["lease_token"],
            "args": r["args"],
            "kwargs": r["kwargs"],
            "timeout_seconds": r["timeout_seconds"],
            "leased_at": leased_at,
        }
        for r in rows
    ]
    return ServerSentEvent(data=json.dumps(deliveries, separators=(",", ":")), event="runs")


async def _deliveries(
    hub: BgTasks,
    running: Running,
    worker_id: str,
    tasks: list[str],
    slots: int,
    shutdown: anyio.Event,
) -> AsyncIterator[Any]:
    store = running.store
    wakeups = running.wakeups
    hello = Hello(
        worker_id=worker_id,
        lease_seconds=hub.lease_seconds,
        heartbeat_seconds=hub.heartbeat_seconds,
        report_interval=hub.report_interval,
        max_body_bytes=hub.worker_body_bytes,
        max_result_bytes=hub.max_result_bytes,
        clock=time.monotonic(),
    )
    wakeups.lost_workers.discard(worker_id)  # it is back: serve it again
    yield ServerSentEvent(data=hello.model_dump_json(), event="hello")
    deadline = time.monotonic() + hub.feed_max_seconds
    unsent: list[dict[str, Any]] = []
    try:
        # A reconnecting worker first gets what it already holds.
        resend = await store.leased_to(worker_id, tasks)
        if resend:
            yield _runs_event(resend)
        while not (shutdown.is_set() or running.closing.is_set()):
            if time.monotonic() >= deadline or worker_id in wakeups.lost_workers:
                break
            events = [
                wakeups.runs_event(),
                wakeups.worker_event(worker_id),
                shutdown,
                running.closing,
            ]
            try:
                # Stamped before the claim: the lease cannot be older than this.
                leased_at = time.monotonic()
                unsent = await store.claim(
                    worker_id=worker_id,
                    tasks=tasks,
                    slots=slots,
                    lease_seconds=hub.lease_seconds,
                )
                if unsent and worker_id in wakeups.lost_workers:
                    # Reaped meanwhile: hand back what this claim took, now.
                    taken, unsent = unsent, []
                    await store.release_unsent([(r["id"], r["lease_token"]) for r in taken])
                    wakeups.runs_added(None)
                    break
                if unsent:
                    event = _runs_event(unsent, leased_at)
                    # Handed to the stream, it may reach the worker even if
                    # the write is cut short, and a fresh delivery starts at
                    # once: from here its lease expires, it is never released.
                    unsent = []
                    yield event
                    # No second claim now: this one took every due run or
                    # all the credit, and the events taken before it fire
                    # for anything since (new runs, freed credit).
                timeout = min(hub.poll_seconds, deadline - time.monotonic())
                due = await store.next_due(tasks)
            except StoreUnavailable as exc:
                log.warning("Feed for %s: %s", worker_id, exc)
                timeout, due = min(hub.poll_seconds, 1.0), None
            if due is not None:
                wait = (due - datetime.now(UTC)).total_seconds()
                if wait > 0:
                    timeout = min(timeout, wait)
            await wait_any(events, timeout)
        yield ServerSentEvent(data="{}", event="bye")
    finally:
        if unsent:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    await store.release_unsent([(r["id"], r["lease_token"]) for r in unsent])
                    wakeups.runs_added(None)
                except BgTasksError as exc:  # the lease expires instead
                    log.warning("Could not release unsent runs: %s", exc)


def feed_router(hub: BgTasks) -> Any:
    from .access import worker_access
    from .models import ErrorBody

    router = APIRouter()

    @router.get(
        "/feed",
        summary="The run feed for one worker (SSE)",
        dependencies=[Depends(worker_access(hub))],
        response_class=EventSourceResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "hello, runs, bye"},
            401: {"model": ErrorBody, "description": "No worker credential"},
            422: {"model": ErrorBody, "description": "Bad parameters"},
            429: {"model": ErrorBody, "description": "Too many feeds"},
            503: {"model": ErrorBody, "description": "Lifespan not running"},
        },
    )
    async def feed(
        request: Request,
        task: list[str] = Query(min_length=1, max_length=1000),
        slots: int = Query(ge=1, le=10000),
        worker_id: str = Header(alias="X-Worker-Id", min_length=1, max_length=200),
    ) -> Any:
        running = hub.running
        if running is None:
            raise StoreUnavailable("The app's lifespan is not running.")
        if not worker_id.isprintable():
            raise InvalidName("X-Worker-Id must be printable text.")
        for name in task:
            if len(name) > 200 or not name.isprintable():
                raise InvalidName(f"Invalid task name {name[:50]!r}")
        total = sum(running.open_feeds.values())
        if total >= hub.max_feeds or running.open_feeds.get(worker_id, 0) >= 2:
            raise RateLimited(
                "Too many feeds are open (max_feeds, or 2 per worker id); try again shortly."
            )
        shutdown = anyio.Event()
        running.open_feeds[worker_id] = running.open_feeds.get(worker_id, 0) + 1

        async def stream() -> AsyncIterator[Any]:
            try:
                async for event in _deliveries(
                    hub, running, worker_id, sorted(set(task)), slots, shutdown
                ):
                    yield event
            finally:
                left = running.open_feeds.get(worker_id, 1) - 1
                if left <= 0:
                    running.open_feeds.pop(worker_id, None)
                    running.wakeups.forget_worker(worker_id)
                else:
                    running.open_feeds[worker_id] = left

        return EventSourceResponse(
            stream(),
            ping=5,
            send_timeout=30,
            shutdown_event=shutdown,
            shutdown_grace_period=1.0,
        )

    return router
