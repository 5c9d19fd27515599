"""① The HTTP intake of submissions: `POST /runs` and `POST /runs/batch`,
for other services, scripts without the package, and tasks submitting from
inside a worker. Arguments are validated exactly as `task.delay` validates
them; nothing is stored unless they pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Header, Response

from ..schedule import Schedule
from ..submit import Destination, StoreRoute, Where, submit_call, submit_calls
from ..wire import ErrorBody, MapRequest, MapResponse, RunDocument, SubmitRequest
from .access import operator_access
from .context import require_running

if TYPE_CHECKING:
    from .context import ServerHub

__all__ = ["submit_router"]


def submit_router(hub: ServerHub) -> Any:
    """`POST /runs`: submit a run by task name (operators, other services)."""
    router = APIRouter()

    @router.post(
        "/runs",
        status_code=202,
        response_model=RunDocument,
        response_model_exclude_none=False,
        summary="Submit a run",
        dependencies=[Depends(operator_access(hub))],
        responses={
            401: {"model": ErrorBody, "description": "No operator access"},
            404: {"model": ErrorBody, "description": "No task of that name"},
            409: {"model": ErrorBody, "description": "Idempotency key reused with other arguments"},
            413: {"model": ErrorBody, "description": "Body or arguments too large"},
            422: {"model": ErrorBody, "description": "Bad arguments or schedule"},
            503: {"model": ErrorBody, "description": "Store unavailable"},
        },
    )
    async def submit_run(
        body: SubmitRequest,
        response: Response,
        idempotency_key: str | None = Header(default=None, max_length=200),
    ) -> RunDocument:
        task = hub.get_task(body.task)
        key = body.idempotency_key or idempotency_key
        schedule = Schedule(body.countdown, body.eta, key, body.priority)
        where = _lifespan_store(hub)
        document, created = await submit_call(where, task, body.args, body.kwargs, schedule)
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        return document

    @router.post(
        "/runs/batch",
        status_code=202,
        response_model=MapResponse,
        summary="Submit many runs of one task, all or none",
        dependencies=[Depends(operator_access(hub))],
        responses={
            401: {"model": ErrorBody, "description": "No operator access"},
            404: {"model": ErrorBody, "description": "No task of that name"},
            413: {"model": ErrorBody, "description": "Body or arguments too large"},
            422: {"model": ErrorBody, "description": "Bad arguments (nothing is stored)"},
            503: {"model": ErrorBody, "description": "Store unavailable"},
        },
    )
    async def submit_runs(body: MapRequest) -> MapResponse:
        task = hub.get_task(body.task)
        calls = [(call.args, call.kwargs) for call in body.calls]
        return MapResponse(runs=await submit_calls(_lifespan_store(hub), task, calls))

    return router


def _lifespan_store(hub: ServerHub) -> Where:
    """The intake's destination: the running lifespan's store (or a 503)."""

    async def where() -> Destination:
        running = require_running(hub)
        return StoreRoute(running.store, running.wakeups)

    return where
