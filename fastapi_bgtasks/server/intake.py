"""① The HTTP intake of submissions: `POST /runs` and `POST /runs/batch`,
for other services, scripts without the package, and tasks submitting from
inside a worker. Arguments are validated exactly as `task.delay` validates
them; nothing is stored unless they pass.
"""

from __future__ import annotations

from fastapi import APIRouter, Header, Response

from ..errors import (
    AccessDenied,
    BadRequest,
    IdempotencyConflict,
    InvalidArguments,
    InvalidRequest,
    InvalidSchedule,
    InvalidValue,
    NotSerializable,
    PayloadTooLarge,
    StoreUnavailable,
    TaskNotFound,
)
from ..schedule import Schedule
from ..submit import Destination, StoreRoute, Where, submit_call, submit_calls
from ..wire import MapRequest, MapResponse, RunDocument, SubmitRequest
from .access import OPERATOR
from .context import Hub, Live, Running
from .responses import declare, method_not_allowed

__all__ = ["router"]

router = APIRouter()

_REFUSALS = (
    InvalidRequest,
    InvalidArguments,
    NotSerializable,
    InvalidValue,
    BadRequest,
    PayloadTooLarge,
    StoreUnavailable,
)


@router.post(
    "/runs",
    status_code=202,
    response_model=RunDocument,
    response_model_exclude_none=False,
    summary="Submit a run",
    dependencies=OPERATOR,
    responses=declare(AccessDenied, TaskNotFound, IdempotencyConflict, InvalidSchedule, *_REFUSALS),
)
async def submit_run(
    body: SubmitRequest,
    response: Response,
    hub: Hub,
    running: Live,
    idempotency_key: str | None = Header(default=None, max_length=200),
) -> RunDocument:
    task = hub.get_task(body.task)
    key = body.idempotency_key or idempotency_key
    schedule = Schedule(body.countdown, body.eta, key, body.priority)
    where = _lifespan_store(running)
    document, created = await submit_call(where, task, body.args, body.kwargs, schedule)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return document


@router.post(
    "/runs/batch",
    status_code=202,
    response_model=MapResponse,
    summary="Submit many runs of one task, all or none",
    dependencies=OPERATOR,
    responses=declare(AccessDenied, TaskNotFound, *_REFUSALS),
)
async def submit_runs(body: MapRequest, hub: Hub, running: Live) -> MapResponse:
    task = hub.get_task(body.task)
    calls = [(call.args, call.kwargs) for call in body.calls]
    return MapResponse(runs=await submit_calls(_lifespan_store(running), task, calls))


@router.api_route(
    "/runs/batch",
    methods=["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"],
    include_in_schema=False,
    dependencies=OPERATOR,
)
async def batch_takes_post_only() -> Response:
    """A 405 naming POST: without this route, `GET /runs/batch` would reach
    `GET /runs/{run_id}` with "batch" as the id, and be a 422."""
    return method_not_allowed("POST")


def _lifespan_store(running: Running) -> Where:
    """The intake's destination: the running lifespan's store."""

    async def where() -> Destination:
        return StoreRoute(running.store, running.wakeups)

    return where
