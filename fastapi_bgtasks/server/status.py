"""⑥ Status for frontends and operators: a run's document and its live
events (capabilities: the random run id is the credential), the run list and
cancellation (operators).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Depends, Query
from sse_starlette import EventSourceResponse, ServerSentEvent

from ..errors import InvalidCursor, RateLimited, RunNotFound, StoreUnavailable
from ..states import RunState
from ..wire import ErrorBody, RunDocument, RunHistory, RunPage, Transition, document_from_row
from .context import require_running

if TYPE_CHECKING:
    from .context import ServerHub

__all__ = ["status_router"]


def status_router(hub: ServerHub) -> Any:
    from ..wire import decode_cursor, encode_cursor
    from .access import operator_access, operator_check

    router = APIRouter()
    check = operator_check(hub)
    require_operator = operator_access(hub)
    not_found: dict[int | str, dict[str, Any]] = {
        404: {"model": ErrorBody, "description": "No such run"}
    }
    unavailable: dict[int | str, dict[str, Any]] = {
        503: {"model": ErrorBody, "description": "Store unavailable"}
    }
    denied: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorBody, "description": "No operator access"}
    }
    invalid: dict[int | str, dict[str, Any]] = {
        422: {"model": ErrorBody, "description": "Invalid parameters"}
    }

    async def load(run_id: uuid.UUID, full: bool) -> RunDocument:
        row = await require_running(hub).store.get_run(run_id)
        if row is None:
            raise RunNotFound(f"No run has id {run_id}.")
        return document_from_row(row, full=full)

    @router.get(
        "/runs/{run_id}",
        response_model=RunDocument,
        summary="A run's document (the id is the credential)",
        responses={**not_found, **invalid, **unavailable},
    )
    async def get_run(run_id: uuid.UUID, denied: Any = Depends(check)) -> RunDocument:
        return await load(run_id, full=denied is None)

    @router.get(
        "/runs",
        response_model=RunPage,
        summary="Runs, newest first",
        dependencies=[Depends(require_operator)],
        responses={**denied, **invalid, **unavailable},
    )
    async def list_runs(
        state: RunState | None = None,
        task: str | None = Query(default=None, max_length=200),
        limit: int = Query(default=50, ge=1, le=hub.settings.max_list_limit),
        cursor: str | None = Query(default=None, max_length=500),
    ) -> RunPage:
        try:
            position = decode_cursor(cursor) if cursor else None
        except ValueError:
            raise InvalidCursor() from None
        rows = await require_running(hub).store.list_runs(
            state=state, task=task, limit=limit + 1, cursor=position
        )
        page = rows[:limit]
        next_cursor = None
        if len(rows) > limit:
            last = page[-1]
            next_cursor = encode_cursor(last["created_at"], last["id"])
        return RunPage(runs=[document_from_row(r) for r in page], next_cursor=next_cursor)

    @router.get(
        "/runs/{run_id}/history",
        response_model=RunHistory,
        summary="Every state change of a run, oldest first",
        dependencies=[Depends(require_operator)],
        responses={**denied, **not_found, **invalid, **unavailable},
    )
    async def get_history(run_id: uuid.UUID) -> RunHistory:
        store = require_running(hub).store
        rows = await store.run_history(run_id)
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

    @router.post(
        "/runs/{run_id}/cancel",
        response_model=RunDocument,
        summary="Cancel a run (a running one is stopped in its worker)",
        dependencies=[Depends(require_operator)],
        responses={
            **denied,
            **not_found,
            409: {"model": ErrorBody, "description": "Already finished"},
            **invalid,
            **unavailable,
        },
    )
    async def cancel_run(run_id: uuid.UUID) -> RunDocument:
        running = require_running(hub)
        row = await running.store.cancel_run(run_id)
        running.wakeups.run_changed()
        return document_from_row(row)

    @router.get(
        "/runs/{run_id}/events",
        summary="The run's state changes as Server-Sent Events, until it ends",
        response_class=EventSourceResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "state events, then end"},
            **not_found,
            429: {"model": ErrorBody, "description": "Too many streams"},
            **invalid,
            **unavailable,
        },
    )
    async def run_events(run_id: uuid.UUID, denied: Any = Depends(check)) -> Any:
        from .wakeups import wait_any

        running = require_running(hub)
        full = denied is None
        first = await load(run_id, full)
        if running.open_streams >= hub.settings.max_streams:
            raise RateLimited("Too many event streams are open; poll GET /runs/{id} instead.")
        running.open_streams += 1
        shutdown = anyio.Event()

        async def stream() -> AsyncIterator[Any]:
            document = first
            last: tuple[Any, ...] | None = None
            deadline = time.monotonic() + hub.settings.feed_max_seconds
            try:
                while True:
                    key = (document.state, document.attempt, document.scheduled_at)
                    if key != last:
                        last = key
                        yield ServerSentEvent(data=document.model_dump_json(), event="state")
                    if document.state.is_terminal:
                        yield ServerSentEvent(
                            data=json.dumps({"state": document.state.value}), event="end"
                        )
                        return
                    if shutdown.is_set() or running.closing.is_set() or time.monotonic() > deadline:
                        yield ServerSentEvent(data="{}", event="bye")
                        return
                    changed = running.wakeups.changed_event()
                    await wait_any([changed, shutdown, running.closing], hub.settings.poll_seconds)
                    try:
                        document = await load(run_id, full)
                    except StoreUnavailable:
                        continue
            finally:
                running.open_streams -= 1

        return EventSourceResponse(
            stream(), ping=15, send_timeout=30, shutdown_event=shutdown, shutdown_grace_period=1.0
        )

    return router
