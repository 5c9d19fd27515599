"""③ The feed: runs leased to a worker, pushed over Server-Sent Events.

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
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Header, Query
from sse_starlette import EventSourceResponse, ServerSentEvent

from ..errors import (
    AccessDenied,
    BgTasksError,
    InvalidName,
    InvalidRequest,
    RateLimited,
    StoreUnavailable,
)
from ..wire import Hello
from .access import WORKER
from .context import Hub, Live
from .responses import declare
from .wakeups import ANY_TASK, Wakeups, wait_any

if TYPE_CHECKING:
    from ..store import Store
    from ..store.transitions import Claimed
    from .context import Running, ServerHub

__all__ = ["router"]

log = logging.getLogger("fastapi_bgtasks.feed")

router = APIRouter()


def _runs_event(
    rows: Sequence[Mapping[str, Any]], leased_at: float | None = None
) -> ServerSentEvent:
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
    hub: ServerHub,
    running: Running,
    worker_id: str,
    tasks: list[str],
    slots: int,
    shutdown: anyio.Event,
) -> AsyncIterator[ServerSentEvent]:
    store, wakeups = running.store, running.wakeups
    wakeups.lost_workers.discard(worker_id)  # it is back: serve it again
    yield _hello_event(hub, worker_id)
    deadline = time.monotonic() + hub.settings.feed_max_seconds
    unsent: Sequence[Mapping[str, Any]] = []
    try:
        # A reconnecting worker first gets what it already holds.
        resend = await store.leased_to(worker_id, tasks)
        if resend:
            yield _runs_event(resend)
        while not (shutdown.is_set() or running.closing.is_set()):
            if time.monotonic() >= deadline or worker_id in wakeups.lost_workers:
                break
            # Taken before the claim, so a change during it still wakes us.
            events = [*wakeups.runs_events(tasks), shutdown, running.closing]
            freed = wakeups.worker_event(worker_id)
            nothing_due = False
            try:
                # Stamped before the claim: the lease cannot be older than this.
                leased_at = time.monotonic()
                unsent = claimed = await _claim(hub, running, worker_id, tasks, slots)
                if unsent and worker_id in wakeups.lost_workers:
                    # Reaped meanwhile: hand back what this claim took, now.
                    taken, unsent = unsent, []
                    await _release_unsent(running, taken)
                    break
                if unsent:
                    event = _runs_event(unsent, leased_at)
                    wakeups.runs_changed(r["id"] for r in unsent)
                    # Handed to the stream, it may reach the worker even if
                    # the write is cut short, and a fresh delivery starts at
                    # once: from here its lease expires, it is never released.
                    unsent = []
                    yield event
                    # No second claim now: this one took every due run or
                    # all the credit, and the events taken before it fire
                    # for anything since (new runs, freed credit). Nor a
                    # read of the next due time: while runs flow, the
                    # worker's reports wake this feed, and credit freed on
                    # another app process is found by the poll.
                    timeout = min(deadline - time.monotonic(), hub.settings.poll_seconds)
                    nothing_due = claimed.exhausted
                else:
                    timeout, nothing_due = await _idle_wait(hub, store, tasks, deadline)
            except StoreUnavailable as exc:
                log.warning("Feed for %s: %s", worker_id, exc)
                timeout = min(hub.settings.poll_seconds, 1.0)
            await _rest(wakeups, worker_id, events, freed, timeout, nothing_due=nothing_due)
        yield ServerSentEvent(data="{}", event="bye")
    finally:
        if unsent:
            await _release_unsent(running, unsent)


async def _claim(
    hub: ServerHub, running: Running, worker_id: str, tasks: list[str], slots: int
) -> Claimed:
    """Lease this worker its share of the due runs (store.claim)."""
    return await running.store.claim(
        worker_id=worker_id,
        tasks=tasks,
        slots=slots,
        lease_seconds=hub.settings.lease_seconds,
        keys=running.serving.keys.get(worker_id),
        feeds=running.serving.feeds_for(tasks),
    )


def _hello_event(hub: ServerHub, worker_id: str) -> ServerSentEvent:
    """The feed's first event: the timing and limits the worker must use."""
    settings = hub.settings
    hello = Hello(
        worker_id=worker_id,
        lease_seconds=settings.lease_seconds,
        heartbeat_seconds=settings.heartbeat_seconds,
        report_interval=settings.report_interval,
        max_body_bytes=settings.worker_body_bytes,
        max_result_bytes=settings.max_result_bytes,
        clock=time.monotonic(),
        takes_rejected=True,
    )
    return ServerSentEvent(data=hello.model_dump_json(), event="hello")


