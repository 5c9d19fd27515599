"""① Submitting runs: the `Submitter` dependency and the routes a submission
can take (the store, or the mounted API over HTTP). The HTTP endpoints that
take submissions are in `intake`, so that a worker, which submits over HTTP,
never imports FastAPI.

Arguments are validated where the call is made, so a bad call raises in the
caller and nothing is stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from .errors import (
    IdempotencyConflict,
    PayloadTooLarge,
    RemoteError,
    RunNotFound,
    StoreUnavailable,
    TaskNotFound,
)
from .models import MAX_MAP_CALLS, MapResponse, RunDocument, document_from_row
from .taskrun import TaskRun

if TYPE_CHECKING:
    from .app import BgTasks
    from .feed import Wakeups
    from .store import Store
    from .tasks import Task

__all__ = ["HttpRoute", "Route", "StoreRoute", "Submitter"]


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

    def __init__(self, hub: BgTasks, store: Store, wakeups: Wakeups | None) -> None:
        self.hub = hub
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


class HttpRoute:
    """Over HTTP to the mounted API: workers, and processes given BGTASKS_URL."""

    def __init__(
        self, url: str, token: str | None, client: httpx.AsyncClient | None = None
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._owns_client = client is None
        self.client = client or httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(30.0, connect=10.0)
        )
        self._headers = headers

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
        body: dict[str, Any] = {"task": task.name, "args": args, "kwargs": kwargs}
        if countdown is not None:
            body["countdown"] = countdown
        if eta is not None:
            body["eta"] = eta.isoformat()
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        if priority:
            body["priority"] = priority
        response = await self._request("POST", "/runs", json=body)
        return RunDocument.model_validate(response.json())

    async def submit_many(
        self, task: Task[Any, Any], calls: list[tuple[list[Any], dict[str, Any]]]
    ) -> list[RunDocument]:
        if len(calls) > MAX_MAP_CALLS:
            raise PayloadTooLarge(
                f"A map over HTTP takes at most {MAX_MAP_CALLS} calls (POST /runs/batch), "
                f"not {len(calls)}: split the items. Nothing was stored."
            )
        body = {"task": task.name, "calls": [{"args": a, "kwargs": k} for a, k in calls]}
        response = await self._request("POST", "/runs/batch", json=body)
        return MapResponse.model_validate_json(response.content).runs

    async def read_run(self, run_id: uuid.UUID) -> RunDocument:
        response = await self._request("GET", f"/runs/{run_id}")
        return RunDocument.model_validate(response.json())

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.client.request(
                method, self.url + path, headers=self._headers, **kwargs
            )
        except httpx.HTTPError as exc:
            raise StoreUnavailable(
                f"The task API at {self.url} is unreachable: {type(exc).__name__}: {exc}"
            ) from exc
        if response.status_code < 400:
            return response
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text[:200]}
        if response.status_code == 404 and body.get("error") == "task_not_found":
            raise TaskNotFound(body.get("message"))
        if response.status_code == 404 and body.get("error") == "run_not_found":
            raise RunNotFound(body.get("message"))
        if response.status_code == 409 and body.get("error") == "idempotency_conflict":
            raise IdempotencyConflict(body.get("message"))
        if response.status_code == 413:
            raise PayloadTooLarge(body.get("message"))
        if response.status_code == 503:
            raise StoreUnavailable(body.get("message"))
        raise RemoteError(response.status_code, body, self.url + path)

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()
