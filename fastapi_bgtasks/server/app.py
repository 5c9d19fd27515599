"""The mounted ASGI app: the routes of submit, feed, reports and status under
one FastAPI sub-app, behind the body limit, with one JSON error shape for all
errors. `build_app` is the one entry the hub calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.types import ASGIApp

from . import feed, health, intake, reports, status
from .access import host_auth
from .bodylimit import BodyLimit
from .origin import WriteGuard
from .responses import EXCEPTION_HANDLERS

if TYPE_CHECKING:
    from .context import ServerHub

__all__ = ["build_app"]


def build_app(hub: ServerHub) -> ASGIApp:
    """The sub-app serving `hub`: its state holds the hub (routes reach it
    through `context.Hub` and `context.Live`) and the host's auth check."""
    api = FastAPI(
        title="fastapi_bgtasks",
        summary="Durable background tasks: submit, feed, reports and status.",
        version="1",
        redirect_slashes=False,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    api.state.hub = hub
    api.state.host_auth = host_auth(hub.settings.auth)
    api.add_middleware(WriteGuard)
    api.include_router(intake.router)
    api.include_router(status.router(hub.settings.max_list_limit))
    api.include_router(feed.router)
    api.include_router(reports.router)
    api.include_router(health.router)
    return BodyLimit(api, hub.settings.max_body_bytes, hub.settings.worker_body_bytes)
