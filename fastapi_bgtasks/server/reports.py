"""⑤ What workers send back: batched reports (state changes, results,
errors) and heartbeats that renew their leases.

A report whose lease token is no longer current changes nothing and gets the
outcome `stale`, so a worker that lost its lease can never settle a run its
successor holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends

from ..wire import ErrorBody, HeartbeatRequest, HeartbeatResponse, ReportBatch, ReportOutcomes
from .context import require_running
from .wakeups import ANY_TASK

if TYPE_CHECKING:
    from .context import ServerHub

__all__ = ["reports_router"]


def reports_router(hub: ServerHub) -> Any:
    from .access import worker_access

    router = APIRouter(dependencies=[Depends(worker_access(hub))])
    errors: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorBody, "description": "No worker credential"},
        413: {"model": ErrorBody, "description": "Body too large"},
        422: {"model": ErrorBody, "description": "Malformed batch"},
        503: {"model": ErrorBody, "description": "Store unavailable"},
    }

    @router.post(
        "/worker/reports",
        response_model=ReportOutcomes,
        summary="Apply a batch of worker reports",
        responses=errors,
    )
    async def post_reports(batch: ReportBatch) -> ReportOutcomes:
        running = require_running(hub)
        applied = await running.store.apply_reports(
            batch.reports, max_result_bytes=hub.settings.max_result_bytes
        )
        outcomes: list[Any] = [outcome for outcome, _ in applied]
        if any(o == "accepted" for o in outcomes):
            running.wakeups.run_changed()
            if any(changed is not None and changed["state"] != "RUNNING" for _, changed in applied):
                running.wakeups.worker_freed(batch.worker_id)
            if any(
                changed is not None and changed["state"] == "SCHEDULED" for _, changed in applied
            ):
                running.wakeups.runs_added(ANY_TASK)
        return ReportOutcomes(outcomes=outcomes)

    @router.post(
        "/worker/heartbeat",
        response_model=HeartbeatResponse,
        summary="Renew this worker's leases; learn which runs to stop",
        responses=errors,
    )
    async def post_heartbeat(beat: HeartbeatRequest) -> HeartbeatResponse:
        running = require_running(hub)
        renewed, stop, cancel = await running.store.heartbeat(
            worker_id=beat.worker_id,
            held=[(held.run_id, held.lease_token) for held in beat.runs],
            lease_seconds=hub.settings.lease_seconds,
        )
        return HeartbeatResponse(renewed=renewed, stop=stop, cancel=cancel)

    return router
