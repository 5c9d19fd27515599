"""`TaskRun`: the caller's handle on a submitted run (Prefect's "future").

It reads the run through whichever route submitted it (the store in the app,
HTTP elsewhere), so `wait()` and `result()` work the same in a route, a
script or a task running in a worker.
"""

from __future__ import annotations

import uuid
from typing import Any, Generic, Protocol, TypeVar, cast

import anyio

from .errors import TaskRunFailed
from .states import RunState
from .wire import RunDocument

__all__ = ["ResultLoader", "RunReader", "TaskRun"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class RunReader(Protocol):
    """Reads a run's document: the store, or the mounted API over HTTP."""

    async def read_run(self, run_id: uuid.UUID) -> RunDocument: ...


class ResultLoader(Protocol[T_co]):
    """Turns a stored result back into the task's return type: its `Task`."""

    def load_result(self, value: Any) -> T_co: ...


class TaskRun(Generic[T]):
    """A stored run of a task whose awaited result is a `T`. `state` is as
    of the last read: refresh(), wait() and result() read it again."""

    def __init__(
        self, document: RunDocument, reader: RunReader, task: ResultLoader[T] | None
    ) -> None:
        self.document = document
        self._reader = reader
        self._task = task

    def __repr__(self) -> str:
        return f"<TaskRun {self.id} {self.task_name} {self.state.value}>"

    @property
    def id(self) -> uuid.UUID:
        return self.document.id

    @property
    def task_name(self) -> str:
        return self.document.task

    @property
    def state(self) -> RunState:
        return self.document.state

    @property
    def attempt(self) -> int:
        return self.document.attempt

    async def refresh(self) -> RunState:
        """Read the run again; returns its state."""
        self.document = await self._reader.read_run(self.id)
        return self.document.state

    async def wait(self, timeout: float | None = None) -> RunState:
        """Return once the run is terminal; raise TimeoutError after `timeout` s."""
        interval = 0.005
        with anyio.fail_after(timeout):
            while not self.document.state.is_terminal:
                await anyio.sleep(interval)
                interval = min(interval * 1.5, 0.25)
                await self.refresh()
        return self.document.state

    async def result(self, timeout: float | None = None) -> T:
        """The task's return value, validated against its return annotation.

        Raises TaskRunFailed for a run that ended FAILED, CRASHED or CANCELLED.
        """
        await self.wait(timeout)
        doc = self.document
        if doc.state is not RunState.COMPLETED:
            error = doc.error
            raise TaskRunFailed(
                doc.id,
                doc.state,
                error.type if error else None,
                error.message if error else None,
            )
        if self._task is None:
            return cast("T", doc.result)
        return self._task.load_result(doc.result)
