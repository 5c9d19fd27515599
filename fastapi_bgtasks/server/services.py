"""The app-side services a running lifespan owns, each in its task group: the
reaper (expired leases back to SCHEDULED), the wake-up watcher (changes made
by other processes), the event streams' shared reader and, on PostgreSQL,
the coalescing NOTIFY sender.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from anyio.abc import TaskStatus

from ..errors import StoreUnavailable
from .context import Running, ServerHub
from .wakeups import ANY_TASK, NOTIFY_WINDOW

__all__ = ["run_services"]

log = logging.getLogger("fastapi_bgtasks.services")


async def run_services(
    hub: ServerHub, running: Running, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """The lifespan's background work, each in the lifespan's task group."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_reaper, hub, running)
        tg.start_soon(_watcher, running)
        tg.start_soon(running.wakeups.watched.serve, running.store, hub.settings.poll_seconds)
        if running.store.is_pg:
            tg.start_soon(_notifier, running)
        task_status.started()


async def _reaper(hub: ServerHub, running: Running) -> None:
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
        await _unserved(hub, running)
        if reaped:
            for run_id, state, worker_id in reaped:
                # Its worker's feeds were marked lost before the update
                # (`on_lost`); marking again now would close a feed the
                # worker has opened since, with a delivery in flight.
                log.warning(
                    "Run %s lost its worker %s (lease expired): now %s", run_id, worker_id, state
                )
            running.wakeups.runs_added(ANY_TASK)
            running.wakeups.runs_changed(run_id for run_id, _, _ in reaped)
        await anyio.sleep(hub.settings.reaper_seconds)


async def _unserved(hub: ServerHub, running: Running) -> None:
    """Warn once per task whose runs have waited longer than a lease while
    no worker connected here serves it."""
    tasks = running.serving.unserved(hub.tasks)
    if not tasks:
        return
    seconds = hub.settings.lease_seconds
    try:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            for task in await running.store.overdue(tasks, seconds):
                running.serving.warn(task, seconds)
    except Exception as exc:  # a hint only: never the reaper's end
        log.warning("Could not check for unserved tasks: %s", exc)


def _mark_lost(running: Running, workers: set[str]) -> None:
    for worker_id in workers:
        running.wakeups.worker_lost(worker_id)


async def _watcher(running: Running) -> None:
    def on_change(tasks: str | None) -> None:
        running.wakeups.runs_added_elsewhere(tasks)
        running.wakeups.runs_changed_elsewhere()

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
        failure: object = None
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10) as scope:
                await running.store.notify(tasks)
            if scope.cancelled_caught:
                failure = "no answer within 10 s"
        except Exception as exc:
            failure = exc
        if failure is not None:
            # Sent again, not dropped: idle feeds elsewhere do not poll.
            log.warning("NOTIFY failed (%s); retrying", failure)
            running.wakeups.notify_again(tasks)
            await anyio.sleep(0.5)
