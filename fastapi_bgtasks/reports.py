"""⑤ What workers send back: batched reports (state changes, results,
errors) and heartbeats that renew their leases.

A report whose lease token is no longer current changes nothing and gets the
outcome `stale`, so a worker that lost its lease can never settle a run its
successor holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends

from .errors import StoreUnavailable
from .feed import ANY_TASK
from .models import ErrorBody, HeartbeatRequest, HeartbeatResponse, ReportBatch, ReportOutcomes

if TYPE_CHECKING:
    from .app import BgTasks, Running

__all__ = ["reports_router"]


def _running(hub: BgTasks) -> Running:
    running = hub.running
    if running is None:
        raise StoreUnavailable("The app's lifespan is not running.")
    return running


def reports_router(hub: BgTasks) -> Any:
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
        running = _running(hub)
        applied = await running.store.apply_reports(
            batch.reports, max_result_bytes=hub.max_result_bytes
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
        running = _running(hub)
        renewed, stop, cancel = await running.store.heartbeat(
            worker_id=beat.worker_id,
            held=[(held.run_id, held.lease_token) for held in beat.runs],
            lease_seconds=hub.lease_seconds,
        )
        return HeartbeatResponse(renewed=renewed, stop=stop, cancel=cancel)

    return router