async def _rest(
    wakeups: Wakeups,
    worker_id: str,
    events: list[anyio.Event],
    freed: anyio.Event,
    timeout: float,
    *,
    nothing_due: bool,
) -> None:
    """Wait for any of `events` (new runs, shutdown), the worker's `freed`
    credit, or `timeout`. When the last claim found nothing due, freed
    credit alone is no reason to claim again: new runs, a rescue, a retry
    or a hand-back fire the runs events, and a scheduled run's time is the
    timeout. A worker's runs trickling in one by one so cost one claim
    each, not three statements."""
    until = time.monotonic() + timeout
    while True:
        await wait_any([*events, freed], until - time.monotonic())
        if (
            not (nothing_due and freed.is_set())
            or any(e.is_set() for e in events)
            or worker_id in wakeups.lost_workers
            or time.monotonic() >= until
        ):
            return
        freed = wakeups.worker_event(worker_id)  # a fresh one: wait on


async def _idle_wait(
    hub: ServerHub, store: Store, tasks: list[str], deadline: float
) -> tuple[float, bool]:
    """How long to wait for a wake-up after a claim that took nothing, and
    whether nothing is due now. A due run still
    waiting (this worker had no credit left, or a concurrent claim held it
    locked) is claimed again after `poll_seconds`: credit freed by reports
    on another app process announces nothing here. Otherwise only wake-ups
    end the wait (new runs, freed credit, a lease expired), or the time the
    next waiting run falls due: an idle feed sends no statement at all."""
    due_now, due = await store.waiting(tasks)
    timeout = deadline - time.monotonic()
    if due_now:
        timeout = min(timeout, hub.settings.poll_seconds)
    elif due is not None:
        wait = (due - datetime.now(UTC)).total_seconds()
        # Not yet due by the store's clock but past by ours: poll, not spin.
        timeout = min(timeout, wait if wait > 0 else hub.settings.poll_seconds)
    return timeout, not due_now


async def _release_unsent(running: Running, unsent: Sequence[Mapping[str, Any]]) -> None:
    """Claimed runs the stream never took: back to the queue at once, their
    attempt not counted (shielded: the stream may be closing)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        try:
            await running.store.release_unsent([(r["id"], r["lease_token"]) for r in unsent])
            # Announced to other app processes too: their idle feeds do not poll.
            running.wakeups.runs_added(ANY_TASK)
            running.wakeups.runs_changed(r["id"] for r in unsent)
        except BgTasksError as exc:  # the lease expires instead
            log.warning("Could not release unsent runs: %s", exc)


@router.get(
    "/feed",
    summary="The run feed for one worker (SSE)",
    dependencies=WORKER,
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "hello, runs, bye"},
        **declare(AccessDenied, InvalidRequest, InvalidName, RateLimited, StoreUnavailable),
    },
)
async def feed(
    hub: Hub,
    running: Live,
    task: list[str] = Query(min_length=1, max_length=1000),
    slots: int = Query(ge=1, le=10000),
    worker_id: str = Header(alias="X-Worker-Id", min_length=1, max_length=200),
    signature: list[str] = Query(default=[], max_length=1000),
) -> EventSourceResponse:
    if not worker_id.isprintable():
        raise InvalidName("X-Worker-Id must be printable text.")
    for name in task:
        if len(name) > 200 or not name.isprintable():
            raise InvalidName(f"Invalid task name {name[:50]!r}")
    total = sum(running.open_feeds.values())
    if total >= hub.settings.max_feeds or running.open_feeds.get(worker_id, 0) >= 2:
        raise RateLimited(
            "Too many feeds are open (max_feeds, or 2 per worker id); try again shortly."
        )
    # name:fingerprint per task (none from older workers): logged if it
    # differs from this app's; runs rejected by that signature are skipped.
    running.serving.compare(worker_id, signature, hub.tasks)
    shutdown = anyio.Event()
    running.open_feeds[worker_id] = running.open_feeds.get(worker_id, 0) + 1
    return EventSourceResponse(
        _feed_stream(hub, running, worker_id, sorted(set(task)), slots, shutdown),
        ping=5,
        send_timeout=30,
        shutdown_event=shutdown,
        shutdown_grace_period=1.0,
    )


async def _feed_stream(
    hub: ServerHub,
    running: Running,
    worker_id: str,
    tasks: list[str],
    slots: int,
    shutdown: anyio.Event,
) -> AsyncIterator[ServerSentEvent]:
    """The deliveries, and this feed (and the tasks it announced it serves)
    counted open while they last."""
    running.serving.opened(tasks)
    try:
        async for event in _deliveries(hub, running, worker_id, tasks, slots, shutdown):
            yield event
    finally:
        running.serving.closed(tasks)
        left = running.open_feeds.get(worker_id, 1) - 1
        if left <= 0:
            running.open_feeds.pop(worker_id, None)
            running.wakeups.forget_worker(worker_id)
            running.serving.keys.pop(worker_id, None)
        else:
            running.open_feeds[worker_id] = left
