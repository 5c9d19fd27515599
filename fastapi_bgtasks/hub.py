"""`BgTasks`, the hub: the task registry, where submissions go, the mounted
API and the lifespan that runs the app-side services.

Importing this module does not import SQLAlchemy: a worker process imports
the user's tasks module (and so this one) and never touches the database.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast, overload

import anyio

from .errors import ConfigurationError
from .settings import DEFAULT_DATABASE_URL, MiB, Settings
from .submit import check_schedule
from .taskrun import TaskRun
from .tasks import OnWorkerLost, Task, TaskOptions, TaskRegistry
from .wire import RunDocument

if TYPE_CHECKING:
    from .server.access import FailureThrottle
    from .server.context import Running
    from .submit import Route, Submitter

__all__ = ["DEFAULT_DATABASE_URL", "BgTasks"]

log = logging.getLogger("fastapi_bgtasks")

P = ParamSpec("P")
R = TypeVar("R")


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
        self.settings = Settings.build(
            database_url,
            lease_seconds=lease_seconds,
            heartbeat_seconds=heartbeat_seconds,
            report_interval=report_interval,
            max_rescues=max_rescues,
            token=token,
            auth=auth,
            url=url,
            max_body_bytes=max_body_bytes,
            max_args_bytes=max_args_bytes,
            max_result_bytes=max_result_bytes,
            poll_seconds=poll_seconds,
            reaper_seconds=reaper_seconds,
            feed_max_seconds=feed_max_seconds,
            max_feeds=max_feeds,
            max_streams=max_streams,
            max_list_limit=max_list_limit,
            pool_size=pool_size,
        )
        self.registry = TaskRegistry(
            self,
            max_args_bytes=self.settings.max_args_bytes,
            max_result_bytes=self.settings.max_result_bytes,
            max_rescues=self.settings.max_rescues,
        )
        self.running: Running | None = None
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
    def database_url(self) -> str:
        return self.settings.database_url

    @property
    def tasks(self) -> dict[str, Task[Any, Any]]:
        """The registered tasks by name."""
        return self.registry.tasks

    @property
    def auth_throttle(self) -> FailureThrottle:
        """One count of refused credentials for every worker route of this
        hub. Made on first use: a worker process never imports the HTTP side."""
        if self._auth_throttle is None:
            from .server.access import FailureThrottle

            self._auth_throttle = FailureThrottle()
        return self._auth_throttle

    def __repr__(self) -> str:
        from .store import safe_url

        return f"<BgTasks {safe_url(self.settings.database_url)} tasks={sorted(self.tasks)}>"

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
            return self.registry.add(func, name, options)

        if fn is not None:
            return register(fn)
        return register

    def get_task(self, name: str) -> Task[Any, Any]:
        return self.registry.get(name)

    # -- the mounted app, the dependency, the lifespan ---------------------

    @property
    def app(self) -> Any:
        """The ASGI app to mount: `app.mount("/tasks", bg.app)`."""
        if self._app is None:
            from .server.app import build_app

            self._app = build_app(self)
        return self._app

    def submitter(self) -> Submitter:
        """A FastAPI dependency: `submit: Submitter = Depends(bg.submitter)`."""
        from .submit import Submitter

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
        from .server.context import Running
        from .server.services import run_services
        from .server.wakeups import Wakeups
        from .store import Store

        if self.running is not None:
            raise ConfigurationError("This hub's lifespan is already running.")
        store = Store(self.settings.database_url, pool_size=self.settings.pool_size)
        await store.open()
        try:
            await store.migrate()
            if self.settings.token is None:
                log.warning(
                    "fastapi_bgtasks: no BGTASKS_TOKEN set; worker routes serve loopback "
                    "clients only. Set a token before exposing the app."
                )
            if self.settings.auth is None:
                log.warning(
                    "fastapi_bgtasks: no auth= dependency; operator routes (submit, list, "
                    "cancel) serve loopback clients only."
                )
            running = Running(
                store=store,
                wakeups=Wakeups(),
                loop=asyncio.get_running_loop(),
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
        from .client import HttpRoute
        from .submit import StoreRoute

        loop = asyncio.get_running_loop()
        running = self.running
        if running is not None and running.loop is loop:
            return StoreRoute(running.store, running.wakeups)
        registry = self.registry
        if registry.worker_route is not None and registry.worker_loop is loop:
            return cast("Route", registry.worker_route)
        route = self._per_loop.get(loop)
        if route is None:
            if self.settings.remote_url:
                route = HttpRoute(self.settings.remote_url, self.settings.token)
            else:
                from .store import Store

                route = StoreRoute(Store(self.settings.database_url, pool_size=2), None)
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
        if task.registry is not self.registry:
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
        if task.registry is not self.registry:
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
        for home in (self.running.loop if self.running else None, self.registry.worker_loop):
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
        interrupted, like Prefect's `serve()`; the same runtime as the CLI."""
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


def _loop_of_this_thread() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
