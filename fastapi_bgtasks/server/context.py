"""What the mounted API and the app-side services need of the hub, and no
more: its settings, its tasks, the throttle of refused credentials, and the
running lifespan's store and wake-ups. Routes reach it through two
dependencies (`Hub`, `Live`), never through `BgTasks` itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Protocol, cast

import anyio
from fastapi import Depends, Request

from ..errors import StoreUnavailable
from .serving import Serving

if TYPE_CHECKING:
    from ..settings import Settings
    from ..store import Store
    from ..tasks import Task
    from .throttle import FailureThrottle
    from .wakeups import Wakeups

__all__ = ["Hub", "Live", "Running", "ServerHub", "serving_hub", "serving_lifespan"]


@dataclass
class Running:
    """What a running lifespan owns; the hub holds it only while it runs."""

    store: Store
    wakeups: Wakeups
    loop: asyncio.AbstractEventLoop
    closing: anyio.Event = field(default_factory=anyio.Event)
    open_feeds: dict[str, int] = field(default_factory=dict)
    # The tasks the feeds open in this process serve.
    serving: Serving = field(default_factory=Serving)


class ServerHub(Protocol):
    """The hub as the server sees it."""

    @property
    def settings(self) -> Settings: ...

    @property
    def running(self) -> Running | None: ...

    @property
    def auth_throttle(self) -> FailureThrottle: ...

    @property
    def tasks(self) -> Mapping[str, Task[Any, Any]]: ...

    def get_task(self, name: str) -> Task[Any, Any]: ...


async def serving_hub(request: Request) -> ServerHub:
    """The hub whose sub-app answers this request (`build_app` keeps it in
    the sub-app's state). Async, as every dependency here: FastAPI runs a
    plain `def` dependency in a worker thread, a hop per request."""
    return cast("ServerHub", request.app.state.hub)


async def serving_lifespan(hub: Annotated[ServerHub, Depends(serving_hub)]) -> Running:
    """The running lifespan, or a 503 that says to run it."""
    running = hub.running
    if running is None:
        raise StoreUnavailable("The app's lifespan is not running (FastAPI(lifespan=bg.lifespan)).")
    return running


Hub = Annotated[ServerHub, Depends(serving_hub)]
"""A handler parameter: the hub serving the request."""

Live = Annotated[Running, Depends(serving_lifespan)]
"""A handler parameter: the running lifespan (a 503 before the handler runs if none)."""
