"""The run a worker is executing, as seen from inside the task.

A context variable, so it follows the task into its thread (anyio copies the
context into `to_thread.run_sync`) and never leaks between runs.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from dataclasses import dataclass, field

__all__ = ["RunContext", "cancelled", "current_run"]


@dataclass
class RunContext:
    run_id: str
    task: str
    attempt: int
    # Set (from the event loop) when the run is cancelled, times out or its
    # lease is lost; a sync task polls it through `cancelled()`.
    stop: threading.Event = field(default_factory=threading.Event)


_current: ContextVar[RunContext | None] = ContextVar("fastapi_bgtasks_run", default=None)


def current_run() -> RunContext | None:
    """The run being executed by this task, or None outside a worker."""
    return _current.get()


def cancelled() -> bool:
    """True once the running task should stop: cancelled, timed out, or its
    worker lost the lease. Sync tasks cannot be interrupted; check this."""
    run = _current.get()
    return run is not None and run.stop.is_set()
