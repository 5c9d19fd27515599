"""The `@bg.task` decorator's product: a function plus how to defer it, and
the registry a worker finds tasks in.

`Task[P, T]` carries the function's parameters `P` and its *awaited* result
`T` (an `async def f(x: int) -> str` is a `Task[[int], str]`), so
`await (await f.delay(1)).result()` is typed `str`. Calling a task runs the
plain function: `SyncTask` returns its value, `AsyncTask` its coroutine.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Coroutine, Iterable, Sequence
from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Literal,
    ParamSpec,
    Protocol,
    TypeVar,
    cast,
    overload,
)

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .codec import Codec
from .errors import ConfigurationError, DuplicateTaskName, TaskNotFound
from .schedule import NOW, Schedule
from .taskrun import TaskRun

if TYPE_CHECKING:
    import asyncio
    import uuid

    from .wire import RunDocument

__all__ = [
    "AsyncTask",
    "Dispatcher",
    "RemoteRoute",
    "SyncTask",
    "Task",
    "TaskDecorator",
    "TaskOptions",
    "TaskRegistry",
]

P = ParamSpec("P")
T = TypeVar("T")

OnWorkerLost = Literal["retry", "fail"]


class Dispatcher(Protocol):
    """What a task's `delay`, `map`, `delay_sync` and `serve` call on: the
    hub's dispatch, which knows where this process's submissions go."""

    async def submit(
        self, task: Task[Any, T], args: Sequence[Any], kwargs: dict[str, Any], schedule: Schedule
    ) -> TaskRun[T]: ...

    async def submit_map(
        self, task: Task[Any, T], iterables: Sequence[Iterable[Any]], static: dict[str, Any]
    ) -> list[TaskRun[T]]: ...

    def submit_sync(
        self, task: Task[Any, T], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> TaskRun[T]: ...

    def serve(self, *tasks: Task[Any, Any], url: str | None = None, **options: Any) -> None: ...


class RemoteRoute(Protocol):
    """Where a worker sends what its tasks submit: the app that feeds it
    (`client.HttpRoute`)."""

    async def submit(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        schedule: Schedule,
    ) -> RunDocument: ...

    async def submit_many(
        self, task: Task[Any, Any], calls: list[tuple[list[Any], dict[str, Any]]]
    ) -> list[RunDocument]: ...

    async def read_run(self, run_id: uuid.UUID) -> RunDocument: ...

    async def aclose(self) -> None: ...


class TaskDecorator(Protocol):
    """What `@bg.task(...)` with options returns."""

    @overload
    def __call__(  # type: ignore[overload-overlap]  # an async def matches both; first wins
        self, fn: Callable[P, Coroutine[Any, Any, T]], /
    ) -> AsyncTask[P, T]: ...

    @overload
    def __call__(self, fn: Callable[P, T], /) -> SyncTask[P, T]: ...


class TaskRegistry:
    """The tasks of one hub by name, and the limits every task's calls obey.

    A worker finds tasks here (never through the hub) and, while it serves
    them, sets `worker_route` and `worker_loop`: what its tasks submit goes
    back over HTTP to the app that feeds it.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        max_args_bytes: int,
        max_result_bytes: int,
        max_rescues: int,
    ) -> None:
        self.dispatcher = dispatcher
        self.max_args_bytes = max_args_bytes
        self.max_result_bytes = max_result_bytes
        self.max_rescues = max_rescues
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.worker_route: RemoteRoute | None = None
        self.worker_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<TaskRegistry tasks={sorted(self.tasks)}>"

    @overload
    def add(  # type: ignore[overload-overlap]  # an async def matches both; first wins
        self, fn: Callable[P, Coroutine[Any, Any, T]], name: str | None, options: TaskOptions
    ) -> AsyncTask[P, T]: ...

    @overload
    def add(self, fn: Callable[P, T], name: str | None, options: TaskOptions) -> SyncTask[P, T]: ...

    def add(self, fn: Callable[..., Any], name: str | None, options: TaskOptions) -> Task[Any, Any]:
        """Register `fn` under `name` (default: its `__name__`)."""
        if isinstance(fn, Task):
            fn = fn.fn
        task_name = name or getattr(fn, "__name__", None)
        if not task_name or len(task_name) > 200 or not task_name.isprintable():
            raise ConfigurationError(f"Invalid task name {task_name!r}")
        kind: type[Task[Any, Any]] = AsyncTask if inspect.iscoroutinefunction(fn) else SyncTask
        task = kind(fn, registry=self, name=task_name, options=options)
        existing = self.tasks.get(task_name)
        if existing is not None and not _same_function(existing.fn, fn):
            raise DuplicateTaskName(
                f"Task name {task_name!r} is taken by {_where(existing.fn)}; "
                f"cannot also register {_where(fn)}. Pass name=... to one of them."
            )
        self.tasks[task_name] = task
        return task

    def get(self, name: str) -> Task[Any, Any]:
        """The task of that name, or `TaskNotFound`."""
        try:
            return self.tasks[name]
        except KeyError:
            raise TaskNotFound(f"No task named {name!r} is registered.") from None


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """The same function re-registered: a module also run as __main__, or reloaded."""
    if a is b:
        return True
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (
        getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None)
        and code_a is not None
        and code_b is not None
        and os.path.realpath(code_a.co_filename) == os.path.realpath(code_b.co_filename)
    )


def _where(fn: Callable[..., Any]) -> str:
    code = getattr(fn, "__code__", None)
    location = f" ({code.co_filename}:{code.co_firstlineno})" if code else ""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)!s}{location}"


