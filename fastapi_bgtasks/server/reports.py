"""⑤ What workers send back: batched reports (state changes, results,
errors) and heartbeats that renew their leases.

A report whose lease token is no longer current changes nothing and gets the
outcome `stale`, so a worker that lost its lease can never settle a run its
successor holds. A run a worker rejects (it cannot accept it) is logged here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter

from ..errors import (
    AccessDenied,
    BadRequest,
    InvalidRequest,
    InvalidValue,
    PayloadTooLarge,
    StoreUnavailable,
)
from ..wire import HeartbeatRequest, HeartbeatResponse, Report, ReportBatch, ReportOutcomes
from .access import WORKER
from .context import Hub, Live
from .responses import declare
from .wakeups import ANY_TASK

__all__ = ["router"]

log = logging.getLogger("fastapi_bgtasks.reports")

router = APIRouter(dependencies=WORKER)

_ERRORS = declare(
    AccessDenied, BadRequest, PayloadTooLarge, InvalidRequest, InvalidValue, StoreUnavailable
)


@router.post(
    "/worker/reports",
    response_model=ReportOutcomes,
    summary="Apply a batch of worker reports",
    responses=_ERRORS,
)
async def post_reports(batch: ReportBatch, hub: Hub, running: Live) -> ReportOutcomes:
    applied = await running.store.apply_reports(
        batch.reports, max_result_bytes=hub.settings.max_result_bytes
    )
    outcomes: list[Any] = [outcome for outcome, _ in applied]
    _log_rejections(batch.worker_id, batch.reports, applied)
    if any(o == "accepted" for o in outcomes):
        running.wakeups.runs_changed(changed["id"] for _, changed in applied if changed is not None)
        if any(changed is not None and changed["state"] != "RUNNING" for _, changed in applied):
            running.wakeups.worker_freed(batch.worker_id)
        if any(changed is not None and changed["state"] == "SCHEDULED" for _, changed in applied):
            running.wakeups.runs_added(ANY_TASK)
    return ReportOutcomes(outcomes=outcomes)


def _log_rejections(
    worker_id: str, reports: Sequence[Report], applied: Sequence[tuple[Any, Any]]
) -> None:
    """A warning per run a worker rejected: version skew to look into."""
    for report, (outcome, changed) in zip(reports, applied, strict=True):
        if report.state != "REJECTED" or outcome != "accepted" or changed is None:
            continue
        error = report.error
        log.warning(
            "Run %s rejected by worker %s (%s: %s); now %s",
            report.run_id,
            worker_id,
            error.type if error else "no reason given",
            error.message if error else "",
            changed["state"],
        )


@router.post(
    "/worker/heartbeat",
    response_model=HeartbeatResponse,
    summary="Renew this worker's leases; learn which runs to stop",
    responses=_ERRORS,
)
async def post_heartbeat(beat: HeartbeatRequest, hub: Hub, running: Live) -> HeartbeatResponse:
    renewed, stop, cancel = await running.store.heartbeat(
        worker_id=beat.worker_id,
        held=[(held.run_id, held.lease_token) for held in beat.runs],
        lease_seconds=hub.settings.lease_seconds,
    )
    return HeartbeatResponse(renewed=renewed, stop=stop, cancel=cancel)
