"""⑥ Status for frontends and operators: a run's document and its live
events (capabilities: the random run id is the credential), the run list and
cancellation (operators).
"""

from __future__ import annotations

import functools
import inspect
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from ..errors import (
    AccessDenied,
    InvalidCursor,
    InvalidRequest,
    InvalidValue,
    RateLimited,
    RunFinished,
    RunNotFound,
    StoreUnavailable,
)
from ..states import RunState
from ..wire import (
    CURSOR_PATTERN,
    RunDocument,
    RunHistory,
    RunPage,
    Transition,
    decode_cursor,
    document_from_row,
    encode_cursor,
)
from .access import OPERATOR, OperatorVerdict
from .context import Hub, Live, Running
from .responses import declare
from .wakeups import wait_any
from .watchers import Limits, Subscription, Watched

if TYPE_CHECKING:
    from ..settings import Settings
    from ..store import Store

__all__ = ["router"]

INCLUDE_PATTERN = r"^(args|result|args,result|result,args)$"


async def _load(store: Store, run_id: uuid.UUID, full: bool) -> RunDocument:
    row = await store.get_run(run_id)
    if row is None:
        raise RunNotFound(f"No run has id {run_id}.")
    return document_from_row(row, full=full)


async def get_run(run_id: uuid.UUID, denied: OperatorVerdict, running: Live) -> RunDocument:
    document = await _load(running.store, run_id, full=denied is None)
    if document.state is RunState.SCHEDULED:
        document.waiting_for = running.serving.waiting_for(document.task)
    return document


async def list_runs(
    running: Live,
    hub: Hub,
    state: RunState | None = None,
    task: str | None = Query(default=None, max_length=200),
    limit: int = Query(default=50, ge=1),
    cursor: str | None = Query(default=None, max_length=50, pattern=CURSOR_PATTERN),
    include: str | None = Query(
        default=None,
        pattern=INCLUDE_PATTERN,
        description="`args`, `result` or `args,result`: also list these values "
        "(a page then stops early at max_page_bytes)",
    ),
) -> RunPage:
    try:
        position = decode_cursor(cursor) if cursor else None
    except ValueError:
        raise InvalidCursor() from None
    page, more = await running.store.page_runs(
        state=state, task=task, limit=limit, cursor=position,
        include=(include or "").split(","), max_bytes=hub.settings.max_page_bytes,
    )  # fmt: skip
    next_cursor = None
    if more:
        last = page[-1]
        next_cursor = encode_cursor(last["created_at"], last["id"])
    return RunPage(runs=[document_from_row(r) for r in page], next_cursor=next_cursor)


def _bounded_list(maximum: int) -> Callable[..., Awaitable[RunPage]]:
    """`list_runs` with `limit` bounded by the hub's `max_list_limit`: a
    setting, so each app validates, and its OpenAPI shows, its own bound."""

    @functools.wraps(list_runs)
    async def bounded(**params: Any) -> RunPage:
        return await list_runs(**params)

    signature = inspect.signature(list_runs, eval_str=True)
    limit = Query(default=50, ge=1, le=maximum)
    parameters = [
        p.replace(default=limit) if p.name == "limit" else p for p in signature.parameters.values()
    ]
    setattr(bounded, "__signature__", signature.replace(parameters=parameters))  # noqa: B010
    return bounded


async def get_history(run_id: uuid.UUID, running: Live) -> RunHistory:
    rows = await running.store.run_history(run_id)
    if not rows:
        raise RunNotFound(f"No run has id {run_id}.")
    return RunHistory(
        run_id=run_id,
        transitions=[
            Transition(
                from_state=r["from_state"],
                to_state=r["to_state"],
                attempt=r["attempt"],
                reason=r["reason"],
                at=r["at"],
            )
            for r in rows
        ],
    )


async def cancel_run(run_id: uuid.UUID, running: Live) -> RunDocument:
    row = await running.store.cancel_run(run_id)
    running.wakeups.runs_changed([run_id])
    return document_from_row(row)


