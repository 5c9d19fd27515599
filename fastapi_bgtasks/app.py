"""`BgTasks`, the hub: the task registry, where submissions go, the mounted
API and the lifespan that runs the app-side services.

Importing this module does not import SQLAlchemy: a worker process imports
the user's tasks module (and so this one) and never touches the database.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

import anyio

from .errors import ConfigurationError, DuplicateTaskName, InvalidSchedule, TaskNotFound
from .models import RunDocument
from .taskrun import TaskRun
from .tasks import OnWorkerLost, Task, TaskOptions

if TYPE_CHECKING:
    from .access import FailureThrottle
    from .feed import Wakeups
    from .store import Store
    from .submitter import Route, Submitter

__all__ = ["DEFAULT_DATABASE_URL", "BgTasks"]

log = logging.getLogger("fastapi_bgtasks")

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./bgtasks.db"
MiB = 1024 * 1024


@dataclass
class Running:
    """What a running lifespan owns; the hub holds it only while it runs."""

    store: Store
    wakeups: Wakeups
    loop: asyncio.AbstractEventLoop
    thread_id: int
    closing: anyio.Event = field(default_factory=anyio.Event)
    open_feeds: dict[str, int] = field(default_factory=dict)
    open_streams: int = 0


async def _close_at_loop_end(closer: Callable[[], Any]) -> AsyncIterator[None]:
    # asyncio.run() (and anyio.run) finalise pending async generators when
    # their loop ends: the one hook that closes what a script opened lazily,
    # so no aiosqlite thread or pool keeps the process alive at exit.
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await closer()


class BgTasks:
    """The hub: register tasks on it, mount its `app`, run its `lifespan`.

    Creating it opens nothing. The database URL comes from the argument, else
    `BGTASKS_DATABASE_URL`, else a SQLite file `./bgtasks.db`.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        lease_seconds: float = 30.0,
        heartbeat_seconds: float | None = None,
        report_interval: float = 0.02,
        max_rescues: int = 3,
        token: str | None = None,
        auth: Any = None,
        url: str | None = None,
        max_body_bytes: int = MiB,
        max_args_bytes: int = MiB,
        max_result_bytes: int = MiB,
        poll_seconds: float = 1.0,
        reaper_seconds: float | None = None,
        feed_max_seconds: float = 300.0,
        max_feeds: int = 256,
        max_streams: int = 1024,
        max_list_limit: int = 500,
        pool_size: int = 10,
    ) -> None:
        if lease_seconds <= 0:
            raise ConfigurationError("lease_seconds must be positive")
        self.database_url = (
            database_url or os.environ.get("BGTASKS_DATABASE_URL") or DEFAULT_DATABASE_URL
        )
        self.lease_seconds = float(lease_seconds)
        # Three chances to renew before a lease can expire.
        self.heartbeat_seconds = float(heartbeat_seconds or self.lease_seconds / 4)
        if self.heartbeat_seconds >= self.lease_seconds / 2:
            raise ConfigurationError("heartbeat_seconds must be under half of lease_seconds")
        self.report_interval = float(report_interval)
        self.max_rescues = int(max_rescues)
        self.token = token if token is not None else os.environ.get("BGTASKS_TOKEN") or None
        self.auth = auth
        self.remote_url = url if url is not None else os.environ.get("BGTASKS_URL") or None
        self.max_body_bytes = int(max_body_bytes)
        self.max_args_bytes = int(max_args_bytes)
        self.max_result_bytes = int(max_result_bytes)
        # Worker reports carry results: their body limit leaves room for one
        # result of max_result_bytes plus its envelope and traceback.
        self.worker_body_bytes = max(self.max_body_bytes, self.max_result_bytes + 256 * 1024)
        self.poll_seconds = float(poll_seconds)
        self.reaper_seconds = float(reaper_seconds or min(self.lease_seconds / 4, 5.0))
        self.feed_max_seconds = float(feed_max_seconds)
        self.max_feeds = int(max_feeds)
        self.max_streams = int(max_streams)
        self.max_list_limit = int(max_list_limit)
        self.pool_size = int(pool_size)
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.running: Running | None = None
        # Set by a worker runtime serving this hub: submissions from its
        # tasks go back over HTTP to the app that feeds it.
        self.worker_route: Route | None = None
        self.worker_loop: asyncio.AbstractEventLoop | None = None
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Route] = (
            weakref.WeakKeyDictionary()
        )
        self._finalizers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._private_loop: asyncio.AbstractEventLoop | None = None
        self._private_lock = threading.Lock()
        self._app: Any = None
        self._auth_throttle: FailureThrottle | None = None

    @property
    def auth_throttle(self) -> FailureThrottle:
        """One count of refused credentials for every worker route of this
        hub. Made on first use: a worker process never imports the HTTP side."""
        if self._auth_throttle is None:
            from .access import FailureThrottle

            self._auth_throttle = FailureThrottle()
        return self._auth_throttle

    def __repr__(self) -> str:
        from .store import safe_url

        return f"<BgTasks {safe_url(self.database_url)} tasks={sorted(self.tasks)}>"

    # -- registering tasks -----------------------------------------------

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        retries: int = 0,
        retry_delay_seconds: float | Sequence[float] = 0.0,
        timeout_seconds: float | None = None,
        max_rescues: int | None = None,
        on_worker_lost: OnWorkerLost = "retry",
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(  # type: ignore[misc]  # mypy cannot match a ParamSpec across overloads
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 0,
        retry_delay_seconds: float | Sequence[float] = 0.0,
        timeout_seconds: float | None = None,
        max_rescues: int | None = None,
        on_worker_lost: OnWorkerLost = "retry",
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a sync or async function as a task, bare or with options."""
        from pydantic import ValidationError

        try:
            options = TaskOptions(
                retries=retries,
                retry_delay_seconds=(
                    tuple(retry_delay_seconds)
                    if isinstance(retry_delay_seconds, Sequence)
                    else retry_delay_seconds
                ),
                timeout_seconds=timeout_seconds,
                max_rescues=max_rescues,
                on_worker_lost=on_worker_lost,
            )
        except ValidationError as exc:
            raise ConfigurationError(f"Invalid task options: {exc}") from exc

        def register(func: Callable[P, R]) -> Task[P, R]:
            if isinstance(func, Task):
                func = func.fn
            task_name = name or getattr(func, "__name__", None)
            if not task_name or len(task_name) > 200 or not task_name.isprintable():
                raise ConfigurationError(f"Invalid task name {task_name!r}")
            task = Task(func, hub=self, name=task_name, options=options)
            existing = self.tasks.get(task_name)
            if existing is not None and not _same_function(existing.fn, func):
                raise DuplicateTaskName(
                    f"Task name {task_name!r} is taken by {_where(existing.fn)}; "
                    f"cannot also register {_where(func)}. Pass name=... to one of them."
                )
            self.tasks[task_name] = task
            return task

        if fn is not None:
            return register(fn)
        return register

    def get_task(self, name: str) -> Task[Any, Any]:
        try:
            return self.tasks[name]
        except KeyError:
            raise TaskNotFound(f"No task named {name!r} is registered.") from None

    # -- the mounted app, the dependency, the lifespan ---------------------

    @property
    def app(self) -> Any:
        """The ASGI app to mount: `app.mount("/tasks", bg.app)`."""
        if self._app is None:
            from .api import build_app

            self._app = build_app(self)
        return self._app

    def submitter(self) -> Submitter:
        """A FastAPI dependency: `submit: Submitter = Depends(bg.submitter)`."""
        from .submitter import Submitter

        return Submitter(self)

    def lifespan(self, app: Any = None) -> AbstractAsyncContextManager[None]:
        """Create or migrate the schema and run the app-side services.

        Pass it as `FastAPI(lifespan=bg.lifespan)`, or enter it in a host
        lifespan: `async with bg.lifespan(app): yield`. A mounted app gets no
        lifespan of its own, so the host must run this one.
        """
        return self._lifespan()

    @asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[None]:
        from .feed import Wakeups, run_services
        from .store import Store

        if self.running is not None:
            raise ConfigurationError("This hub's lifespan is already running.")
        store = Store(self.database_url, pool_size=self.pool_size)
        await store.open()
        try:
            await store.migrate()
            if self.token is None:
                log.warning(
                    "fastapi_bgtasks: no BGTASKS_TOKEN set; worker routes serve loopback "
                    "clients only. Set a token before exposing the app."
                )
            if self.auth is None:
                log.warning(
                    "fastapi_bgtasks: no auth= dependency; operator routes (submit, list, "
                    "cancel) serve loopback clients only."
                )
            running = Running(
                store=store,
                wakeups=Wakeups(),
                loop=asyncio.get_running_loop(),
                thread_id=threading.get_ident(),
            )
            async with anyio.create_task_group() as tg:
                await tg.start(run_services, self, running)
                self.running = running
                try:
                    yield
                finally:
                    self.running = None
                    running.closing.set()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()

    # -- where a submission goes -----------------------------------------

    async def route(self) -> Route:
        """First match wins: this process's lifespan store; the worker's URL;
        BGTASKS_URL; the store at database_url, opened lazily for this loop."""
        from .submitter import HttpRoute, StoreRoute

        loop = asyncio.get_running_loop()
        running = self.running
        if running is not None and running.loop is loop:
            return StoreRoute(self, running.store, running.wakeups)
        if self.worker_route is not None and self.worker_loop is loop:
            return self.worker_route
        route = self._per_loop.get(loop)
        if route is None:
            if self.remote_url:
                route = HttpRoute(self.remote_url, self.token)
            else:
                from .store import Store

                route = StoreRoute(self, Store(self.database_url, pool_size=2), None)
            self._per_loop[loop] = route
            finalizer = _close_at_loop_end(route.aclose)
            self._finalizers[loop] = finalizer
            await finalizer.__anext__()
        return route

    async def submit(
        self,
        task: Task[Any, Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
    ) -> TaskRun:
        """Validate the call, store the run, return it SCHEDULED."""
        if task.hub is not self:
            raise ConfigurationError(f"{task!r} belongs to another hub")
        check_schedule(countdown, eta, priority)
        json_args, json_kwargs = task.dump_arguments(args, kwargs)
        document = await (await self.route()).submit(
            task,
            json_args,
            json_kwargs,
            countdown=countdown,
            eta=eta,
            idempotency_key=idempotency_key,
            priority=priority,
        )
        return TaskRun(document, self, task)

    async def submit_map(
        self, task: Task[Any, Any], iterables: Sequence[Iterable[Any]], static: dict[str, Any]
    ) -> list[TaskRun]:
        """`task.map` and `submit.map`: one run per item of zip(*iterables)."""
        if not iterables:
            raise TypeError("map() needs at least one iterable of arguments")
        return await self.submit_many(task, [(a, static) for a in zip(*iterables, strict=True)])

    async def submit_many(
        self, task: Task[Any, Any], calls: Sequence[tuple[Sequence[Any], dict[str, Any]]]
    ) -> list[TaskRun]:
        """Validate every call first, then store them all in one transaction
        (or none): `task.map` and `submit.map`."""
        if task.hub is not self:
            raise ConfigurationError(f"{task!r} belongs to another hub")
        dumped = [task.dump_arguments(args, kwargs) for args, kwargs in calls]
        if not dumped:
            return []
        documents = await (await self.route()).submit_many(task, dumped)
        return [TaskRun(document, self, task) for document in documents]

    async def read_run(self, run_id: uuid.UUID) -> RunDocument:
        """A run's document through this loop's route (TaskRun's reader)."""
        return await (await self.route()).read_run(run_id)

    def submit_sync(
        self, task: Task[Any, Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> TaskRun:
        """`delay` from synchronous code, on the loop that owns the route."""
        for home in (self.running.loop if self.running else None, self.worker_loop):
            if home is None or home.is_closed():
                continue
            if _loop_of_this_thread() is home:
                raise ConfigurationError(
                    "task.delay_sync() was called on the event loop's own thread; "
                    "use `await task.delay(...)` there."
                )
            future = asyncio.run_coroutine_threadsafe(self.submit(task, args, kwargs), home)
            return future.result()
        if _loop_of_this_thread() is not None:
            raise ConfigurationError(
                "task.delay_sync() was called inside a running event loop; "
                "use `await task.delay(...)` there."
            )
        loop = self._private()
        return asyncio.run_coroutine_threadsafe(self.submit(task, args, kwargs), loop).result()

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

    # -- workers ---------------------------------------------------------

    def serve(self, *tasks: Task[Any, Any], url: str | None = None, **options: Any) -> None:
        """Run a worker for these tasks (default: all) in this process, until
        interrupted. The seed's `serve()`; same runtime as the CLI."""
        from .worker.runtime import WorkerConfig, configure_logging, run_worker

        target = url or self.remote_url
        if not target:
            raise ConfigurationError(
                "serve() needs the URL of the mounted task API: pass url=... "
                "(e.g. http://127.0.0.1:8000/tasks) or set BGTASKS_URL."
            )
        names = [t.name for t in tasks] or sorted(self.tasks)
        configure_logging(options.pop("log_level", "INFO"))
        config = WorkerConfig(url=target, token=options.pop("token", self.token), **options)
        anyio.run(run_worker, self, names, config)


def check_schedule(countdown: float | None, eta: datetime | None, priority: int) -> None:
    if countdown is not None and eta is not None:
        raise InvalidSchedule("Pass countdown or eta, not both.")
    if countdown is not None and not (0 <= countdown <= 10 * 365 * 86400):
        raise InvalidSchedule("countdown must be between 0 seconds and 10 years.")
    if eta is not None and (eta.tzinfo is None or eta.utcoffset() is None):
        raise InvalidSchedule("eta must be timezone-aware (e.g. datetime.now(UTC)).")
    if not (-(2**31) <= priority < 2**31):
        raise InvalidSchedule("priority must fit in 32 bits.")


def _loop_of_this_thread() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


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