class TaskOptions(BaseModel):
    """How a task's runs are retried, timed out and rescued."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    retries: int = Field(default=0, ge=0, le=1000)
    retry_delay_seconds: float | tuple[float, ...] = 0.0
    timeout_seconds: float | None = Field(default=None, gt=0)
    max_rescues: int | None = Field(default=None, ge=0, le=1000)
    on_worker_lost: OnWorkerLost = "retry"

    @classmethod
    def build(
        cls,
        *,
        retries: int,
        retry_delay_seconds: float | Sequence[float],
        timeout_seconds: float | None,
        max_rescues: int | None,
        on_worker_lost: OnWorkerLost,
    ) -> TaskOptions:
        """`@bg.task`'s keyword arguments, checked; `ConfigurationError` if not."""
        delays = retry_delay_seconds
        try:
            return cls(
                retries=retries,
                retry_delay_seconds=tuple(delays) if isinstance(delays, Sequence) else delays,
                timeout_seconds=timeout_seconds,
                max_rescues=max_rescues,
                on_worker_lost=on_worker_lost,
            )
        except ValidationError as exc:
            raise ConfigurationError(f"Invalid task options: {exc}") from exc

    def retry_delays(self) -> list[float]:
        """The back-off before retry 1, 2, ...; the last value repeats."""
        delays = self.retry_delay_seconds
        if isinstance(delays, tuple):
            values = list(delays) or [0.0]
        else:
            values = [delays]
        if any(d < 0 for d in values):
            raise ConfigurationError("retry_delay_seconds must not be negative")
        return [float(d) for d in values]


class Task(Generic[P, T]):
    """A function registered on a hub. Calling it runs it now, like the plain
    function; `delay` and `apply_async` store a run for a worker instead.
    `T` is what the function returns once awaited: `result()` gives a `T`."""

    fn: Callable[P, Any]

    def __init__(
        self,
        fn: Callable[P, Any],
        *,
        registry: TaskRegistry,
        name: str,
        options: TaskOptions,
    ) -> None:
        if not callable(fn):
            raise ConfigurationError(f"@task needs a function, got {fn!r}")
        self.fn = fn
        self.registry = registry
        self.name = name
        self.options = options
        self.is_async = inspect.iscoroutinefunction(fn)
        self.codec = Codec(fn, name)
        self.retry_delays = options.retry_delays()
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<Task {self.name!r} of {self.fn.__module__}.{self.fn.__qualname__}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T | Coroutine[Any, Any, T]:
        return cast("T | Coroutine[Any, Any, T]", self.fn(*args, **kwargs))

    @property
    def max_attempts(self) -> int:
        return self.options.retries + 1

    @property
    def max_rescues(self) -> int:
        if self.options.on_worker_lost == "fail":
            return 0
        if self.options.max_rescues is not None:
            return self.options.max_rescues
        return self.registry.max_rescues

    # -- arguments and results as JSON (see codec) -----------------------

    def dump_arguments(
        self, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Validate a call against the signature and return it as JSON values.

        Raises pydantic's `ValidationError` for a bad call, `NotSerializable`
        for values JSON cannot carry, and `PayloadTooLarge` over the hub's limit.
        """
        return self.codec.dump_arguments(args, kwargs, max_bytes=self.registry.max_args_bytes)

    def load_arguments(
        self, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Stored JSON back to typed values, validated again (the worker side)."""
        return self.codec.load_arguments(args, kwargs)

    def dump_result(self, value: Any) -> Any:
        """A return value as JSON; raises NotSerializable naming the type."""
        return self.codec.dump_result(value)

    def load_result(self, value: Any) -> T:
        """A stored result back to the declared return type."""
        return cast("T", self.codec.load_result(value))

    # -- deferring -------------------------------------------------------

    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskRun[T]:
        """Store a run of this task for a worker, and return it SCHEDULED."""
        return await self.registry.dispatcher.submit(self, args, kwargs, NOW)

    async def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
    ) -> TaskRun[T]:
        """`delay` with scheduling: `countdown` seconds or an aware `eta`, an
        idempotency key (a repeat returns the stored run), and a priority
        (higher runs first)."""
        schedule = Schedule(countdown, eta, idempotency_key, priority)
        return await self.registry.dispatcher.submit(
            self, tuple(args), dict(kwargs or {}), schedule
        )

    async def map(self, *iterables: Iterable[Any], **static: Any) -> list[TaskRun[T]]:
        """One run per item, like the builtin `map`: `zip(*iterables)` gives
        each run's positional arguments (the iterables must be as long as
        each other), `static` keyword arguments go to every run. Every call
        is validated before anything is stored; then all runs are stored in
        one transaction, or none."""
        return await self.registry.dispatcher.submit_map(self, iterables, static)

    def delay_sync(self, *args: P.args, **kwargs: P.kwargs) -> TaskRun[T]:
        """`delay` for synchronous code: a sync route, a script, a sync task."""
        return self.registry.dispatcher.submit_sync(self, args, kwargs)

    def serve(self, url: str | None = None, **options: Any) -> None:
        """Run a worker for this task in this process until interrupted."""
        self.registry.dispatcher.serve(self, url=url, **options)


class SyncTask(Task[P, T]):
    """A task of a plain `def`: calling it returns what the function returns."""

    fn: Callable[P, T]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.fn(*args, **kwargs)


class AsyncTask(Task[P, T]):
    """A task of an `async def`: calling it returns the function's coroutine;
    its runs' results are what that coroutine returns."""

    fn: Callable[P, Coroutine[Any, Any, T]]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T]:
        return self.fn(*args, **kwargs)