async def run_events(
    run_id: uuid.UUID, request: Request, denied: OperatorVerdict, hub: Hub, running: Live
) -> EventSourceResponse:
    # Admitted (or refused with 429) before the stream starts. Its first
    # event is the run as its shared copy has it, or as read now.
    settings = hub.settings
    limits = Limits(
        settings.max_streams, settings.max_streams_per_client, settings.max_streams_per_run
    )
    client = request.client.host if request.client else "?"
    place = running.wakeups.watched.admit(run_id, client, limits)
    try:
        watched = running.wakeups.watched.get(run_id)
        row = watched.row if watched is not None else await running.store.get_run(run_id)
        if row is None:
            raise RunNotFound(f"No run has id {run_id}.")
        watched = place.attach(row)
    except BaseException:
        place.release()
        raise
    shutdown = anyio.Event()
    return EventSourceResponse(
        _state_events(settings, running, place, watched, denied is None, shutdown),
        ping=15,
        send_timeout=30,
        shutdown_event=shutdown,
        shutdown_grace_period=1.0,
        background=BackgroundTask(place.arelease),
    )


async def _state_events(
    settings: Settings,
    running: Running,
    place: Subscription,
    watched: Watched,
    full: bool,
    shutdown: anyio.Event,
) -> AsyncIterator[ServerSentEvent]:
    """The run's document each time its shared copy changes: no store read
    of its own, and no waking for other runs."""
    last: tuple[Any, ...] | None = None
    deadline = time.monotonic() + settings.feed_max_seconds
    try:
        while True:
            changed = watched.changed  # taken before the row: no change is missed
            document = document_from_row(watched.row, full=full)
            key = (document.state, document.attempt, document.scheduled_at)
            if key != last:
                last = key
                yield ServerSentEvent(data=document.model_dump_json(), event="state")
            if document.state.is_terminal:
                yield ServerSentEvent(data=json.dumps({"state": document.state.value}), event="end")
                return
            if shutdown.is_set() or running.closing.is_set() or time.monotonic() > deadline:
                yield ServerSentEvent(data="{}", event="bye")
                return
            await wait_any([changed, shutdown, running.closing], deadline - time.monotonic())
    finally:
        place.release()


def router(max_list_limit: int) -> APIRouter:
    """The status routes of one app (`GET /runs` bounds its page size by the
    app's `max_list_limit`)."""
    routes = APIRouter()
    routes.add_api_route(
        "/runs/{run_id}",
        get_run,
        response_model=RunDocument,
        summary="A run's document (the id is the credential)",
        responses=declare(RunNotFound, InvalidRequest, StoreUnavailable),
    )
    routes.add_api_route(
        "/runs",
        _bounded_list(max_list_limit),
        response_model=RunPage,
        summary="Runs, newest first",
        dependencies=OPERATOR,
        responses=declare(
            AccessDenied, InvalidRequest, InvalidCursor, InvalidValue, StoreUnavailable
        ),
    )
    routes.add_api_route(
        "/runs/{run_id}/history",
        get_history,
        response_model=RunHistory,
        summary="Every state change of a run, oldest first",
        dependencies=OPERATOR,
        responses=declare(AccessDenied, RunNotFound, InvalidRequest, StoreUnavailable),
    )
    routes.add_api_route(
        "/runs/{run_id}/cancel",
        cancel_run,
        methods=["POST"],
        response_model=RunDocument,
        summary="Cancel a run (a running one is stopped in its worker)",
        dependencies=OPERATOR,
        responses=declare(AccessDenied, RunNotFound, RunFinished, InvalidRequest, StoreUnavailable),
    )
    routes.add_api_route(
        "/runs/{run_id}/events",
        run_events,
        summary="The run's state changes as Server-Sent Events, until it ends",
        response_class=EventSourceResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "state events, then end"},
            **declare(RunNotFound, RateLimited, InvalidRequest, StoreUnavailable),
        },
    )
    return routes
