"""`BgTasks`, the hub: a facade over the task registry, the settings, the
mounted API and the lifespan that runs the app-side services. Where a
submission goes is decided in `dispatch`, the submit sequence in `submit`.

Importing this module does not import SQLAlchemy: a worker process imports
the user's tasks module (and so this one) and never touches the database.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast, overload

import anyio

from .dispatch import Dispatch
from .errors import ConfigurationError
from .settings import DEFAULT_DATABASE_URL, MiB, Settings
from .submit import Submitter
from .tasks import AsyncTask, OnWorkerLost, SyncTask, Task, TaskDecorator, TaskOptions

if TYPE_CHECKING:
    from .server.access import FailureThrottle
    from .server.context import Running
    from .wire import RunDocument

__all__ = ["DEFAULT_DATABASE_URL", "BgTasks"]

log = logging.getLogger("fastapi_bgtasks")

P = ParamSpec("P")
T = TypeVar("T")


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
        max_body_bytes: int | None = None,
        max_args_bytes: int = MiB,
        max_result_bytes: int = MiB,
        poll_seconds: float = 1.0,
        reaper_seconds: float | None = None,
        feed_max_seconds: float = 300.0,
        max_feeds: int = 256,
        max_streams: int = 256,
        max_streams_per_client: int = 32,
        max_streams_per_run: int = 16,
        max_list_limit: int = 500,
        max_page_bytes: int = 4 * MiB,
        pool_size: int = 10,
        trust_loopback: bool = True,
        loopback_hosts: Iterable[str] = (),
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
            max_streams_per_client=max_streams_per_client,
            max_streams_per_run=max_streams_per_run,
            max_list_limit=max_list_limit,
            max_page_bytes=max_page_bytes,
            pool_size=pool_size,
            trust_loopback=trust_loopback,
            loopback_hosts=loopback_hosts,
        )
        self.dispatch = Dispatch(self.settings)
        self.registry = self.dispatch.registry
        self._app: Any = None
        self._auth_throttle: FailureThrottle | None = None
        # The app's wall clock, read by the store. Tests step it (a real
        # clock cannot be stepped from a test); nothing else should set it.
        self._wall_clock: Callable[[], float] = time.time

    @property
    def database_url(self) -> str:
        return self.settings.database_url

    @property
    def tasks(self) -> dict[str, Task[Any, Any]]:
        """The registered tasks by name."""
        return self.registry.tasks

    @property
    def running(self) -> Running | None:
        """What the lifespan owns (store, wake-ups, loop) while it runs."""
        return self.dispatch.running

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
    def task(  # type: ignore[overload-overlap]  # an async def matches both; first wins
        self, fn: Callable[P, Coroutine[Any, Any, T]], /
    ) -> AsyncTask[P, T]: ...

    @overload
    def task(self, fn: Callable[P, T], /) -> SyncTask[P, T]: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 0,
        retry_delay_seconds: float | Sequence[float] = 0.0,
        timeout_seconds: float | None = None,
        max_rescues: int | None = None,
        on_worker_lost: OnWorkerLost = "retry",
    ) -> TaskDecorator: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 0,
        retry_delay_seconds: float | Sequence[float] = 0.0,
        timeout_seconds: float | None = None,
        max_rescues: int | None = None,
        on_worker_lost: OnWorkerLost = "retry",
    ) -> Task[Any, Any] | TaskDecorator:
        """Register a sync or async function as a task, bare or with options."""
        options = TaskOptions.build(
            retries=retries,
            retry_delay_seconds=retry_delay_seconds,
            timeout_seconds=timeout_seconds,
            max_rescues=max_rescues,
            on_worker_lost=on_worker_lost,
        )

        def register(func: Callable[..., Any]) -> Task[Any, Any]:
            task: Task[Any, Any] = self.registry.add(func, name, options)
            return task

        if fn is not None:
            return register(fn)
        # One function serves both of TaskDecorator's overloads at run time.
        return cast("TaskDecorator", register)

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

    def install(self, app: Any) -> None:
        """Answer this library's errors in the host app's own routes as the
        mounted API does: `bg.install(app)` after creating the app.

        A `BgTasksError` raised in a host route (`RunNotFound` from
        `bg.read_run`, `StoreUnavailable`, `TaskNotFound`, ...) becomes the
        JSON error body and status of its class in `errors.ERRORS`, instead
        of a plain 500. The host's other errors are left to its own handlers.
        """
        from .server.responses import install_handlers

        install_handlers(app)

    async def submitter(self) -> Submitter:
        """A FastAPI dependency: `submit: Submitter = Depends(bg.submitter)`.
        Async, so FastAPI calls it on the event loop: a plain `def`
        dependency costs every request a hop to a worker thread. Outside a
        route: `submit = await bg.submitter()`."""
        return Submitter(self.dispatch)

    async def read_run(self, run_id: uuid.UUID) -> RunDocument:
        """A run's document, from wherever this process submits."""
        return await self.dispatch.read_run(run_id)

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
        store = Store(
            self.settings.database_url, pool_size=self.settings.pool_size, wall=self._wall_clock
        )
        await store.open()
        try:
            await store.migrate()
            self._warn_open_access()
            running = Running(store=store, wakeups=Wakeups(), loop=asyncio.get_running_loop())
            async with anyio.create_task_group() as tg:
                await tg.start(run_services, self, running)
                self.dispatch.running = running
                try:
                    yield
                finally:
                    self.dispatch.running = None
                    running.closing.set()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()

    def _warn_open_access(self) -> None:
        settings = self.settings
        if settings.token is None:
            log.warning(
                "fastapi_bgtasks: no BGTASKS_TOKEN set; %s",
                "worker routes serve loopback clients only. Set a token before exposing the app."
                if settings.loopback_workers
                else "and trust_loopback=False: worker routes refuse every client.",
            )
        if settings.auth is None:
            log.warning(
                "fastapi_bgtasks: no auth= dependency; operator routes (submit, list, "
                "cancel) serve %s.",
                (
                    "loopback clients and the worker token"
                    if settings.token
                    else "loopback clients only"
                )
                if settings.loopback_operators
                else "the worker token only"
                if settings.token
                else "no client",
            )

    # -- workers ---------------------------------------------------------

    def serve(self, *tasks: Task[Any, Any], url: str | None = None, **options: Any) -> None:
        """Run a worker for these tasks (default: all) in this process, until
        interrupted, like Prefect's `serve()`; the same runtime as the CLI."""
        self.dispatch.serve(*tasks, url=url, **options)
