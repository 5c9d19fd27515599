"""③ Wake-ups inside one app process: runs were added, a worker's credit
freed, runs changed. Feeds and event streams wait on these instead of
polling the store; a change to a run wakes only the streams on that run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

import anyio

from .watchers import RunWatchers

__all__ = ["ANY_TASK", "NOTIFY_WINDOW", "Wakeups", "wait_any"]


# The NOTIFY payload for "some task": feeds in other processes re-claim for all.
ANY_TASK = "*"
NOTIFY_WINDOW = 0.005
# A feed serving more tasks than this wakes for new runs of any task.
_FEW_TASKS = 8


class Wakeups:
    """In-process signals: runs were added, a worker's credit freed, runs
    changed. Each is an event replaced when fired, so a waiter takes the
    current one *before* it looks at the store and misses nothing. Changed
    runs go to `watched`, the event streams' shared copies, by run id."""

    def __init__(self) -> None:
        # Runs of any task became due (a rescue, a retry, another process's
        # write); runs of one task (a submit): only its feeds wake.
        self._runs = anyio.Event()
        self._by_task: dict[str, anyio.Event] = {}
        self._some = anyio.Event()
        self.watched = RunWatchers()
        self._workers: dict[str, anyio.Event] = {}
        self._to_notify: set[str] = set()
        self._notify = anyio.Event()
        # Workers whose leases the reaper took: their open feeds are closed
        # (a half-open link would otherwise keep leasing runs into the void).
        self.lost_workers: set[str] = set()

    def runs_events(self, tasks: Sequence[str]) -> list[anyio.Event]:
        """What a feed serving `tasks` waits on for new runs."""
        if len(tasks) > _FEW_TASKS:
            return [self._runs, self._some]
        events = [self._runs]
        for task in tasks:
            event = self._by_task.get(task)
            if event is None:
                if len(self._by_task) >= 10_000:  # names no submit ever came for
                    self._fire_tasks()
                event = self._by_task[task] = anyio.Event()
            events.append(event)
        return events

    def _fire_tasks(self) -> None:
        """Wake every feed waiting on one task's event (they wait again)."""
        events, self._by_task = self._by_task, {}
        for event in events.values():
            event.set()

    def worker_event(self, worker_id: str) -> anyio.Event:
        event = self._workers.get(worker_id)
        if event is None:
            event = self._workers[worker_id] = anyio.Event()
        return event

    def forget_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def runs_added(self, task: str | None, *, local: bool = True) -> None:
        """Runs of `task` (None or ANY_TASK: of any task) became due; `local`
        ones are also announced to other processes."""
        if task is None or task == ANY_TASK:
            self._runs.set()
            self._runs = anyio.Event()
        else:
            event = self._by_task.pop(task, None)
            if event is not None:
                event.set()
            self._some.set()
            self._some = anyio.Event()
        if local and task is not None:
            self._to_notify.add(task)
            self._notify.set()

    def runs_added_elsewhere(self, tasks: str | None) -> None:
        """Another process says runs of these tasks (a NOTIFY payload of
        comma-joined names) became due; None: of some task, which is unknown."""
        names = tasks.split(",") if tasks else []
        # A name with a comma of its own cannot be told apart: wake every feed.
        if not names or any("," in task for task in self._by_task):
            self.runs_added(None, local=False)
            return
        for name in names:
            self.runs_added(name, local=False)

    def worker_freed(self, worker_id: str) -> None:
        event = self._workers.pop(worker_id, None)
        if event is not None:
            event.set()

    def worker_lost(self, worker_id: str) -> None:
        if len(self.lost_workers) > 10_000:  # ids of workers that never came back
            self.lost_workers.clear()
        self.lost_workers.add(worker_id)
        self.worker_freed(worker_id)

    def runs_changed(self, run_ids: Iterable[uuid.UUID]) -> None:
        """These runs changed here: streams on them (and only them) are woken."""
        self.watched.changed(run_ids)

    def runs_changed_elsewhere(self) -> None:
        """Another process wrote, which runs is not known: every watched run
        is read again (at most once per `poll_seconds`)."""
        self.watched.changed_elsewhere()

    async def next_notification(self) -> list[str]:
        await self._notify.wait()
        return self.take_notifications()

    def notify_again(self, tasks: Iterable[str]) -> None:
        """Tasks whose NOTIFY failed: sent with the next one."""
        self._to_notify.update(tasks)
        self._notify.set()

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
