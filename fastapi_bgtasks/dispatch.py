"""① Where this process's submissions go. Per event loop, first match wins:
the store of this hub's running lifespan; inside a worker, the app that
feeds it; `BGTASKS_URL`; else the store at `database_url`, opened lazily and
closed when that loop ends. `delay_sync` from a script gets a private loop.

Importing this module imports no SQLAlchemy: each destination is built on
first use.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .errors import ConfigurationError
from .schedule import NOW, Schedule
from .submit import Destination, HttpDestination, StoreRoute, submit_call, submit_calls
from .taskrun import TaskRun
from .tasks import Task, TaskRegistry

if TYPE_CHECKING:
    from .server.context import Running
    from .settings import Settings
    from .wire import RunDocument

__all__ = ["Dispatch"]

T = TypeVar("T")


async def _close_at_loop_end(closer: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    # asyncio.run() (and anyio.run) finalise pending async generators when
    # their loop ends: the one hook that closes what a script opened lazily,
    # so no aiosqlite thread or pool keeps the process alive at exit.
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await closer()


class Dispatch:
    """A hub's submissions: its task registry, and where each call goes.

    `running` is set by the hub's lifespan while it runs.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = TaskRegistry(
            self,
            max_args_bytes=settings.max_args_bytes,
            max_result_bytes=settings.max_result_bytes,
            max_rescues=settings.max_rescues,
        )
        self.running: Running | None = None
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Destination] = (
            weakref.WeakKeyDictionary()
        )
        self._finalizers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._private_loop: asyncio.AbstractEventLoop | None = None
        self._private_lock = threading.Lock()

    async def destination(self) -> Destination:
        """This loop's destination (see the module's docstring)."""
        loop = asyncio.get_running_loop()
        running = self.running
        if running is not None and running.loop is loop:
            return StoreRoute(running.store, running.wakeups)
        registry = self.registry
        if registry.worker_route is not None and registry.worker_loop is loop:
            # The worker owns its route and closes it.
            return HttpDestination(registry.worker_route)
        destination = self._per_loop.get(loop)
        if destination is None:
            destination = self._lazy_destination()
            self._per_loop[loop] = destination
            finalizer = _close_at_loop_end(destination.aclose)
            self._finalizers[loop] = finalizer
            await finalizer.__anext__()
        return destination

    def _lazy_destination(self) -> Destination:
        if self.settings.remote_url:
            from .client import HttpRoute

            return HttpDestination(HttpRoute(self.settings.remote_url, self.settings.token))
        from .store import Store

        return StoreRoute(Store(self.settings.database_url, pool_size=2), None)

    # -- the tasks' Dispatcher ---------------------------------------------

    async def submit(
        self,
        task: Task[Any, T],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        schedule: Schedule = NOW,
    ) -> TaskRun[T]:
        """Validate the call, store the run, return it SCHEDULED."""
        self._check_owner(task)
        document, _ = await submit_call(self.destination, task, args, kwargs, schedule)
        return TaskRun(document, self, task)

    async def submit_map(
        self, task: Task[Any, T], iterables: Sequence[Iterable[Any]], static: dict[str, Any]
    ) -> list[TaskRun[T]]:
        """`task.map` and `submit.map`: one run per item of zip(*iterables),
        every call validated before any is stored, all stored or none."""
        if not iterables:
            raise TypeError("map() needs at least one iterable of arguments")
        self._check_owner(task)
        calls = [(args, static) for args in zip(*iterables, strict=True)]
        documents = await submit_calls(self.destination, task, calls)
        return [TaskRun(document, self, task) for document in documents]

    async def read_run(self, run_id: uuid.UUID) -> RunDocument:
        """A run's document through this loop's destination (TaskRun's reader)."""
        return await (await self.destination()).read_run(run_id)

    def submit_sync(
        self, task: Task[Any, T], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> TaskRun[T]:
        """`delay` from synchronous code, on the loop that owns the destination."""
        for home in (self.running.loop if self.running else None, self.registry.worker_loop):
            if home is None or home.is_closed():
                continue
            if _loop_of_this_thread() is home:
                raise ConfigurationError(
                    "task.delay_sync() was called on the event loop's own thread; "
                    "use `await task.delay(...)` there."
                )
            return asyncio.run_coroutine_threadsafe(self.submit(task, args, kwargs), home).result()
        if _loop_of_this_thread() is not None:
            raise ConfigurationError(
                "task.delay_sync() was called inside a running event loop; "
                "use `await task.delay(...)` there."
            )
        loop = self._private()
        return asyncio.run_coroutine_threadsafe(self.submit(task, args, kwargs), loop).result()

    def serve(self, *tasks: Task[Any, Any], url: str | None = None, **options: Any) -> None:
        """Run a worker for these tasks (default: all) in this process, until
        interrupted; the same runtime as the CLI."""
        from .worker.runtime import WorkerConfig, configure_logging, run_worker

        target = url or self.settings.remote_url
        if not target:
            raise ConfigurationError(
                "serve() needs the URL of the mounted task API: pass url=... "
                "(e.g. http://127.0.0.1:8000/tasks) or set BGTASKS_URL."
            )
        names = [t.name for t in tasks] or sorted(self.registry.tasks)
        configure_logging(options.pop("log_level", "INFO"))
        config = WorkerConfig(
            url=target, token=options.pop("token", self.settings.token), **options
        )
        anyio.run(run_worker, self.registry, names, config)

    def _check_owner(self, task: Task[Any, Any]) -> None:
        if task.registry is not self.registry:
            raise ConfigurationError(f"{task!r} belongs to another hub")

    def _private(self) -> asyncio.AbstractEventLoop:
        """A daemon loop thread for synchronous scripts (no lifespan here)."""
        with self._private_lock:
            if self._private_loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="fastapi_bgtasks-submit", daemon=True
                )
                thread.start()
                self._private_loop = loop

                def close() -> None:
                    # Runs before the interpreter joins non-daemon threads, so
                    # the store's connection threads are closed first.
                    future = asyncio.run_coroutine_threadsafe(loop.shutdown_asyncgens(), loop)
                    try:
                        future.result(timeout=10)
                    finally:
                        loop.call_soon_threadsafe(loop.stop)

                threading._register_atexit(close)  # type: ignore[attr-defined]
            return self._private_loop


def _loop_of_this_thread() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
