"""`GET /health`: what a load balancer or an orchestrator asks before it
sends traffic. 200 only while the lifespan runs and the store takes writes
(a store that answers reads but cannot write would accept no submit and
renew no lease), else 503 with the one JSON error body.
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter

from ..errors import StoreUnavailable
from .context import Live
from .responses import declare

__all__ = ["router"]

# How long the probe waits for the write lock, and for the whole answer.
WRITE_WAIT_SECONDS = 1.0
ANSWER_SECONDS = 2.0

router = APIRouter()


@router.get(
    "/health",
    summary="200 when the lifespan runs and the store answers, else 503",
    responses=declare(StoreUnavailable),
)
async def health(running: Live) -> dict[str, str]:
    try:
        with anyio.fail_after(ANSWER_SECONDS):
            await running.store.probe_write(WRITE_WAIT_SECONDS)
    except TimeoutError:
        raise StoreUnavailable(
            f"The task store did not take a write within {ANSWER_SECONDS:g} s."
        ) from None
    return {"status": "ok", "database": running.store.dialect}
