"""① Submitting runs: the `Submitter` dependency, the schedule check, and the
routes a submission can take (the store here; the mounted API over HTTP in
`client`). The HTTP endpoints that take submissions are in `server.intake`,
so that a worker, which submits over HTTP, never imports FastAPI.

Arguments are validated where the call is made, so a bad call raises in the
caller and nothing is stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from .errors import (
    IdempotencyConflict,
    InvalidSchedule,
    RunNotFound,
)
from .taskrun import TaskRun
from .wire import RunDocument, document_from_row

if TYPE_CHECKING:
    from .hub import BgTasks
    from .server.wakeups import Wakeups
    from .store import Store
    from .tasks import Task

__all__ = ["Route", "StoreRoute", "Submitter", "check_schedule"]


class Submitter:
    """What `Depends(bg.submitter)` gives a route: defers runs of the hub's tasks."""

    def __init__(self, hub: BgTasks) -> None:
        self.hub = hub

    async def delay(self, task: Task[Any, Any], /, *args: Any, **kwargs: Any) -> TaskRun:
        """Store a run of `task` and return it SCHEDULED."""
        return await self.hub.submit(task, args, kwargs)

    async def apply_async(
        self,
        task: Task[Any, Any],
        /,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
    ) -> TaskRun:
        """`delay` with a schedule, an idempotency key and a priority."""
        return await self.hub.submit(
            task,
            tuple(args),
            dict(kwargs or {}),
            countdown=countdown,
            eta=eta,
            idempotency_key=idempotency_key,
            priority=priority,
        )

    async def map(
        self, task: Task[Any, Any], /, *iterables: Iterable[Any], **static: Any
    ) -> list[TaskRun]:
        """Many runs of `task` at once, stored together or not at all (see `Task.map`)."""
        return await self.hub.submit_map(task, iterables, static)


class Route(Protocol):
    """Where this process's submissions go and its run reads come from."""

    async def submit(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        countdown: float | None,
        eta: datetime | None,
        idempotency_key: str | None,
        priority: int,
    ) -> RunDocument: ...

    async def submit_many(
        self, task: Task[Any, Any], calls: list[tuple[list[Any], dict[str, Any]]]
    ) -> list[RunDocument]: ...

    async def read_run(self, run_id: uuid.UUID) -> RunDocument: ...

    async def aclose(self) -> None: ...


class StoreRoute:
    """Straight to the store: the app's own (lifespan) or one opened lazily,
    which checks for the schema but never creates it."""

    def __init__(self, store: Store, wakeups: Wakeups | None) -> None:
        self.store = store
        self.wakeups = wakeups
        self._checked = wakeups is not None

    async def _ready(self) -> Store:
        if not self._checked:
            await self.store.open()
            await self.store.check_schema()
            self._checked = True
        return self.store

    async def submit(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        countdown: float | None,
        eta: datetime | None,
        idempotency_key: str | None,
        priority: int,
    ) -> RunDocument:
        document, _ = await self.submit_row(
            task,
            args,
            kwargs,
            countdown=countdown,
            eta=eta,
            idempotency_key=idempotency_key,
            priority=priority,
        )
        return document

    async def submit_row(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        countdown: float | None,
        eta: datetime | None,
        idempotency_key: str | None,
        priority: int,
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
            priority=priority,
            countdown=countdown,
            eta=eta,
            idempotency_key=idempotency_key,
            # No lifespan here to coalesce NOTIFYs: the insert sends its own.
            notify=self.wakeups is None,
        )
        if not created and (row["args"] != args or row["kwargs"] != kwargs):
            raise IdempotencyConflict(
                f"Idempotency key {idempotency_key!r} was used for run {row['id']} of "
                f"{task.name!r} with other arguments."
            )
        if created and self.wakeups is not None:
            self.wakeups.runs_added(task.name)
        return document_from_row(row), created

    async def submit_many(
        self, task: Task[Any, Any], calls: list[tuple[list[Any], dict[str, Any]]]
    ) -> list[RunDocument]:
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


def check_schedule(countdown: float | None, eta: datetime | None, priority: int) -> None:
    if countdown is not None and eta is not None:
        raise InvalidSchedule("Pass countdown or eta, not both.")
    if countdown is not None and not (0 <= countdown <= 10 * 365 * 86400):
        raise InvalidSchedule("countdown must be between 0 seconds and 10 years.")
    if eta is not None and (eta.tzinfo is None or eta.utcoffset() is None):
        raise InvalidSchedule("eta must be timezone-aware (e.g. datetime.now(UTC)).")
    if not (-(2**31) <= priority < 2**31):
        raise InvalidSchedule("priority must fit in 32 bits.")
