"""Durable background tasks for FastAPI and Starlette, with no broker to run.

`bg = BgTasks()`, `@bg.task`, `await task.delay(...)` in a route, mount
`bg.app`, run `python -m fastapi_bgtasks.worker`. See docs/ for the rest.
"""

from .errors import (
    AccessDenied,
    BgTasksError,
    ConfigurationError,
    DuplicateTaskName,
    IdempotencyConflict,
    InvalidName,
    InvalidSchedule,
    InvalidValue,
    NotSerializable,
    PayloadTooLarge,
    RateLimited,
    RemoteError,
    RunFinished,
    RunNotFound,
    SchemaError,
    StoreUnavailable,
    SubmitError,
    TaskNotFound,
    TaskRunFailed,
)
from .hub import BgTasks
from .states import RunState
from .submit import Submitter
from .taskrun import TaskRun
from .tasks import Task
from .wire import RunDocument
from .worker.context import cancelled, current_run

__all__ = [
    "AccessDenied",
    "BgTasks",
    "BgTasksError",
    "ConfigurationError",
    "DuplicateTaskName",
    "IdempotencyConflict",
    "InvalidName",
    "InvalidSchedule",
    "InvalidValue",
    "NotSerializable",
    "PayloadTooLarge",
    "RateLimited",
    "RemoteError",
    "RunDocument",
    "RunFinished",
    "RunNotFound",
    "RunState",
    "SchemaError",
    "StoreUnavailable",
    "SubmitError",
    "Submitter",
    "Task",
    "TaskNotFound",
    "TaskRun",
    "TaskRunFailed",
    "__version__",
    "cancelled",
    "current_run",
]

__version__ = "0.1.0"
