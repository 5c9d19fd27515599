"""① Submitting runs: the one submit sequence (validate the call, then store
it at a destination) shared by `task.delay`, the `Submitter` dependency and
the HTTP intake (`server.intake`), and the destinations a submission can
take: the store, or the mounted API over HTTP (`client.HttpRoute`).

Arguments are validated where the call is made, so a bad call raises in the
caller and nothing is stored. Which destination a process uses is chosen in
`dispatch`.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

from .errors import IdempotencyConflict, RunNotFound
from .schedule import NOW, Schedule
from .taskrun import TaskRun
from .wire import RunDocument, document_from_row

if TYPE_CHECKING:
    from .store import Store
    from .tasks import Dispatcher, RemoteRoute, Task

__all__ = [
    "Destination",
    "HttpDestination",
    "StoreRoute",
    "Submitter",
    "Where",
    "submit_call",
    "submit_calls",
]

P = ParamSpec("P")
T = TypeVar("T")

Calls = list[tuple[list[Any], dict[str, Any]]]


# The destination is asked for only once the call is valid: a bad call opens
# no store and needs no running lifespan.
Where = Callable[[], Awaitable["Destination"]]


async def submit_call(
    where: Where,
    task: Task[Any, Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    schedule: Schedule = NOW,
) -> tuple[RunDocument, bool]:
    """Validate one call against the task's signature, then store it where
    `where()` says, with its (already checked) `schedule`. Returns the run's
    document and whether it was created (False: an idempotent repeat)."""
    json_args, json_kwargs = task.dump_arguments(args, kwargs)
    to = await where()
    return await to.submit_row(task, json_args, json_kwargs, schedule)


async def submit_calls(
    where: Where, task: Task[Any, Any], calls: Iterable[tuple[Sequence[Any], dict[str, Any]]]
) -> list[RunDocument]:
    """Validate every call first, then store them all where `where()` says,
    in one transaction (or none)."""
    dumped = [task.dump_arguments(args, kwargs) for args, kwargs in calls]
    if not dumped:
        return []
    return await (await where()).submit_many(task, dumped)


class Submitter:
    """What `Depends(bg.submitter)` gives a route: defers runs of the hub's tasks."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    async def delay(self, task: Task[P, T], /, *args: P.args, **kwargs: P.kwargs) -> TaskRun[T]:
        """Store a run of `task` and return it SCHEDULED."""
        return await self.dispatcher.submit(task, args, kwargs, NOW)

    async def apply_async(
        self,
        task: Task[P, T],
        /,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
    ) -> TaskRun[T]:
        """`delay` with a schedule, an idempotency key and a priority."""
        schedule = Schedule(countdown, eta, idempotency_key, priority)
        return await self.dispatcher.submit(task, tuple(args), dict(kwargs or {}), schedule)

    async def map(
        self, task: Task[P, T], /, *iterables: Iterable[Any], **static: Any
    ) -> list[TaskRun[T]]:
        """Many runs of `task` at once, stored together or not at all (see `Task.map`)."""
        return await self.dispatcher.submit_map(task, iterables, static)


class Destination(Protocol):
    """Where this process's submissions go and its run reads come from."""

    async def submit_row(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        schedule: Schedule,
    ) -> tuple[RunDocument, bool]: ...

    async def submit_many(self, task: Task[Any, Any], calls: Calls) -> list[RunDocument]: ...

    async def read_run(self, run_id: uuid.UUID) -> RunDocument: ...

    async def aclose(self) -> None: ...


class RunsAdded(Protocol):
    """The lifespan's wake-ups, told when runs of a task are stored."""

    def runs_added(self, task: str) -> None: ...


class StoreRoute:
    """Straight to the store: the app's own (lifespan) or one opened lazily,
    which checks for the schema but never creates it."""

    def __init__(self, store: Store, wakeups: RunsAdded | None) -> None:
        self.store = store
        self.wakeups = wakeups
        self._checked = wakeups is not None

    async def _ready(self) -> Store:
        if not self._checked:
            await self.store.open()
            await self.store.check_schema()
            self._checked = True
        return self.store

    async def submit_row(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        schedule: Schedule,
    ) -> tuple[RunDocument, bool]:
        store = await self._ready()
        row, created = await store.insert_run(
            task=task.name,
            args=args,
            kwargs=kwargs,
            max_attempts=task.max_attempts,
            max_rescues=task.max_rescues,
            retry_delays=task.retry_delays,
            timeout_seconds=task.options.timeout_seconds,
            priority=schedule.priority,
            countdown=schedule.countdown,
            eta=schedule.eta,
            idempotency_key=schedule.idempotency_key,
            # No lifespan here to coalesce NOTIFYs: the insert sends its own.
            notify=self.wakeups is None,
        )
        if not created and (row["args"] != args or row["kwargs"] != kwargs):
            raise IdempotencyConflict(
                f"Idempotency key {schedule.idempotency_key!r} was used for run {row['id']} of "
                f"{task.name!r} with other arguments."
            )
        if created and self.wakeups is not None:
            self.wakeups.runs_added(task.name)
        return document_from_row(row), created

    async def submit_many(self, task: Task[Any, Any], calls: Calls) -> list[RunDocument]:
        store = await self._ready()
        rows = await store.insert_runs(
            task=task.name,
            calls=calls,
            max_attempts=task.max_attempts,
            max_rescues=task.max_rescues,
            retry_delays=task.retry_delays,
            timeout_seconds=task.options.timeout_seconds,
            notify=self.wakeups is None,
        )
        if rows and self.wakeups is not None:
            self.wakeups.runs_added(task.name)
        return [document_from_row(row) for row in rows]

    async def read_run(self, run_id: uuid.UUID) -> RunDocument:
        store = await self._ready()
        row = await store.get_run(run_id)
        if row is None:
            raise RunNotFound(f"No run has id {run_id}.")
        return document_from_row(row)

    async def aclose(self) -> None:
        if self.wakeups is None:
            await self.store.close()


class HttpDestination:
    """Over HTTP to the mounted API (a worker's route, or `BGTASKS_URL`). A
    repeat of an idempotency key is answered like a new run here: only the
    HTTP intake, which stores directly, reports it."""

    def __init__(self, route: RemoteRoute) -> None:
        self.route = route

    async def submit_row(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        schedule: Schedule,
    ) -> tuple[RunDocument, bool]:
        document = await self.route.submit(task, args, kwargs, schedule)
        return document, True

    async def submit_many(self, task: Task[Any, Any], calls: Calls) -> list[RunDocument]:
        return await self.route.submit_many(task, calls)

    async def read_run(self, run_id: uuid.UUID) -> RunDocument:
        return await self.route.read_run(run_id)

    async def aclose(self) -> None:
        await self.route.aclose()
